#!/usr/bin/env bash
# One device call per part, each well inside the 10-minute limit; results land in experiments/results/
# and are copied to $OUT so they come back. Usage (device tool): bash experiments/gpu_session.sh PART
#   tests  — the @pytest.mark.gpu tests (Pallas kernels, MoE layer through Pallas); TESTS_ARGS (pytest
#            arguments split on spaces: files, --deselect) and TESTS_K (one -k expression, e.g. "pallas_gpu and
#            not kernel_configs") pick a part, TESTS_TIMEOUT (540 s) bounds it; the log keeps what ran
#   model  — mixtral_small and deepseek_small train benchmarks (Pallas experts; remat off, then on
#            if that fails; MODEL_EXTRA="model.remat=true" runs only that, MODEL_PRESETS picks presets)
#   layer  — bench_moe.py: MoE layer fwd+bwd vs a dense MLP of the same FLOPs
#   gmm    — bench_grouped_matmul.py with the torch column
#   wgrad  — the wgrad GPU tests (per-item and cross-item-ring kernels), then autotune's ring checks
#   ep     — (2-4 GPUs) the peer-memory all-to-all GPU tests, then bench_ep.py --check over the GPUs there
#            (fp32 and bf16 checks; ragged_worst and ragged_sorted timed beside the default)
#            (EP_PLAN overrides the variant plan)
#   epprof — (2+ GPUs) profile_ep.py: per-GPU time by kernel kind, a step's timeline, the exchange
#            chained in one jit; then the ragged variants with conditionals in CUDA graphs
#   eplayers — (2+ GPUs) the layer bench with 4 MoE layers per step (per-step costs spread as in a model)
#   epsm   — (2+ GPUs) the compiled step's collectives, then the layer step with async all-reduce/
#            all-gather off, and with MOE_JAX_SM_MARGIN SMs left free by the persistent kernels
#   autotune — the grouped-GEMM table for this GPU (own_key: "H200" on the H200): the forward sweep over
#            every shape class, then the wgrad sweep with the cross-item ring; the table lands in $OUT
#            after each sweep (a run cut short keeps what it measured); AUTOTUNE_KINDS (fwd wgrad),
#            AUTOTUNE_SHAPES (1,2,3,0: autotune's SHAPES, one per class; 4-9 the presets' own GEMMs, exact entries),
#            AUTOTUNE_QUICK=1 (the short candidate lists),
#            AUTOTUNE_CONFIGS (JSON {"fwd": [...]}: the candidates); AUTOTUNE_KINDS may add fwd_t (the dgrad's form);
#            AUTOTUNE_SHAPES_<kind> sets one kind's shapes (e.g. AUTOTUNE_SHAPES_fwd_t=5)
#   dsv3   — the MLA GPU tests (cuDNN vs XLA), then profile_model.py (step time, MFU, peak memory, GPU
#            time by category) of DSV3_PRESETS (deepseek_v3_small) with DSV3_PARAMS (bf16) parameters;
#            DSV3_EXTRA adds overrides; then the PyTorch reference (MLA + MTP) in the same call (DSV3_TORCH=0 skips)
#   fast   — whole-model speed, ours beside the PyTorch reference in the same call: per preset in
#            FAST_PRESETS (mixtral_small) and parameter dtype in FAST_PARAMS (bf16 | fp32),
#            profile_model.py (step time, GPU time by category) then torch_reference.py; FAST_EXTRA
#            adds overrides to ours (FAST_TAG names the variant in the files), FAST_TORCH=0 skips the
#            reference; FAST_TESTS=1 first runs the ops' tests on the GPU; FAST_TOP kernels listed (40);
#            FAST_DUMP=1 has XLA dump our step's buffer assignment (the buffers live at the peak) and its
#            optimized HLO (which ops each fusion holds: read it beside the profile's kernel names) into a .tgz;
#            FAST_DUMP=all dumps every program (the per-layer programs), counts each one's copies and maps the
#            profile's kernels to their HLO ops and source lines through the dumps (profile_model.py --hlo-dir);
#            RUN_TAG (fast and ab) ends every result file's name (one call's files do not replace another's)
#   routing — the router's top-k (argmax rounds, routing.top_k_indices) against lax.top_k: bench_ops.py --only top-k
#            at both shapes (GPU time, choices checked equal), then deepseek_small's step (bf16) with each,
#            ours only (ROUTING_PRESET); then the permutation kernels' launch sweep (bench_ops.py --tune-permute)
#   scatter — the permutation's token-major kernels (ops.permute.FORWARD_KERNEL, UNPERMUTE_BACKWARD; both
#            "scatter" by default): their GPU tests, the launch sweep of every form at SCATTER_SHAPES (deepseek),
#            then SCATTER_PRESET's (deepseek_small) bf16 step with the defaults, with both passes row-major
#            ("gather") and with only the forward token-major ("fwd"; SCATTER_VARIANTS), ours only (SCATTER_STEP=0 skips the steps, SCATTER_TESTS=0 the tests;
#            ~7 device minutes in all)
#   attn   — probe_attention.py: causal attention kernels at the benchmark shapes (cuDNN through XLA, JAX's
#            Mosaic GPU example forward, PyTorch SDPA's flash and cuDNN backends), GPU time
#   ab     — a variant against the defaults in one call: AB_TESTS (pytest args, run with -m gpu first), ours with the
#            defaults, ours with AB_EXTRA (overrides; AB_NAME names it), then the reference; AB_PRESET (mixtral_small),
#            AB_PARAMS (bf16); AB_XLA_FLAGS adds XLA flags to the variant only (AB_EXTRA may then be empty);
#            prints each step time, MFU and ratio (e.g. AB_EXTRA=model.norm_fanout=true AB_NAME=fanout
#            AB_TESTS=tests/test_rms_norm.py bash experiments/gpu_session.sh ab: ~5 device minutes)
#   layers — the per-layer programs (`train.programs=layers`, bf16 parameters, LAYERS_PRESET: mixtral_small):
#            bench_compile.py at LAYERS_DEPTHS (12,48; each depth a new process, no compile cache), then
#            probe_layer_memory.py (device memory in use after each program; what a layer's closure keeps)
#   plain  — the README's plain command, `train.py --config PRESET` (PLAIN_PRESETS: mixtral_small) for
#            PLAIN_STEPS (40) steps, nothing else overridden: its own log lines (throughput, MFU)
#   cache  — the compile cache on this GPU: train.py twice on a 2-layer mixtral_small with a fresh cache
#            directory; the second run's "first step" line must say its program was read from the cache
#   dswiglu — fc2's fused dgrad: its GPU tests, probe_dswiglu.py (the epilogue on whole chunks and on row blocks, beside
#            the plain dgrad) at both shapes, then ncu on the row-block form at the mixtral shape (spills, pipes)
#   fc2    — fc2's fused dgrad: GPU tests, its variants alone beside the plain dgrad (FC2_SHAPES), then FC2_PRESETS'
#            bf16 step shipped and with FC2_VARIANT (exact_sigmoid | split_m); FC2_TESTS=0 / FC2_STEP=0 skip parts,
#            FC2_TESTS_K picks tests, FC2_PRESETS=auto steps only where the variant won alone by 2 %,
#            FC2_BENCH_VARIANTS (e.g. exact_sigmoid) times only those beside the default, FC2_TORCH=1 adds the reference
#   ce     — the cross-entropy's softmax-pass kernel (ops.softmax_ce): its GPU test, bench_ops.py --only cross
#            (LM head + CE with the kernel and with XLA's softmax; the pass alone), then the Launch sweep
#            (--tune-ce; CE_TUNE=0 skips it)
#   kernels — the fused ops' GPU tests (RMSNorm, RoPE, SwiGLU backward, fc1+SwiGLU, SwiGLU+fc2 against plain JAX), then
#            bench_ops.py per shape in KERNEL_SHAPES (mixtral deepseek): ours vs XLA, % of copy bandwidth;
#            KERNEL_TUNE=1 then sweeps RMSNorm's launch shape (bench_ops.py --tune-norm, JSON after each row)
# The device brings back 8 files at most: the JSONs come back one by one, the logs as one .tgz per part.
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" experiments/results
stamp=$(mktemp); sleep 1
# compiled programs kept between the calls of one warm machine (ignored by git); compile_s then reads a
# cache hit for a program compiled before
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-.jax_cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the card in the results' names (h100, h200, ...): timings compare only within one card
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE "[HAB][0-9]+" | head -1 | tr A-Z a-z)
GPU=${GPU:-gpu}
case "${1:-}" in
  tests)
    # all of them take more than one call (an H100, stop 39: 68 of them in 380 s): TESTS_ARGS picks files
    # or -k expressions for one call, e.g. TESTS_ARGS="tests/test_grouped_matmul.py" then the rest with --deselect
    # TESTS_ARGS is split on spaces, so a -k expression with spaces goes in TESTS_K (passed as one argument)
    timeout -s KILL ${TESTS_TIMEOUT:-540} python3 -m pytest -q -m gpu -p no:cacheprovider -rs --durations=15 \
      ${TESTS_ARGS:-} ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?"; tail -40 "$OUT/gpu_tests.log" ;;
  model)
    for preset in ${MODEL_PRESETS:-mixtral_small deepseek_small}; do
      for extra in ${MODEL_EXTRA-"" "model.remat=true"}; do
        echo "== $preset $extra"
        log="$OUT/train_${preset}${extra:+_remat}.log"
        # the train run's own status decides (a pipe's would be tail's: always 0)
        timeout 280 python3 experiments/train.py --config "$preset" --benchmark --no-progress \
          train.steps=30 train.log_every=10 $extra > "$log" 2>&1; rc=$?
        grep -v "^[WI][0-9]" "$log" | tail -6
        [ "$rc" = 0 ] && break
      done
    done ;;
  layer) timeout 560 python3 experiments/bench_moe.py --iters 20 ;;
  ep)
    # every step bounded and logged straight into $OUT (a killed pipeline returns nothing)
    ngpu=$(nvidia-smi -L | wc -l); plan="1:local:1"
    # alltoall_ragged = the expert-major Pallas exchange (the default); ragged_worst: no cond (the
    # worst-case buffer), against the 2x buffer's cond on 4+ GPUs
    for g in 2 4 8; do [ "$g" -le "$ngpu" ] && plan="$plan,$g:alltoall_ragged:1,$g:ragged_worst:1,$g:ragged_sorted:1,$g:alltoall:1"; done
    timeout -s KILL 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_all_to_all.py \
      --durations=5 > "$OUT/ep_tests.log" 2>&1; echo "tests rc=$?"; tail -8 "$OUT/ep_tests.log"
    timeout -s KILL 340 python3 experiments/bench_ep.py --check alltoall,alltoall_ragged,allgather,ragged_sorted --gpus 1,2,4,8 --ragged pallas --budget-s 200 \
      --plan "${EP_PLAN:-$plan,$ngpu:alltoall:2}" \
      --out "experiments/results/ep_bench_$(date +%F)_${GPU}x$ngpu.json" > "$OUT/ep_bench.log" 2>&1
    echo "bench rc=$?"; grep -v "^[WI][0-9]" "$OUT/ep_bench.log" | tail -40 ;;
  epprof)
    ngpu=$(nvidia-smi -L | wc -l)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_enable_command_buffers_during_profiling=true" \
      timeout -s KILL 240 python3 experiments/profile_ep.py --tune --timeline \
      --variants "local:1,alltoall_ragged:$ngpu,ragged_tight:$ngpu,ragged_direct:$ngpu" \
      --out "experiments/results/profile_ep_$(date +%F)_${GPU}x$ngpu.json" > "$OUT/profile_ep.log" 2>&1
    echo "profile rc=$?"; grep -v "^[WI][0-9]" "$OUT/profile_ep.log" | grep -v "^ *[0-9.]*  " | tail -40
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE" \
      timeout -s KILL 150 python3 experiments/bench_ep.py --gpus "1,$ngpu" --ragged pallas --budget-s 110 \
      --plan "1:local:1,$ngpu:ragged_tight:1,$ngpu:alltoall_ragged:1" \
      --out "experiments/results/ep_bench_$(date +%F)_${GPU}x${ngpu}_cbcond.json" > "$OUT/ep_cbcond.log" 2>&1
    echo "cb-cond bench rc=$?"; grep -v "^[WI][0-9]" "$OUT/ep_cbcond.log" | tail -12 ;;
  eplayers)
    ngpu=$(nvidia-smi -L | wc -l); plan="1:local:1"
    for g in 2 4 8; do [ "$g" -le "$ngpu" ] && plan="$plan,$g:alltoall_ragged:1,$g:alltoall:1"; done
    timeout -s KILL 400 python3 experiments/bench_ep.py --gpus 1,2,4,8 --ragged "" --layers 4 --plan "$plan" \
      --out "experiments/results/ep_bench_$(date +%F)_${GPU}x${ngpu}_4layers.json" > "$OUT/ep_layers.log" 2>&1
    echo "bench rc=$?"; grep -E "^layer" "$OUT/ep_layers.log" | cut -c1-160; grep -A12 "^summary" "$OUT/ep_layers.log" ;;
  epsm)
    ngpu=$(nvidia-smi -L | wc -l); plan="1:local:1,$ngpu:alltoall_ragged:1,$ngpu:ragged_direct:1"
    timeout -s KILL 120 python3 experiments/profile_ep.py --collectives --timeline \
      --variants "alltoall_ragged:$ngpu" --out "$OUT/profile_collectives.json" > "$OUT/collectives.log" 2>&1
    echo "collectives rc=$?"; grep -v "^[WI][0-9]" "$OUT/collectives.log" | grep -A40 "collectives:" | head -40
    for v in "default||" "sync_collectives|--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER|" \
             "sm_margin8||8" "sm_margin16||16"; do
      IFS="|" read -r tag flags margin <<< "$v"
      # an XLA_FLAGS of blanks makes XLA look for a flags file of that name: set it only when needed
      xf="${XLA_FLAGS:-}${flags:+ $flags}"
      env ${xf:+XLA_FLAGS="$xf"} MOE_JAX_SM_MARGIN="${margin:-0}" timeout -s KILL 110 \
        python3 experiments/bench_ep.py --gpus "1,$ngpu" --ragged "" --plan "$plan" \
        --out "experiments/results/ep_bench_$(date +%F)_${GPU}x${ngpu}_$tag.json" > "$OUT/ep_$tag.log" 2>&1
      echo "== $tag rc=$?"; grep "^layer" "$OUT/ep_$tag.log" | cut -c1-140
    done ;;
  fast)
    if [ "${FAST_TESTS:-0}" = 1 ]; then
      timeout -s KILL 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_permute.py \
        tests/test_cross_entropy.py "tests/test_moe.py::test_layer_through_grouped_gemm_backend" \
        > "$OUT/fast_tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/fast_tests.log"
    fi
    for preset in ${FAST_PRESETS:-mixtral_small}; do
      for pd in ${FAST_PARAMS:-bf16}; do
        dt=$([ "$pd" = bf16 ] && echo bfloat16 || echo float32)
        tag="${preset}_$(date +%F)_${GPU}_${pd}${FAST_TAG:-}${RUN_TAG:+_$RUN_TAG}"
        dump=""; case "${FAST_DUMP:-0}" in
          1) dump="--xla_dump_to=/tmp/xdump_$tag --xla_dump_hlo_module_re=jit_step" ;;
          all) dump="--xla_dump_to=/tmp/xdump_$tag" ;;  # every program (the per-layer ones are jit__layer_*)
        esac
        xf="${XLA_FLAGS:-}${dump:+ $dump}"
        env ${xf:+XLA_FLAGS="$xf"} timeout -s KILL ${FAST_TIMEOUT:-240} python3 experiments/profile_model.py --config "$preset" --top ${FAST_TOP:-40} \
          "model.param_dtype=$dt" ${FAST_EXTRA:-} --out "experiments/results/profile_$tag.json" \
          $([ "${FAST_DUMP:-0}" = all ] && echo --hlo-dir /tmp/xdump_$tag) \
          > "$OUT/profile_$tag.log" 2>&1; echo "== ours $preset $pd rc=$?"
        grep -v "^[WI][0-9]" "$OUT/profile_$tag.log" | tail -${FAST_LINES:-40}
        if [ -n "$dump" ]; then  # the buffer assignment (its live ranges name the peak) and the memory report
          (cd /tmp/xdump_$tag && ls | grep -E "after_optimizations(-buffer-assignment|-memory-usage-report)?\.txt$" \
            | tar czf "$OUT/xla_memory_$tag.tgz" -T -) && ls -la "$OUT/xla_memory_$tag.tgz"
          grep -A25 "(peak)" /tmp/xdump_$tag/*after_optimizations-buffer-assignment.txt | head -40
          # copies XLA kept in each program (a program output that is an input or another output is one)
          (cd /tmp/xdump_$tag && for f in *after_optimizations.txt; do
             n=$(grep -cE "[})] copy(-start)?\(" "$f"); [ "$n" -gt 0 ] && echo "copies $n $f"; done) | sort -k2 -n | tail -20
        fi
        [ "${FAST_TORCH:-1}" = 0 ] && continue
        timeout -s KILL ${FAST_TIMEOUT:-240} python3 experiments/torch_reference.py --config "$preset" \
          --param-dtype "$pd" --out "experiments/results/torch_ref_$tag.json" \
          > "$OUT/torch_$tag.log" 2>&1; echo "== torch $preset $pd rc=$?"; tail -4 "$OUT/torch_$tag.log"
      done
    done ;;
  ab)
    # a variant (AB_EXTRA overrides) against the defaults, then the reference, in one call: the ratio that decides
    [ -n "${AB_EXTRA:-}${AB_XLA_FLAGS:-}" ] || {
      echo "ab: set AB_EXTRA (the variant's overrides, e.g. model.norm_fanout=true) or AB_XLA_FLAGS"; exit 2; }
    if [ -n "${AB_TESTS:-}" ]; then
      timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider $AB_TESTS > "$OUT/ab_tests.log" 2>&1
      echo "tests rc=$?"; tail -2 "$OUT/ab_tests.log"
    fi
    pd=${AB_PARAMS:-bf16}; preset=${AB_PRESET:-mixtral_small}; name=${AB_NAME:-variant}
    FAST_PRESETS=$preset FAST_PARAMS=$pd FAST_TORCH=0 FAST_TAG=_base FAST_LINES=3 bash "$0" fast
    XLA_FLAGS="${XLA_FLAGS:-}${AB_XLA_FLAGS:+ $AB_XLA_FLAGS}" \
      FAST_PRESETS=$preset FAST_PARAMS=$pd FAST_EXTRA="${AB_EXTRA:-}" FAST_TAG=_$name FAST_LINES=3 bash "$0" fast
    python3 - "$preset" "$pd" "$name" "$GPU" "${RUN_TAG:+_$RUN_TAG}" <<'PY'
import json, sys, time
preset, pd, name, gpu, run_tag = sys.argv[1:]
stem = f"experiments/results/{{}}_{preset}_{time.strftime('%Y-%m-%d')}_{gpu}_{pd}"
try:
    base, var = (json.load(open(stem.format("profile") + f"_{t}{run_tag}.json")) for t in ("base", name))
    ref = json.load(open(stem.format("torch_ref") + f"_{name}{run_tag}.json"))
except OSError as e:
    sys.exit(f"ab: a result is missing ({e})")
t = ref["step_time_s"] * 1e3
for tag, r in (("base", base), (name, var)):
    print(f"AB {tag:10s} {r['wall_ms']:7.1f} ms  MFU {100 * r['mfu']:.1f} %  peak {r['peak_memory_gib']:.2f} GiB"
          f"  ours/torch {t / r['wall_ms']:.3f}")
print(f"AB torch      {t:7.1f} ms  MFU {100 * ref['mfu']:.1f} %  | {name}/base {base['wall_ms'] / var['wall_ms']:.3f}x")
PY
    ;;
  layers)
    preset=${LAYERS_PRESET:-mixtral_small}
    timeout -s KILL 330 python3 experiments/bench_compile.py --config "$preset" --layers ${LAYERS_DEPTHS:-12,48} \
      model.param_dtype=bfloat16 train.programs=layers \
      --out "experiments/results/compile_layers_${preset}_$(date +%F)_${GPU}.json" > "$OUT/compile_layers.log" 2>&1
    echo "== bench_compile rc=$?"; grep -v "^[WI][0-9]" "$OUT/compile_layers.log" | tail -4
    timeout -s KILL 200 python3 experiments/probe_layer_memory.py --config "$preset" model.param_dtype=bfloat16 \
      --out "experiments/results/layer_memory_${preset}_$(date +%F)_${GPU}.json" > "$OUT/layer_memory.log" 2>&1
    echo "== probe_layer_memory rc=$?"; grep -v "^[WI][0-9]" "$OUT/layer_memory.log" | tail -${LAYERS_LINES:-60} ;;
  plain)
    # the runner logs to TensorBoard through tensorboardX, which the device lacks: its wheel travels in .whl
    # (`pip` there may belong to another Python: python3 -m pip)
    python3 -c "import tensorboardX" 2>/dev/null || { echo "plain: no tensorboardX here; carry .whl and run" \
      "python3 -m pip install --no-deps .whl/*.whl first (NOTES_speed.md, stop 27)"; exit 2; }
    for preset in ${PLAIN_PRESETS:-mixtral_small}; do
      timeout -s KILL ${PLAIN_TIMEOUT:-300} python3 experiments/train.py --config "$preset" --no-progress \
        train.steps=${PLAIN_STEPS:-40} train.out_dir="runs/plain_$preset" --overwrite > "$OUT/plain_$preset.log" 2>&1
      echo "== plain $preset rc=$?"; grep -v "^[WI][0-9]" "$OUT/plain_$preset.log" | tail -${PLAIN_LINES:-8}
    done ;;
  cache)
    # a 2-layer step compiles in ~20 s: the check is that the rerun reads it back, not the compile time
    python3 -c "import tensorboardX" 2>/dev/null || { echo "cache: no tensorboardX here; carry .whl"; exit 2; }
    dir=$(mktemp -d)
    for run in 1 2; do
      env -u JAX_COMPILATION_CACHE_DIR timeout -s KILL 200 python3 experiments/train.py --config mixtral_small \
        --no-progress --compile-cache "$dir" model.num_layers=2 train.steps=6 train.log_every=3 \
        train.out_dir="runs/cache_$run" --overwrite > "$OUT/cache_$run.log" 2>&1
      echo "== run $run rc=$?"; grep -E "first step|^step|compile cache" "$OUT/cache_$run.log"
    done
    du -sh "$dir" ;;
  dswiglu)
    timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_grouped_swiglu.py -k dgrad \
      > "$OUT/dswiglu_tests.log" 2>&1; echo "tests rc=$?"; tail -2 "$OUT/dswiglu_tests.log"
    for shape in mixtral deepseek; do
      timeout -s KILL 120 python3 experiments/probe_dswiglu.py --shape "$shape" \
        --out "experiments/results/probe_dswiglu_${shape}_$(date +%F)_${GPU}.json" 2>&1 | grep -v "^[WI][0-9]" | tail -1
    done
    timeout -s KILL 150 ncu --kernel-name regex:"gmm_dswiglu|gmm_fwd_t" --launch-skip 2 --launch-count 2 --set full \
      python3 experiments/probe_dswiglu.py --shape mixtral --row-split 2 --reps 0 \
      > "$OUT/ncu_dswiglu_mixtral_rows2.log" 2>&1  # comes back in the part's .tgz of logs
    grep -E "mosaic_gpu_kernel|Duration|Spilling Requests  |Compute \(SM\) Throughput" \
      "$OUT/ncu_dswiglu_mixtral_rows2.log" ;;
  kernels)
    timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_rms_norm.py \
      tests/test_rope_kernel.py tests/test_gated_act.py tests/test_grouped_swiglu.py > "$OUT/kernels_tests.log" 2>&1
    echo "tests rc=$?"; tail -4 "$OUT/kernels_tests.log"
    for shape in ${KERNEL_SHAPES:-mixtral deepseek}; do
      timeout -s KILL 150 python3 experiments/bench_ops.py --shape "$shape" \
        --out "experiments/results/ops_${shape}_$(date +%F)_${GPU}.json" > "$OUT/ops_$shape.log" 2>&1
      echo "== ops $shape rc=$?"; grep -v "^[WI][0-9]" "$OUT/ops_$shape.log" | tail -9
    done
    if [ "${KERNEL_TUNE:-0}" = 1 ]; then
      timeout -s KILL 200 python3 experiments/bench_ops.py --shape mixtral --tune-norm --reps 10 \
        --out "experiments/results/tune_norm_mixtral_$(date +%F)_${GPU}.json" > "$OUT/tune_norm.log" 2>&1
      echo "== tune rc=$?"; grep "^best" "$OUT/tune_norm.log"
    fi ;;
  autotune)
    for kind in ${AUTOTUNE_KINDS:-fwd wgrad}; do  # fwd_t: the forward kernel with a transposed rhs (dgrad)
      ring=$([ "$kind" = wgrad ] && echo --ring)
      limit=$([ "$kind" = wgrad ] && echo ${AUTOTUNE_WGRAD_S:-220} || echo ${AUTOTUNE_FWD_S:-330})
      timeout -s KILL $limit python3 experiments/autotune_grouped_matmul.py --kinds $kind $ring \
        --shapes $(v=AUTOTUNE_SHAPES_$kind; echo ${!v:-${AUTOTUNE_SHAPES:-1,2,3,0}}) ${AUTOTUNE_CONFIGS:+--configs "$AUTOTUNE_CONFIGS"} \
        $([ "${AUTOTUNE_QUICK:-0}" = 1 ] && echo --quick) \
        > "$OUT/autotune_$kind.log" 2>&1; echo "$kind rc=$?"
      grep "^PICK" "$OUT/autotune_$kind.log"
    done
    cp ops/tuning/grouped_matmul.json "$OUT/" ;;
  dsv3)
    timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mla.py --durations=4 \
      > "$OUT/dsv3_tests.log" 2>&1; echo "tests rc=$?"; tail -8 "$OUT/dsv3_tests.log"
    for preset in ${DSV3_PRESETS:-deepseek_v3_small}; do
      for pd in ${DSV3_PARAMS:-bf16}; do
        dt=$([ "$pd" = bf16 ] && echo bfloat16 || echo float32)
        tag="${preset}_$(date +%F)_${GPU}_${pd}"
        timeout -s KILL ${DSV3_TIMEOUT:-300} python3 experiments/profile_model.py --config "$preset" \
          "model.param_dtype=$dt" ${DSV3_EXTRA:-} --out "experiments/results/profile_$tag.json" \
          > "$OUT/profile_$tag.log" 2>&1; echo "== ours $preset $pd rc=$?"
        grep -v "^[WI][0-9]" "$OUT/profile_$tag.log" | tail -${DSV3_LINES:-30}
        [ "${DSV3_TORCH:-1}" = 0 ] && continue
        timeout -s KILL ${DSV3_TIMEOUT:-300} python3 experiments/torch_reference.py --config "$preset" \
          --param-dtype "$pd" --out "experiments/results/torch_ref_$tag.json" \
          > "$OUT/torch_$tag.log" 2>&1; echo "== torch $preset $pd rc=$?"; tail -4 "$OUT/torch_$tag.log"
      done
    done ;;
  routing)
    for s in mixtral deepseek; do
      timeout -s KILL 80 python3 experiments/bench_ops.py --shape $s --only top-k \
        --out "experiments/results/ops_topk_${s}_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json" 2>&1 | grep -v "^[WI][0-9]" | tail -1
    done
    preset=${ROUTING_PRESET:-deepseek_small}
    FAST_PRESETS=$preset FAST_PARAMS=bf16 FAST_TORCH=0 FAST_TAG=_argmax FAST_LINES=3 bash "$0" fast
    stem="experiments/results/profile_${preset}_$(date +%F)_${GPU}_bf16"
    # the same step with lax.top_k (what the router ran before): the previous form put back through runpy
    timeout -s KILL 240 python3 - "$preset" "${stem}_laxtopk${RUN_TAG:+_$RUN_TAG}.json" > "$OUT/profile_laxtopk.log" 2>&1 <<'PY'
import runpy, sys
import jax
import moe_jax.routing as R
select = lambda x, k: jax.lax.top_k(x, k)[1]  # noqa: E731
R.group_limited_topk.__defaults__ = (None, select)
R.top_k_indices = select
sys.argv = ["profile_model.py", "--config", sys.argv[1], "model.param_dtype=bfloat16", "--out", sys.argv[2]]
runpy.run_path("experiments/profile_model.py", run_name="__main__")
PY
    echo "== lax.top_k rc=$?"; grep -v "^[WI][0-9]" "$OUT/profile_laxtopk.log" | tail -3
    for s in ${PERMUTE_SHAPES:-deepseek mixtral}; do
      timeout -s KILL 120 python3 experiments/bench_ops.py --shape $s --tune-permute \
        --out "experiments/results/tune_permute_${s}_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json" 2>&1 | grep "^best"
    done ;;
  scatter)
    # the permutation's token-major kernels (ops.permute.FORWARD_KERNEL, UNPERMUTE_BACKWARD)
    if [ "${SCATTER_TESTS:-1}" != 0 ]; then
      timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_permute.py tests/test_moe.py \
        -k "scatter or token_major" > "$OUT/scatter_tests.log" 2>&1; echo "tests rc=$?"; tail -2 "$OUT/scatter_tests.log"
    fi
    for s in ${SCATTER_SHAPES:-deepseek}; do
      res="experiments/results/tune_permute_${s}_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json"
      timeout -s KILL 150 python3 experiments/bench_ops.py --shape $s --tune-permute --out "$res" > "$OUT/scatter_tune_$s.log" 2>&1
      echo "== sweep $s rc=$?"
      python3 - "$res" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
d = next(r for r in rows if r["block_elems"] == 8192 and r["warps"] == 4)
for key in ("permute_ms", "scatter_ms", "dots_ms"):
    b = min(rows, key=lambda r: r[key])
    print(f"{key}: default launch {d[key]:.4f} ms, best {b[key]:.4f} ms at {b['block_elems']}/{b['warps']}")
print(f"xla_unpermute_bwd_ms {d['xla_unpermute_bwd_ms']:.4f}; all equal:",
      all(r["equal"] and r["scatter_equal"] and r["dots_equal"] for r in rows))
PY
    done
    [ "${SCATTER_STEP:-1}" = 0 ] && { find experiments/results -name '*.json' -newer "$stamp" -exec cp {} "$OUT/" \; ; exit 0; }
    preset=${SCATTER_PRESET:-deepseek_small}
    FAST_PRESETS=$preset FAST_PARAMS=bf16 FAST_TORCH=0 FAST_TAG=_default FAST_LINES=3 bash "$0" fast
    stem="experiments/results/profile_${preset}_$(date +%F)_${GPU}_bf16"
    # gather: both passes as before the token-major kernels; fwd: permute's forward token-major only;
    # both: and unpermute's backward (the defaults)
    for v in ${SCATTER_VARIANTS:-gather fwd}; do
      timeout -s KILL 240 python3 - "$preset" "${stem}_scatter_$v${RUN_TAG:+_$RUN_TAG}.json" "$v" \
        > "$OUT/profile_scatter_$v.log" 2>&1 <<'PY'
import runpy, sys
import ops.permute as P
P.FORWARD_KERNEL = "gather" if sys.argv[3] == "gather" else "scatter"
P.UNPERMUTE_BACKWARD = "scatter" if sys.argv[3] == "both" else "xla"
sys.argv = ["profile_model.py", "--config", sys.argv[1], "model.param_dtype=bfloat16", "--out", sys.argv[2]]
runpy.run_path("experiments/profile_model.py", run_name="__main__")
PY
      echo "== scatter $v rc=$?"; grep -v "^[WI][0-9]" "$OUT/profile_scatter_$v.log" | tail -2
    done ;;
  attn) timeout -s KILL 150 python3 experiments/probe_attention.py \
      --out "experiments/results/probe_attention_causal_$(date +%F)_${GPU}.json" 2>&1 | grep -v "^[WI][0-9]" | tail -12 ;;
  gmm) timeout 560 python3 experiments/bench_grouped_matmul.py --torch --reps 20 --xla-reps 5 ;;
  fc2)
    # fc2's fused dgrad (ops/gmm_pallas_dswiglu.py): the GPU tests (FC2_TESTS=0 skips; FC2_TESTS_K picks: by default
    # the fused dgrad's and the 64-group GEMM's, ~105 s on an H100; "not kernel_configs" outran 200 s), the kernel
    # alone in every variant of bench_ops.py --only fc2 beside the plain dgrad at FC2_SHAPES (mixtral deepseek), then
    # FC2_PRESETS' bf16 step (mixtral_small deepseek_small; FC2_STEP=0 skips) shipped and with FC2_VARIANT put in
    # through runpy (exact_sigmoid: FAST_SIGMOID=False; split_m: DSWIGLU_BWD = DSWIGLU_BWD_SPLIT_M), ours only;
    # FC2_PRESETS=auto: only the presets whose shape's FC2_VARIANT beat the shipped kernel alone by 2 %;
    # FC2_BENCH_VARIANTS (comma list) times only those variants beside the default; FC2_TORCH=1 adds the
    # PyTorch reference after the shipped step
    variant=${FC2_VARIANT:-exact_sigmoid}
    if [ "${FC2_TESTS:-1}" != 0 ]; then
      timeout -s KILL 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_grouped_swiglu.py \
        tests/test_grouped_matmul.py -k "${FC2_TESTS_K:-fused_dgrad or many_groups}" > "$OUT/fc2_tests.log" 2>&1
      echo "tests rc=$?"; tail -2 "$OUT/fc2_tests.log"
    fi
    for shape in ${FC2_SHAPES:-mixtral deepseek}; do
      res="experiments/results/ops_fc2_${shape}_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json"
      timeout -s KILL 180 python3 experiments/bench_ops.py --shape $shape --only fc2 --out "$res" \
        ${FC2_BENCH_VARIANTS:+--fc2-variants "$FC2_BENCH_VARIANTS"} > "$OUT/fc2_bench_$shape.log" 2>&1
      echo "== bench $shape rc=$?"
      [ -f "$res" ] || { tail -12 "$OUT/fc2_bench_$shape.log"; continue; }  # cut short: the variants it timed
      python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][-1]
print(*[f'{k[:-3]} {v:.4f}' for k, v in r.items() if k.endswith('_ms')], sep='; ')
print(*[f'{k}: {v[:80]}' for k, v in r.items() if k.endswith('_error')], sep='\\n')" "$res"
    done
    [ "${FC2_STEP:-1}" = 0 ] && { find experiments/results -name '*.json' -newer "$stamp" -exec cp {} "$OUT/" \; ; exit 0; }
    presets=${FC2_PRESETS:-mixtral_small deepseek_small}
    if [ "$presets" = auto ]; then
      presets=$(python3 - $(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG} $variant ${FC2_SHAPES:-mixtral deepseek} <<'PY'
import json, sys
for shape in sys.argv[3:]:
    try:
        r = json.load(open(f"experiments/results/ops_fc2_{shape}_{sys.argv[1]}.json"))["rows"][-1]
    except FileNotFoundError:  # the bench cut at its limit: its log has the variants it timed
        print(f"no fc2 bench result at {shape}: not stepped", file=sys.stderr)
        continue
    if r.get(f"ours_{sys.argv[2]}_ms", 1e9) < 0.98 * min(r["ours_ms"], r.get("ours_default_again_ms", 1e9)):
        print(f"{shape}_small")
PY
)
      echo "presets whose $variant won alone: ${presets:-none}"
    fi
    for preset in $presets; do
      FAST_PRESETS=$preset FAST_PARAMS=bf16 FAST_TORCH=${FC2_TORCH:-0} FAST_TAG=_shipped FAST_LINES=2 bash "$0" fast
      stem="experiments/results/profile_${preset}_$(date +%F)_${GPU}_bf16"
      timeout -s KILL 240 python3 - "$preset" "${stem}_${variant}${RUN_TAG:+_$RUN_TAG}.json" "$variant" \
        > "$OUT/profile_${variant}_$preset.log" 2>&1 <<'PY'
import runpy, sys
import ops.gmm_pallas_dswiglu as K
if sys.argv[3] == "exact_sigmoid":  # read when the step's kernels are traced
    K.FAST_SIGMOID = False
elif sys.argv[3] == "split_m":
    K.DSWIGLU_BWD = K.DSWIGLU_BWD_SPLIT_M
else:
    sys.exit(f"fc2: unknown FC2_VARIANT {sys.argv[3]}")
sys.argv = ["profile_model.py", "--config", sys.argv[1], "model.param_dtype=bfloat16", "--out", sys.argv[2]]
runpy.run_path("experiments/profile_model.py", run_name="__main__")
PY
      echo "== $variant $preset rc=$?"
      python3 - ${stem}_{shipped,$variant}${RUN_TAG:+_$RUN_TAG}.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    k = sum(t["ms_per_step"] for t in r["top_kernels"] if t["kernel"].startswith("gmm_dswiglu"))
    print(f"{path.split('_bf16_')[1]:26s} wall {r['wall_ms']:.1f} ms busy {r['gpu_busy_ms']:.1f} grouped GEMM "
          f"{r['categories']['grouped GEMM']['ms_per_step']:.2f} fused dgrad {k:.2f} ms/step peak {r['peak_memory_gib']:.2f}")
PY
    done ;;
  ce)
    timeout -s KILL 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cross_entropy.py \
      > "$OUT/ce_tests.log" 2>&1; echo "tests rc=$?"; tail -2 "$OUT/ce_tests.log"
    timeout -s KILL 150 python3 experiments/bench_ops.py --shape mixtral --only cross \
      --out "experiments/results/ops_cross_mixtral_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json" > "$OUT/ce_bench.log" 2>&1
    echo "bench rc=$?"; grep -v "^[WI][0-9]" "$OUT/ce_bench.log" | tail -14
    [ "${CE_TUNE:-1}" = 1 ] && { timeout -s KILL 200 python3 experiments/bench_ops.py --tune-ce --reps 10 \
      --out "experiments/results/tune_ce_mixtral_$(date +%F)_${GPU}${RUN_TAG:+_$RUN_TAG}.json" > "$OUT/ce_tune.log" 2>&1
      echo "tune rc=$?"; grep -v "^[WI][0-9]" "$OUT/ce_tune.log" | tail -40; } ;;
  wgrad)
    timeout -s KILL 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_grouped_matmul.py \
      -k wgrad --durations=8 > "$OUT/wgrad_tests.log" 2>&1; echo "tests rc=$?"; tail -12 "$OUT/wgrad_tests.log"
    timeout -s KILL 240 python3 experiments/autotune_grouped_matmul.py \
      --check wgrad_ring_b_d0,wgrad_ring_b_d1,wgrad_ring_a_d1,wgrad_ring_pp > "$OUT/wgrad_check.log" 2>&1
    echo "check rc=$?"; grep -v "^[WI][0-9]" "$OUT/wgrad_check.log" | tail -12 ;;
  *) echo "usage: $0 tests|model|layer|gmm|ce|wgrad|ep|epprof|eplayers|epsm|autotune|fast|ab|layers|plain|cache|kernels|dsv3|attn|dswiglu|routing|scatter|fc2"; exit 2 ;;
esac
find experiments/results -name '*.json' -newer "$stamp" -exec cp {} "$OUT/" \;  # only this run's files
# the device brings back at most 8 files: this run's logs travel as one archive (GPU_KEEP_LOGS=1 keeps them)
logs=$(cd "$OUT" && find . -maxdepth 1 -name '*.log' -newer "$stamp" | sort)
if [ -n "$logs" ] && [ "${GPU_KEEP_LOGS:-0}" != 1 ]; then
  tar czf "$OUT/logs_${1}_$(date +%H%M%S).tgz" -C "$OUT" $logs && (cd "$OUT" && rm -f $logs)
fi
exit 0
