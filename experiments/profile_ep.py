"""Where the expert-parallel MoE layer's time goes, from a profiler trace, plus a sweep of the
peer-memory all-to-all's chunk size and SMEM slots.

  PYTHONPATH=. python3 experiments/profile_ep.py --variants local:1,alltoall_ragged:2,alltoall:2 \
      --tune --out results.json

For each variant (bench_ep.VARIANTS name : GPUs) it traces a few fwd+bwd steps of the mixtral_small
MoE layer and sums GPU 0's kernel time by op name (per step), next to the step's wall time: the
difference is GPU idle time (host syncs, launch gaps). Every GPU's time is also split by kind
(exchange, gemm, nccl, xla: the Pallas kernels carry names) with its busy time; `--timeline`
keeps one step's GPU 0 kernel sequence. `--tune` times `ops.all_to_all` alone, chained inside one
jit, for several (chunk bytes, slots) at three sizes, so fixed cost and bandwidth can be told
apart, with `lax.all_to_all` of the same rows beside it.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import bench_ep  # noqa: E402
from moe_jax import parallel  # noqa: E402
from moe_jax.config import ParallelConfig  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from timing import gpu_events, median_seconds, trace  # noqa: E402


def category(op: str) -> str:
    """What a kernel is, for the time split (the Pallas kernels carry their kernel_name)."""
    if op.startswith("ep_exchange"):
        return "exchange"
    if op.startswith("gmm_"):
        return "gemm"
    if "nccl" in op.lower() or "MultiGpuBarrier" in op:
        return "nccl"
    return "xla"


def _busy_ns(events):
    """Time covered by at least one event (streams may overlap)."""
    total, end = 0, None
    for _, s, d in events:
        if end is None or s >= end:
            total, end = total + d, s + d
        elif s + d > end:
            total, end = total + s + d - end, s + d
    return total


def kernel_times(data, device: int = 0):
    """{op name: total ns} over GPU `device`'s streams of a trace, and (first start, last end) in ns."""
    ev = gpu_events(data, device)
    per_op = collections.Counter()
    for name, _, d in ev:
        per_op[name] += d
    if not ev:  # a layout this parser does not know: say what there is
        print("no GPU stream events; planes:", [(pl.name, [ln.name for ln in pl.lines][:8])
                                                for pl in data.planes], flush=True)
        return per_op, (None, None)
    return per_op, (ev[0][1], max(s + d for _, s, d in ev))


def device_split(data, n: int, steps: int):
    """Per GPU and step of a trace: ms by category, busy ms (union of events) and span ms."""
    rows = []
    for dev in range(n):
        ev = gpu_events(data, dev)
        if not ev:
            continue
        cat = collections.Counter()
        for name, _, d in ev:
            cat[category(name)] += d / steps / 1e6
        rows.append({"gpu": dev, **{k: round(v, 4) for k, v in sorted(cat.items())},
                     "busy_ms": _busy_ns(ev) / steps / 1e6,
                     "span_ms": (max(s + d for _, s, d in ev) - ev[0][1]) / steps / 1e6})
    return rows


def timeline(data, device: int = 0):
    """A one-step trace's GPU `device` events: [op, start us, duration us] from its first kernel."""
    ev = gpu_events(data, device)
    t0 = ev[0][1] if ev else 0
    return [[name[:80], round((s - t0) / 1e3, 2), round(d / 1e3, 2)] for name, s, d in ev]


def gaps(tl, top=8):
    """The idle stretches of a timeline ([op, start us, duration us]): total idle us and the
    `top` longest as (idle us, the op that follows)."""
    out, end = [], None
    for name, st, d in tl:
        if end is not None and st > end:
            out.append((round(st - end, 2), name))
        end = st + d if end is None else max(end, st + d)
    return round(sum(g for g, _ in out), 2), sorted(out, reverse=True)[:top]


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(step, *args):
    """The compiled step's collective ops: "result shape = op ... op_name" (one line each)."""
    out = []
    for line in step.lower(*args).compile().as_text().splitlines():
        line = line.strip()
        op = next((c for c in COLLECTIVES if f" {c}(" in line or f" {c}-start(" in line), None)
        if op and "=" in line:
            name = re.search(r'op_name="([^"]*)"', line)
            out.append(f"{line.split('=')[0].strip()} = {line.split('=')[1].split(op)[0].strip()} "
                       f"{op} {name.group(1) if name else ''}")
    return out


def profile_variant(cfg, name, n, tokens_per_gpu, seq, steps, with_timeline=False,
                    with_collectives=False):
    kw = {} if n == 1 else dict(bench_ep.VARIANTS[name])
    layout = None if n == 1 else parallel.make_layout(ParallelConfig(data=n, expert=n), cfg,
                                                      devices=jax.devices()[:n])
    step, params, x, _ = bench_ep._layer_step(cfg, layout, n, tokens_per_gpu, seq, **kw)
    wall = median_seconds(step, params, x, iters=10)
    coll = collectives(step, params, x) if with_collectives else None
    data = trace(step, params, x, calls=steps)  # parsed once, read per device below
    per_op, (lo, hi) = kernel_times(data)
    split = device_split(data, n, steps)
    tl = timeline(trace(step, params, x)) if with_timeline else None
    busy = sum(per_op.values()) / steps / 1e6
    top = [{"op": k[:120], "ms_per_step": v / steps / 1e6} for k, v in per_op.most_common(30)]
    row = {"variant": f"{name}:{n}", "gpus": n, "wall_ms": 1e3 * wall, "gpu0_kernel_ms": busy,
           "gpu0_span_ms_per_step": None if lo is None else (hi - lo) / steps / 1e6,
           "per_gpu": split, "top_ops": top}
    if coll is not None:
        row["collectives"] = coll
        print("   collectives:", *coll, sep="\n     ")
    if tl is not None:
        row["timeline_gpu0"] = tl
        row["idle_us_gpu0"], row["top_gaps_gpu0"] = gaps(tl)
    print(f"\n== {name} on {n} GPU(s): wall {1e3 * wall:.3f} ms/step, GPU0 kernels {busy:.3f} ms/step")
    for r in split:
        print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    if tl:
        print(f"   GPU0 idle in one step: {row['idle_us_gpu0']} us; longest gaps (us, next op):",
              row["top_gaps_gpu0"])
    for t in top[:20]:
        print(f"   {t['ms_per_step']:8.3f}  {t['op']}")
    return row


def tune_exchange(n, d, dtype, iters, chain=8):
    """The exchange alone, `chain` dependent calls inside one jit so that launch and host sync are
    amortized: ms per exchange for several (chunk bytes, SMEM slots) at three sizes (64 rows to
    each destination shows the fixed cost: handshake and completion), NCCL `all_to_all` of the
    same rows beside it."""
    from ops import all_to_all
    mesh = parallel.make_layout(ParallelConfig(data=n, expert=n), devices=jax.devices()[:n]).moe_mesh
    out = []

    def timed(body, a):
        def f(x):
            for _ in range(chain):
                x = body(x)
            return x
        g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"),
                                  check_vma=False))
        return median_seconds(g, a, iters=iters) / chain

    for rows in (64 * n, 16384, 65536):
        per = jnp.full((n,), rows // n, jnp.int32)
        off = jnp.arange(n, dtype=jnp.int32) * (rows // n)
        a = jax.device_put(jax.random.normal(jax.random.key(0), (n * rows, d), dtype),
                           NamedSharding(mesh, P("expert")))
        nbytes = (n - 1) / n * rows * d * jnp.dtype(dtype).itemsize
        for chunk, slots in ((32768, 4), (65536, 2), (16384, 8), (65536, 3), (32768, 6)):
            def body(x, chunk=chunk, slots=slots):
                land = jnp.full((n,), jax.lax.axis_index("expert") * (rows // n), jnp.int32)
                return all_to_all._pallas(x, rows, off, per, land, per, axis_name="expert",
                                          num_sms=all_to_all._exchange_sms(), chunk_bytes=chunk,
                                          slots=slots)
            row = {"impl": "pallas", "gpus": n, "rows": rows, "chunk_bytes": chunk, "slots": slots}
            try:
                t = timed(body, a)
                row.update(ms=1e3 * t, GB_per_s=nbytes / t / 1e9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            print("tune", row, flush=True)
            out.append(row)
        t = timed(lambda x: jax.lax.all_to_all(x.reshape(n, -1, d), "expert", 0, 0).reshape(-1, d), a)
        row = {"impl": "lax.all_to_all", "gpus": n, "rows": rows, "ms": 1e3 * t,
               "GB_per_s": nbytes / t / 1e9}
        print("tune", row, flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small")
    ap.add_argument("--variants", default="local:1,alltoall_ragged:2,alltoall:2")
    ap.add_argument("--tokens-per-gpu", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--timeline", action="store_true", help="save one step's GPU 0 kernel timeline")
    ap.add_argument("--collectives", action="store_true", help="list the compiled step's collectives")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base = load_config(args.config)
    cfg = dataclasses.replace(base.model, num_layers=1, moe=dataclasses.replace(base.model.moe, layer_freq=1))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
           "command": "python " + " ".join(sys.argv), "profiles": [], "tune": []}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
    if args.tune and jax.device_count() > 1:
        for n in sorted({2, jax.device_count()}):
            res["tune"] += tune_exchange(n, cfg.d_model, jnp.dtype(cfg.dtype), 10)
        save()
    for v in args.variants.split(","):
        name, n = v.split(":")
        if int(n) > jax.device_count():
            continue
        try:
            res["profiles"].append(profile_variant(cfg, name, int(n), args.tokens_per_gpu, args.seq,
                                                   args.steps, args.timeline, args.collectives))
        except Exception as e:
            print("profile failed", v, type(e).__name__, str(e)[:300], flush=True)
            res["profiles"].append({"variant": v, "error": f"{type(e).__name__}: {e}"[:500]})
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
