"""Expert-parallel benchmark (BENCHMARKS.md §4): the `mixtral_small` MoE layer, forward + backward, at
the same per-GPU work on 1, 2, 4 GPUs (EP = number of GPUs), per dispatcher and overlap chunking;
plus the all-to-all alone (time, bytes) and a correctness check of every dispatcher against the
single-device layer.

  PYTHONPATH=. python3 experiments/bench_ep.py --check --gpus 1,2,4 --out results.json

tokens/s per GPU = per-GPU tokens / step time; weak scaling(n) = tokens/s/GPU(n) / tokens/s/GPU(1).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from moe_jax import ep, parallel  # noqa: E402
from moe_jax.config import ModelConfig, MoEConfig, ParallelConfig, with_dispatcher  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.moe import MoELayer  # noqa: E402
from timing import median_seconds  # noqa: E402


def _layer_step(cfg: ModelConfig, layout, n, tokens_per_gpu, seq, layers=1, **ep_kw):
    """A jitted fwd+bwd of `layers` MoE layers in a row (residual) over n devices, their params and
    the input. More than one layer spreads the per-step costs (launch skew between the GPUs, the
    first exchange's wait) the way a model's step does. `ep_kw`: `moe.dispatcher` fields."""
    cfg = with_dispatcher(cfg, **ep_kw)
    gds, params = zip(*(nnx.split(MoELayer(cfg, rngs=nnx.Rngs(i))) for i in range(layers)))
    gd, params = gds[0], list(params)
    b = n * tokens_per_gpu // seq
    x = jax.random.normal(jax.random.key(1), (b, seq, cfg.d_model), jnp.dtype(cfg.dtype))
    ct = jax.random.normal(jax.random.key(2), x.shape, x.dtype)  # random cotangent

    def loss(params, x):
        dropped = jnp.zeros((), jnp.int32)
        for g, p in zip(gds, params):
            y, aux = nnx.merge(g, p)(x, layout=layout)
            x, dropped = (x + y if layers > 1 else y), dropped + aux["dropped"]
        return jnp.sum(x.astype(jnp.float32) * ct.astype(jnp.float32)), dropped

    def step(params, x):
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def pair_counts(params, x):  # assignments per (source shard, destination GPU), to see the buffer fill
        routing = nnx.merge(gd, params[0]).router(x.reshape(-1, cfg.d_model))
        dest = routing.experts.reshape(n * ep_kw.get("overlap_chunks", 1), -1) // (cfg.moe.num_experts // n)
        return jax.vmap(lambda d: jnp.bincount(d, length=n))(dest).max()

    if layout is None:
        dev = jax.devices()[0]
        params, x = jax.device_put((params, x), dev)
        return jax.jit(step), params, x, jax.jit(pair_counts)
    ps = parallel.tree_shardings(params, layout)
    xs = NamedSharding(layout.mesh, P(("data", "fsdp")))
    params, x = jax.device_put(params, ps), jax.device_put(x, xs)
    return jax.jit(step, in_shardings=(ps, xs)), params, x, jax.jit(pair_counts)


# benchmark variants: name -> `moe.dispatcher` fields (DispatchConfig; buffers are per (source,
# dest) pair for alltoall, received rows per device for the ragged dispatcher)
VARIANTS = {
    "local": {},
    "alltoall": dict(type="alltoall"),                                  # 2x buffer, fallback
    "alltoall_worst": dict(type="alltoall", buffer_factor=None),        # always worst case
    "alltoall_nofallback": dict(type="alltoall", fallback=False),
    "alltoall_tight": dict(type="alltoall", buffer_factor=1.25),
    "alltoall_ragged": dict(type="alltoall_ragged"),  # auto: pallas (expert-major) on Hopper
    "ragged_tight": dict(type="alltoall_ragged", buffer_factor=1.25),
    "ragged_worst": dict(type="alltoall_ragged", buffer_factor=None),  # worst case: no cond
    "ragged_xla": dict(type="alltoall_ragged", ragged_impl="xla"),
    # segments per (destination, local expert), no re-sort: the default on the Pallas exchange
    "ragged_direct": dict(type="alltoall_ragged", expert_major=True),
    "ragged_sorted": dict(type="alltoall_ragged", expert_major=False),  # packed by source, re-sort
    "ragged_direct_tight": dict(type="alltoall_ragged", expert_major=True, buffer_factor=1.25),
    "allgather": dict(type="allgather"),
}


def bench_layer(cfg, n, tokens_per_gpu, seq, iters, layers=1, **ep_kw):
    devices = jax.devices()[:n]
    layout = None if n == 1 else parallel.make_layout(ParallelConfig(data=n, expert=n), cfg,
                                                      devices=devices)
    step, params, x, pair_counts = _layer_step(cfg, layout, n, tokens_per_gpu, seq, layers, **ep_kw)
    chunk_tokens = tokens_per_gpu // ep_kw.get("overlap_chunks", 1)
    disp = ep_kw.get("type", "alltoall")
    factor = ep_kw.get("buffer_factor", cfg.moe.dispatcher.buffer_factor if layout else None)
    fast, worst = ep.buffer_rows(disp, chunk_tokens, cfg.moe, n, cfg.moe.num_experts // n, factor)
    t0 = time.perf_counter()
    (_, dropped), _ = jax.block_until_ready(step(params, x))
    compile_s = time.perf_counter() - t0
    t = median_seconds(step, params, x, iters=iters)
    m = cfg.moe
    flops = 6 * 3 * cfg.d_model * m.ffn_hidden_size * m.router_topk * tokens_per_gpu * layers  # fc1(x2)+fc2
    return {"gpus": n, "step_ms": 1e3 * t, "layers": layers, "ms_per_layer": 1e3 * t / layers,
            "tokens_per_s_per_gpu": tokens_per_gpu / t,
            "expert_tflops_per_gpu": flops / t / 1e12, "dropped": int(dropped),
            "compile_s": compile_s, "max_pair_count": int(pair_counts(params, x)), "fast_buffer_rows": fast,
            "worst_buffer_rows": worst,
            **{k: v for k, v in ep_kw.items()}}


def bench_all_to_all(n, rows, d, dtype, iters):
    """One `all_to_all` of [n, rows/n, d] per device over n GPUs: time and bytes leaving a device."""
    mesh = parallel.make_layout(ParallelConfig(data=n, expert=n), devices=jax.devices()[:n]).moe_mesh
    f = jax.jit(jax.shard_map(lambda a: jax.lax.all_to_all(a, "expert", 0, 0), mesh=mesh,
                              in_specs=P(None, "expert"), out_specs=P(None, "expert")))
    a = jax.device_put(jnp.ones((n, n * (rows // n), d), dtype), NamedSharding(mesh, P(None, "expert")))
    t = median_seconds(f, a, iters=iters)
    nbytes = (n - 1) / n * rows * d * jnp.dtype(dtype).itemsize
    return {"gpus": n, "rows_per_device": rows, "ms": 1e3 * t, "bytes_out_per_device": nbytes,
            "GB_per_s": nbytes / t / 1e9}


def bench_ragged(n, rows, d, dtype, iters, backend):
    """One `ops.all_to_all.ragged_all_to_all` per device over n GPUs, rows/n to each device (packed):
    time and bytes leaving a device."""
    from ops import all_to_all
    mesh = parallel.make_layout(ParallelConfig(data=n, expert=n), devices=jax.devices()[:n]).moe_mesh
    per = jnp.full((n,), rows // n, jnp.int32)
    off = jnp.arange(n, dtype=jnp.int32) * (rows // n)
    me_off = lambda: jax.lax.axis_index("expert") * (rows // n)  # noqa: E731  where mine land

    def f(a):
        return all_to_all.ragged_all_to_all(a, rows, off, per, jnp.full((n,), me_off(), jnp.int32), per,
                                            axis_name="expert", backend=backend, packed=True)
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n * rows, d), dtype),
                       NamedSharding(mesh, P("expert")))
    t = median_seconds(g, a, iters=iters)
    nbytes = (n - 1) / n * rows * d * jnp.dtype(dtype).itemsize
    return {"gpus": n, "rows_per_device": rows, "ms": 1e3 * t, "bytes_out_per_device": nbytes,
            "GB_per_s": nbytes / t / 1e9, "impl": f"ragged_{backend}"}


def probe_backend(backend: str):
    """The requested grouped-GEMM backend if its fwd+bwd runs here, else "xla" (and why)."""
    if backend == "xla":
        return backend, None
    import ops
    x = jnp.ones((512, 256), jnp.bfloat16)
    w = jnp.ones((2, 256, 256), jnp.bfloat16)
    gs = jnp.array([100, 300], jnp.int32)
    f = lambda x, w: ops.grouped_matmul(x, w, gs, backend=backend).astype(jnp.float32).sum()  # noqa: E731
    try:
        jax.block_until_ready(jax.jit(jax.grad(f, argnums=(0, 1)))(x, w))
        return backend, None
    except Exception as e:
        why = f"{backend} failed ({type(e).__name__}: {str(e)[:200]}); using xla"
        print(why, flush=True)
        return "xla", why


CHECK_TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def check(dispatchers, eps, dtype="float32"):
    """Every dispatcher vs the single-device layer (outputs and all gradients). float32: XLA's
    grouped GEMM, tolerance 1e-5. bfloat16: the default grouped-GEMM backend (the Pallas kernels
    on Hopper) on both sides, tolerance 3e-2 (bf16 roundings in a different row order) — what
    catches gradient plumbing errors of the kernels under shard_map, which are O(1)."""
    prev = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    bf16 = dtype == "bfloat16"
    m = MoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=128 if bf16 else 64,
                  grouped_gemm_backend="auto" if bf16 else "xla")
    cfg = ModelConfig(vocab_size=64, d_model=128 if bf16 else 32, num_layers=1, num_heads=2,
                      num_kv_heads=2, moe=m, dtype=dtype)
    params = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(0)))[1]
    x = jax.random.normal(jax.random.key(1), (8, 32, cfg.d_model), jnp.dtype(dtype))

    def run(layout, **kw):
        gd = nnx.split(MoELayer(with_dispatcher(cfg, **kw), rngs=nnx.Rngs(0)))[0]

        def loss(params, x):
            y, _ = nnx.merge(gd, params)(x, layout=layout)
            y = y.astype(jnp.float32)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)), y

        (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        return [y] + jax.tree.leaves(g)

    ref = [a.astype(jnp.float32) for a in run(None)]
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) /  # noqa: E731
                             (jnp.max(jnp.abs(b)) + 1e-30))
    out = []
    for disp in dispatchers:
        for n_ep, etp in eps:
            row = {"dispatcher": disp, "ep": n_ep, "etp": etp, "dtype": dtype}
            try:
                layout = parallel.make_layout(ParallelConfig(data=-1, expert=n_ep, expert_tensor=etp),
                                              cfg, devices=jax.devices()[:n_ep * etp])
                base = {k: v for k, v in VARIANTS.get(disp, {"type": disp}).items()
                        if k != "buffer_factor"}
                kws = [base]
                if base["type"] != "allgather":  # both the fast buffer and the worst-case branch
                    kws = [dict(base, buffer_factor=2.0), dict(base, buffer_factor=0.25)]
                errs = [max(rel(a, b) for a, b in zip(run(layout, **kw), ref)) for kw in kws]
                row.update(max_rel_err=max(errs), ok=max(errs) < CHECK_TOL[dtype])
            except Exception as e:  # record and go on: one failure must not lose the other numbers
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            print("check", row, flush=True)
            out.append(row)
    jax.config.update("jax_default_matmul_precision", prev)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small")
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--tokens-per-gpu", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--plan", default="1:local:1,4:alltoall:1,2:alltoall:1,4:alltoall:4,"
                    "4:alltoall_nofallback:1,4:alltoall_ragged:1,4:alltoall_tight:4,2:alltoall:4,"
                    "4:alltoall:2,4:allgather:1,4:alltoall_worst:1,2:alltoall_ragged:1,"
                    "4:alltoall_nofallback:4,2:allgather:1",
                    help="gpus:dispatcher:chunks,... in run order (alltoall_worst: always the worst-case "
                    "buffer; alltoall_nofallback: the 2x buffer without the dropless fallback branch; "
                    "alltoall_tight: a 1.25x buffer, still dropless; see VARIANTS)")
    ap.add_argument("--ragged", type=lambda v: [b for b in v.split(",") if b], default=["pallas"],
                    help="ragged exchange backends to time alone (comma list of pallas, xla; '' none)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="start no new layer run after this many seconds of layer runs")
    ap.add_argument("--backend", default="auto", help="grouped GEMM backend (auto = pallas on Hopper)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=1,
                    help="MoE layers per timed step (more spread the per-step costs as a model does)")
    ap.add_argument("--check", nargs="?", const="alltoall,alltoall_ragged,allgather", default="",
                    help="also check these dispatchers or VARIANTS (comma list; the three dispatchers when given "
                    "alone) vs one device")
    ap.add_argument("--check-dtypes", default="float32,bfloat16",
                    help="--check in these dtypes (bfloat16: the Pallas GEMMs on Hopper)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    allowed = {int(g) for g in args.gpus.split(",")}
    plan = [(int(g), d, int(c)) for g, d, c in (p.split(":") for p in args.plan.split(","))
            if int(g) <= jax.device_count() and int(g) in allowed]
    gpus = sorted({g for g, _, _ in plan})
    base = load_config(args.config)
    backend, why = probe_backend(args.backend)
    cfg = dataclasses.replace(base.model, num_layers=1,
                              moe=dataclasses.replace(base.model.moe, grouped_gemm_backend=backend,
                                                      layer_freq=1))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
           "jax": jax.__version__, "command": "python " + " ".join(sys.argv), "config": args.config,
           "tokens_per_gpu": args.tokens_per_gpu, "seq": args.seq, "dtype": cfg.dtype,
           "d_model": cfg.d_model, "moe": dataclasses.asdict(cfg.moe), "layer": [], "all_to_all": [],
           "gemm_backend": backend, "gemm_backend_note": why}
    out = Path(args.out) if args.out else None

    def save():
        if out is not None:
            out.write_text(json.dumps(res, indent=2))

    if args.check:
        multi = [n for n in gpus if n > 1]
        eps = [(n, 1) for n in multi] + ([(2, 2)] if jax.device_count() >= 4 else
                                          [(1, 2)] if jax.device_count() >= 2 else [])
        res["check"] = []
        for dtype in args.check_dtypes.split(","):
            res["check"] += check(args.check.split(","), eps, dtype)
            save()
    # all-to-all alone: the fast dropless buffer (2x balanced share) and the worst-case one
    m, t = cfg.moe, args.tokens_per_gpu
    for n in [g for g in gpus if g > 1]:
        for name, rows in (("fast", n * ep.round_up(t * m.router_topk / n * 2.0, 8)),
                           ("worst", n * ep.fixed_capacity(t, m, n))):
            try:
                row = bench_all_to_all(n, rows, cfg.d_model, jnp.dtype(cfg.dtype), args.iters)
                row["buffer"] = name
            except Exception as e:
                row = {"gpus": n, "buffer": name, "error": f"{type(e).__name__}: {e}"[:500]}
            print("all_to_all", row, flush=True)
            res["all_to_all"].append(row)
            save()
        for backend in args.ragged:  # the ragged exchange of the dispatcher's real rows (T·k)
            try:
                row = bench_ragged(n, t * m.router_topk, cfg.d_model, jnp.dtype(cfg.dtype), args.iters,
                                   backend)
            except Exception as e:
                row = {"gpus": n, "impl": f"ragged_{backend}", "error": f"{type(e).__name__}: {e}"[:500]}
            print("all_to_all", row, flush=True)
            res["all_to_all"].append(row)
            save()
    t_start = time.perf_counter()  # the budget is for the layer runs (the check comes first)
    for n, disp, chunks in plan:
        if time.perf_counter() - t_start > args.budget_s:
            print("budget reached: skipping", n, disp, chunks, flush=True)
            continue
        if disp not in VARIANTS:
            raise SystemExit(f"unknown variant {disp!r}: one of {list(VARIANTS)}")
        kw = {} if n == 1 else dict(VARIANTS[disp], overlap_chunks=chunks)
        try:
            row = bench_layer(cfg, n, args.tokens_per_gpu, args.seq, args.iters, args.layers, **kw)
        except Exception as e:
            traceback.print_exc()
            row = {"gpus": n, "error": f"{type(e).__name__}: {e}"[:800]}
        row["variant"] = f"{disp}:{chunks}"
        print("layer", row, flush=True)
        res["layer"].append(row)
        summarize(res, quiet=True)
        save()
    summarize(res)
    save()
    return 0


def summarize(res, quiet=False):
    """Weak scaling per variant, exposed communication, overlap gain."""
    layer = [r for r in res["layer"] if "error" not in r]
    base = next((r for r in layer if r["gpus"] == 1), None)
    summ = {}
    for r in layer:
        if base and r["gpus"] > 1:
            r["weak_scaling"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            r["exposed_ms_vs_1gpu"] = r["step_ms"] - base["step_ms"]
    for n in sorted({r["gpus"] for r in layer if r["gpus"] > 1}):
        rows = {r["variant"]: r for r in layer if r["gpus"] == n}
        best = min(rows.values(), key=lambda r: r["step_ms"])
        s = {"best_variant": best["variant"], "best_weak_scaling": best.get("weak_scaling")}
        # overlap gain per dispatcher: its best chunked run against its 1-chunk run
        for name in {v.split(":")[0] for v in rows}:
            runs = [r for k, r in rows.items() if k.split(":")[0] == name]
            one = rows.get(f"{name}:1")
            if one and len(runs) > 1:
                s[f"overlap_gain_{name}"] = one["step_ms"] / min(r["step_ms"] for r in runs) - 1
        # the exchange the best variant uses, timed alone: a layer's fwd+bwd runs 4 of them
        # (dispatch, combine and their transposes)
        kw = VARIANTS.get(best["variant"].split(":")[0], {})
        ragged = kw.get("type") == "alltoall_ragged"
        impl = f"ragged_{kw.get('ragged_impl', 'pallas')}"
        a2a = None if kw.get("type") == "allgather" else next(
            (a for a in res["all_to_all"] if a["gpus"] == n and "error" not in a and
             (a.get("impl") == impl if ragged else a.get("buffer") == "fast")), None)
        if a2a:
            comm = 4 * a2a["ms"]
            exposed = best.get("exposed_ms_vs_1gpu")
            s.update(a2a_ms_per_layer_step=comm, exposed_ms_best=exposed,
                     # > 0: part of the exchange time is hidden; < 0: more than it is exposed
                     # (the dispatch's own sorting/gathers add to it)
                     hidden_ms_best=None if exposed is None else comm - exposed)
        summ[str(n)] = s
    res["summary"] = summ
    if not quiet:
        print("summary", json.dumps(summ, indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())
