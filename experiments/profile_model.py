"""Where one train step's GPU time goes, by kernel category, for a whole-model run (BENCHMARKS.md §3).

  PYTHONPATH=. python experiments/profile_model.py --config mixtral_small [section.key=value ...] \
      [--steps 3] [--wall-steps 15] [--top 40] [--out PATH]

Builds the run as `moe_jax/runner.py` does (preset + overrides, synthetic data, `init_run_state`,
`make_train_step`), compiles the step ahead of time (its HLO text maps each kernel back to its HLO
instruction, op_name and Python source line; per-layer programs, the default on one device, compile at
the first step, `compile_s` is its time; their kernels map to HLO source through `--hlo-dir`, the run's XLA
dump directory, else they go by name and program, the optimizer's programs as "optimizer"), times
`--wall-steps` steps sent back to back as training sends them, then traces `--steps` steps the same way
with jax.profiler.
Prints GPU time per step by category (`CATEGORIES`) and by program, the top kernels, step wall time, GPU busy time
(union over streams), `idle_ms` = wall - busy (busy comes from the traced steps and wall from the
timed ones, so the difference is partly the GPU's speed moving between samples, not all idle time),
the GPU's idle gaps inside the traced steps (`gpu_timeline.gaps`), peak memory;
writes all of it as JSON (default experiments/results/profile_<preset>_<date>_<device>.json).
Without a GPU (tests) the trace's host-side XLA:CPU op events are reported instead, if any.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from moe_jax import metrics as M, parallel  # noqa: E402
from moe_jax.data import make_dataset  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.runner import init_run_state  # noqa: E402
from moe_jax.train import make_train_step  # noqa: E402
from gpu_timeline import busy_ns, gaps  # noqa: E402
from timing import event_stats, gpu_events_with_stats, trace  # noqa: E402

# op_name parts of attention: the cuDNN primitives (dot_product_attention_fwd/_bwd) and the einsums of
# jax.nn.dot_product_attention's XLA implementation
ATTENTION_OPS = ("dot_product_attention", "BTNH,BSNH->BNTS", "BNTS,BSNH->BTNH")
COLLECTIVE_HLO = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                  "collective-permute")


def _has(text: str, *keys: str) -> bool:
    low = text.lower()
    return any(k.lower() in low for k in keys)


# (category, predicate(kernel, op_name, hlo_op, source)); the first match wins. The op_name / source
# rules (attention, optimizer) come before the kernel-name rules: XLA names a fusion after its root
# op, so a fused attention softmax or Adam update would otherwise read as "elementwise".
CATEGORIES = (
    ("collectives", lambda k, o, h, s: _has(k, "nccl", "ep_exchange") or h.startswith(COLLECTIVE_HLO)),
    ("attention", lambda k, o, h, s: _has(o, *ATTENTION_OPS)),
    # the Adam update, and the compute-dtype weight copy XLA fuses into it (source: its convert)
    ("optimizer", lambda k, o, h, s: "optax" in s or "weight_copy.py" in s),
    ("grouped GEMM", lambda k, o, h, s: k.startswith("gmm_") or _has(o + " " + h, "ragged_dot", "ragged-dot")
     or (o.endswith("dot_general") and "grouped_matmul" in s)),  # the XLA backend of ops.grouped_matmul
    ("attention", lambda k, o, h, s: _has(k, "cudnn", "flash", "fmha", "sdpa")),
    ("dense GEMM", lambda k, o, h, s: _has(k, "gemm", "xmma", "cutlass", "nvjet", "sm90_", "gemv", "splitk")
     or _has(h, "gemm", "cublas") or o.endswith("dot_general")),
    ("reductions", lambda k, o, h, s: _has(k, "rms_norm_")),  # ops.rms_norm's Pallas kernels
    ("elementwise/fusion", lambda k, o, h, s: _has(k, "rope_", "swiglu_bwd")),  # and these (rope_qkv_*)
    ("gather/scatter", lambda k, o, h, s: _has(k + " " + h, "gather", "scatter")),
    ("reductions", lambda k, o, h, s: _has(k + " " + h, "reduce", "reduction")),
    ("copies/transposes", lambda k, o, h, s: _has(k + " " + h, "copy", "transpose", "memcpy", "memset",
                                                  "concatenate", "dynamic_update_slice", "dynamic-update-slice")),
    ("elementwise/fusion", lambda k, o, h, s: _has(k + " " + h, "fusion", "loop_", "convert", "elementwise")),
    ("other", lambda k, o, h, s: True),
)
CATEGORY_NAMES = tuple(dict.fromkeys(c for c, _ in CATEGORIES))


def category(kernel: str, op_name: str = "", hlo_op: str = "", source: str = "") -> str:
    """The time category of one kernel (see CATEGORIES)."""
    return next(c for c, pred in CATEGORIES if pred(kernel, op_name or "", hlo_op or "", source or ""))


def _section(text: str, name: str) -> dict[int, str]:
    m = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.M)
    return {} if m is None else {int(ln.split(" ", 1)[0]): ln.split(" ", 1)[1] for ln in m.group(1).splitlines()}


def hlo_metadata(text: str) -> dict[str, dict]:
    """{instruction name: {op_name, source, frames}} from a compiled module's `as_text()`. `source` is
    the innermost Python frame ("file:line function"), `frames` the whole call chain (from the module's
    StackFrames table; or the older source_file/source_line metadata)."""
    files = {k: v.strip('"') for k, v in _section(text, "FileNames").items()}
    funcs = {k: v.strip('"') for k, v in _section(text, "FunctionNames").items()}
    locs, frames = {}, {}
    for k, v in _section(text, "FileLocations").items():
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
        if m:
            locs[k] = tuple(int(x) for x in m.groups())
    for k, v in _section(text, "StackFrames").items():
        m = re.search(r"file_location_id=(\d+)(?: parent_frame_id=(\d+))?", v)
        if m:
            frames[k] = (int(m.group(1)), int(m.group(2) or 0))
    # parent ids are 1-based over the printed 1-based keys in the dumps seen so far (frame k's parent
    # is key parent-1, 0 = none); plain ids would make some frames their own parent
    shift = 1 if any(k == p for k, (_, p) in frames.items()) else 0

    def where(loc):
        f, fn, line = locs.get(loc, (0, 0, 0))
        path = files.get(f, "?")
        path = path.split("site-packages/")[-1] if "site-packages/" in path else "/".join(path.split("/")[-2:])
        return f"{path}:{line} {funcs.get(fn, '?')}"

    def chain(fid):
        out, seen = [], set()
        while fid in frames and fid not in seen and len(out) < 64:
            seen.add(fid)
            loc, parent = frames[fid]
            out.append(where(loc))
            fid = parent - shift
        return out

    meta, cache = {}, {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*$", text, re.M):
        line = m.group(0)
        op = re.search(r'op_name="((?:[^"\\]|\\.)*)"', line)
        sf = re.search(r"stack_frame_id=(\d+)", line)
        src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
        if sf:
            fr = cache.setdefault(int(sf.group(1)), chain(int(sf.group(1))))
        else:
            fr = [f"{src.group(1)}:{src.group(2)}"] if src else []
        meta[m.group(1)] = {"op_name": op.group(1) if op else "", "source": fr[0] if fr else "",
                            "frames": fr}
    return meta


def host_op_events(data, module_prefix: str = "jit_step"):
    """XLA:CPU op events of the step's module on the host plane (what a CPU trace has instead of
    kernels): [(hlo_op, start ns, duration ns, stats)]."""
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for ev in line.events:
                st = event_stats(ev)
                if "hlo_op" in st and str(st.get("hlo_module", "")).startswith(module_prefix):
                    out.append((ev.name, ev.start_ns, ev.duration_ns, st))
    return out


def _instruction(name: str, stats: dict, meta: dict) -> str:
    """The HLO instruction an event came from: its hlo_op stat (or a similar one), else the kernel
    name itself (XLA names a fusion's kernel after it, '.' -> '_')."""
    for key in ("hlo_op", "long_name", "tf_op"):
        v = str(stats.get(key, "")).split(":")[-1].strip().lstrip("%")
        if v in meta:
            return v
    for cand in (name, re.sub(r"_(\d+)$", r".\1", name)):
        if cand in meta:
            return cand
    return str(stats.get("hlo_op", ""))


# the per-layer step's optimizer programs (moe_jax/layer_update.py): their fusions are the update's
OPTIMIZER_PROGRAMS = ("jit__sumsq", "jit__finish", "jit__update")


def dump_metadata(directory) -> dict[str, dict]:
    """{"<name>#<id>", and "<name>" where only one module has that name: `hlo_metadata`} of an XLA dump
    directory's `module_<id>.<name>.*after_optimizations.txt` files (XLA_FLAGS=--xla_dump_to=DIR): the
    compiled text of the per-layer programs, which `split_time` finds by an event's hlo_module and
    program_id (both must match), else by its hlo_module alone."""
    out, names = {}, collections.Counter()
    for path in sorted(Path(directory).glob("module_*after_optimizations.txt")):
        m = re.match(r"module_(\d+)\.([^.]+)\.", path.name)
        if m is None:
            continue
        out[f"{m.group(2)}#{int(m.group(1))}"] = out[m.group(2)] = hlo_metadata(path.read_text())
        names[m.group(2)] += 1
    for name, n in names.items():
        if n > 1:  # compiled more than once (e.g. one layer_backward per layer kind): only by id
            del out[name]
    return out


def split_time(events, meta: dict, steps: int, top: int = 25, program_meta: dict | None = None):
    """Per step: ms by category and by program (the kernel's hlo_module), and the `top` (kernel, HLO
    instruction, program) rows with their share, op_name and source (one cuBLAS kernel serves many dots:
    each keeps its own row and category). `meta` maps the one-program step's kernels; `program_meta`
    (`dump_metadata`) the per-layer programs', by the event's program_id or program name. A kernel no text
    maps goes by its name and program: the optimizer's programs count as "optimizer" but for their GEMMs."""
    program_meta = program_meta or {}
    # (kernel, instruction, program, the dumped module that maps it) -> [ns, calls]: one program name
    # compiled twice (e.g. a dense and an MoE layer's backward) keeps a row per module
    per_op = collections.defaultdict(lambda: [0, 0])
    md_of = {}  # the same key -> the instruction's metadata ({} where none maps it)
    programs = collections.Counter()
    for name, _, dur, stats in events:
        program = str(stats.get("hlo_module", ""))
        pid = str(stats.get("program_id", "")).strip()
        pid = str(int(pid)) if pid.isdigit() else pid
        module = next((k for k in (f"{program}#{pid}", program) if k in program_meta), "")
        m = program_meta[module] if module else meta
        key = (name, _instruction(name, stats, m), program, module)
        md_of.setdefault(key, m.get(key[1], {}))
        row = per_op[key]
        row[0] += dur
        row[1] += 1
        programs[program or "?"] += dur / steps / 1e6
    total = sum(ns for ns, _ in per_op.values()) or 1
    mapped = sum(ns for key, (ns, _) in per_op.items() if md_of[key]) / total
    cats = collections.Counter({c: 0.0 for c in CATEGORY_NAMES})
    rows = []
    for (name, hlo, program, module), (ns, calls) in per_op.items():
        md = md_of[(name, hlo, program, module)]
        cat = category(name, md.get("op_name", ""), hlo, " < ".join(md.get("frames", [])))
        if program in OPTIMIZER_PROGRAMS and "GEMM" not in cat:
            cat = "optimizer"
        cats[cat] += ns / steps / 1e6
        rows.append({"kernel": name[:160], "ms_per_step": ns / steps / 1e6, "share": ns / total,
                     "calls_per_step": calls / steps, "category": cat, "hlo_op": hlo, "program": program,
                     "module": module,
                     "op_name": md.get("op_name", ""), "source": md.get("source", "")})
    rows.sort(key=lambda r: -r["ms_per_step"])
    split = {c: {"ms_per_step": v, "share": v * steps * 1e6 / total} for c, v in cats.items()}
    return split, rows[:top], mapped, dict(programs.most_common())


def build(config: str, overrides):
    """The runner's setup: config, (graphdef, state[, shardings]), step, data, param counts, layout."""
    cfg = load_config(config, ["train.data=synthetic", "train.tensorboard=false", "train.heatmap=false",
                               *overrides])
    mc, tc = cfg.model, cfg.train
    layout = parallel.layout_for(cfg)
    graphdef, state, shardings, counts = init_run_state(cfg, layout)
    step = make_train_step(graphdef, tc, layout=layout, shardings=shardings)
    return cfg, state, step, make_dataset(tc, mc.vocab_size), counts, layout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small", help="preset name or .yaml path")
    ap.add_argument("--steps", type=int, default=3, help="steps traced")
    ap.add_argument("--wall-steps", type=int, default=21,
                    help="steps timed (outside the trace): the median of the 20 gaps between their ends")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hlo-out", default=None, help="also write the compiled step's HLO text here (.gz: gzipped)")
    ap.add_argument("--hlo-dir", default=None,
                    help="this run's XLA dump directory (XLA_FLAGS=--xla_dump_to=DIR): maps the per-layer "
                         "programs' kernels to their HLO instruction, op_name and source line")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.param_dtype=bfloat16")
    args = ap.parse_args(argv)
    cfg, state, step, data, counts, layout = build(args.config, args.overrides)
    put = (lambda b: parallel.put_batch(b, layout)) if layout is not None else jax.device_put
    n_batches = 2 + args.wall_steps + args.steps
    batches = [data.batch(i) for i in range(n_batches)]

    t0 = time.perf_counter()
    if hasattr(step, "lower"):  # one program: compiled ahead of time, its HLO maps kernels to source
        compiled = step.lower(state, put(batches[0])).compile()
        hlo_text = compiled.as_text()
    else:  # train.programs=layers: its programs compile at the first step; kernels by name and program
        state = jax.block_until_ready(step(state, put(batches[0])))[0]
        compiled, hlo_text = step, ""
    compile_s = time.perf_counter() - t0
    if args.hlo_out:
        opener = gzip.open if args.hlo_out.endswith(".gz") else open
        with opener(args.hlo_out, "wt") as f:
            f.write(hlo_text)
    meta = hlo_metadata(hlo_text)
    hlo_summary = summarize_hlo(hlo_text)
    print("compiled step:", json.dumps(hlo_summary), flush=True)
    buffers = memory_split(compiled) if hlo_text else None
    print("XLA buffer assignment (GiB):", json.dumps(buffers), flush=True)
    box = {"state": state, "i": 0}
    del state

    def run():  # one step on the next batch, as the runner's --benchmark loop does
        box["state"], m = compiled(box["state"], put(batches[box["i"] % n_batches]))
        box["i"] += 1
        return m["loss"]

    for _ in range(2):  # warm-up
        jax.block_until_ready(run())
    # as training runs (and the PyTorch reference is timed): step i+1 is sent before step i is waited
    # for, so a step's time is the gap between the ends of consecutive steps, host dispatch hidden
    # host_ms: how long sending a step takes the host (near the step's wall time: the host waits on the
    # device for most of it, e.g. on the runtime's bound on programs in flight)
    ends, host, last = [], [], run()
    for _ in range(args.wall_steps):
        t = time.perf_counter()
        queued = run()
        host.append(time.perf_counter() - t)
        jax.block_until_ready(last)
        ends.append(time.perf_counter())
        last = queued
    jax.block_until_ready(last)
    wall = [b - a for a, b in zip(ends, ends[1:])]
    wall_ms = 1e3 * statistics.median(wall)
    data_ = trace(lambda: [run() for _ in range(args.steps)])  # back to back, like the timed steps
    events = gpu_events_with_stats(data_) if data_ is not None else []
    source = "gpu" if events else None
    if not events and data_ is not None and jax.default_backend() == "cpu":
        events = host_op_events(data_, "jit_step" if hlo_text else "jit_")
        source = "host XLA:CPU ops" if events else None
    elif not events and data_ is not None:  # a layout this parser does not know: say what there is
        print("no GPU stream events; planes:", [(pl.name, [ln.name for ln in pl.lines][:8]) for pl in data_.planes])
    program_meta = dump_metadata(args.hlo_dir) if args.hlo_dir else {}
    split, top, mapped, by_program = split_time(events, meta, args.steps, args.top, program_meta)
    idle_gaps = gaps(events, args.steps) if source == "gpu" else None
    stats_found = sorted({k for *_, st in events for k in st})
    busy = busy_ns(events) / args.steps / 1e6 if source == "gpu" else None
    span = ((max(s + d for _, s, d, _ in events) - min(s for _, s, _, _ in events)) / args.steps / 1e6
            if source == "gpu" else None)
    device = jax.devices()[0].device_kind
    tc = cfg.train
    flops_tok = M.flops_per_token(cfg.model, counts["active"], tc.seq_len)
    peak = tc.peak_tflops or M.peak_tflops()
    n_dev = 1 if layout is None else layout.num_devices
    tflops = tc.batch_size * tc.seq_len * flops_tok / (wall_ms / 1e3) / 1e12 / n_dev  # per device
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "num_devices": n_dev,
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "command": "python " + " ".join(
               [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
           "config": args.config, "overrides": list(args.overrides), "params": counts,
           "compile_s": compile_s, "wall_ms": wall_ms, "wall_ms_all": [1e3 * w for w in wall],
           "host_ms": 1e3 * statistics.median(host),
           "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
           "traced_steps": args.steps, "events_source": source, "events": len(events),
           "event_stats_found": stats_found, "hlo_mapped_share": mapped,
           "gpu_busy_ms": busy, "gpu_span_ms": span, "idle_ms": None if busy is None else wall_ms - busy,
           "peak_memory_gib": M.peak_memory_gib(), "xla_buffers_gib": buffers, "hlo": hlo_summary,
           "categories": split, "programs": by_program,
           "top_kernels": top, "gaps": idle_gaps}
    report(res)
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" / (
        f"profile_{Path(args.config).stem}_{res['date'][:10]}_{device.replace(' ', '_')}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"-> {out}")
    return res


def memory_split(compiled) -> dict | None:
    """XLA's buffer assignment for the step, GiB: the state and batch passed in (`arguments`), what
    comes out (`outputs`; `aliased`: the part written over donated arguments) and the most the step
    holds besides at once (`temp`: activations, gradients, scratch). arguments + temp + outputs −
    aliased bounds the step's own peak; the device's peak also holds what lives outside the step."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    g = lambda name: getattr(mem, name, 0) / 2**30  # noqa: E731
    return {"arguments": g("argument_size_in_bytes"), "outputs": g("output_size_in_bytes"),
            "aliased": g("alias_size_in_bytes"), "temp": g("temp_size_in_bytes"),
            "code": g("generated_code_size_in_bytes")}


def summarize_hlo(text: str) -> dict:
    """Counts in the compiled step's HLO that say whether XLA changed the program's work: custom
    calls by target (the Pallas kernels are `mosaic_gpu_v2`, cuBLAS `__cublas$...`, cuDNN attention
    `__cudnn$...`), instructions XLA rematerialized (`.remat` names), while loops, copies."""
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    names = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", text, flags=re.M)
    return {"custom_calls": dict(targets.most_common(12)),
            "remat_instructions": sum(".remat" in n for n in names),
            "while_loops": len(re.findall(r" while\(", text)),
            "copies": len(re.findall(r" copy\(", text)),
            "dynamic_update_slices": len(re.findall(r"dynamic-update-slice\(", text))}


def report(res: dict) -> None:
    f = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
    print(f"\n== {res['config']} {' '.join(res['overrides'])} on {res['device']}: wall {res['wall_ms']:.2f} ms/step "
          f"(MFU {mfu}) | host {f(res.get('host_ms'))} ms | GPU busy {f(res['gpu_busy_ms'])} ms | wall - busy "
          f"{f(res['idle_ms'])} ms | span "
          f"{f(res['gpu_span_ms'])} ms | peak {f(res['peak_memory_gib'])} GiB | compile {res['compile_s']:.1f} s")
    if not res["events"]:
        print("no GPU events (and no host XLA op events) in the trace: wall time only")
        return
    print(f"events: {res['events']} from {res['events_source']}; stats found: {res['event_stats_found']}; "
          f"{100 * res['hlo_mapped_share']:.1f}% of the time mapped to an HLO instruction")
    print(f"{'category':<20} {'ms/step':>9} {'share':>7}")
    for cat, v in sorted(res["categories"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        print(f"{cat:<20} {v['ms_per_step']:9.3f} {100 * v['share']:6.1f}%")
    print("by program (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in res.get("programs", {}).items()))
    print(f"\ntop {len(res['top_kernels'])} (kernel, HLO op): ms/step, share, calls/step, category, kernel | HLO op "
          f"| program | op_name | source")
    for r in res["top_kernels"]:
        print(f"{r['ms_per_step']:9.3f} {100 * r['share']:5.1f}% {r['calls_per_step']:6.1f} {r['category']:<18} "
              f"{r['kernel'][:70]} | {r['hlo_op']} | {r.get('program', '')} | {r['op_name'][-90:]} | {r['source']}")
    g = res.get("gaps")
    if g:
        by_len = ", ".join(f"{k} {v['ms_per_step']:.2f} ms ({v['count_per_step']:.0f})"
                           for k, v in g["buckets"].items())
        print(f"\nGPU idle inside the span: {g['ms_per_step']:.3f} ms/step in {g['count_per_step']:.0f} gaps; "
              f"by length: {by_len}")
        for r in g["top"]:
            print(f"{r['ms_per_step']:9.3f} {r['count_per_step']:6.1f}  {r['before']}  ->  {r['after']}")


if __name__ == "__main__":
    main()
