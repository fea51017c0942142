"""Grouped GEMM benchmark (BENCHMARKS.md §1): dense x@w of the same FLOPs, XLA ragged_dot, ours.

Forward, and forward+dgrad+wgrad through jax.vjp with a random cotangent; Dirichlet-uneven group
sizes (one group forced to 0) and uniform ones; median of --reps timed calls after warm-up.
Prints a table and writes experiments/results/grouped_matmul_<date>_<device>.json.

  PYTHONPATH=. python3 experiments/bench_grouped_matmul.py [--rows 0,1,2,3,4] [--torch]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

import jax
import jax.numpy as jnp

from ops import grouped_matmul
from timing import device_ms, median_seconds  # noqa: E402

ROWS = [  # (E, M, K, N, name)
    (8, 32768, 4096, 14336, "Mixtral-8x7B fc1"),
    (8, 32768, 14336, 4096, "Mixtral-8x7B fc2"),
    (16, 32768, 2048, 4096, "mid-size"),
    (64, 65536, 2048, 1408, "DeepSeek-MoE-16B-like fc1"),
    (64, 65536, 1408, 2048, "DeepSeek-MoE-16B-like fc2"),
]


def group_sizes(e, m, pattern, seed=0):
    """Dirichlet(1)-uneven sizes with group 1 forced to 0, or uniform; sum == m."""
    if pattern == "uniform":
        sizes = np.full(e, m // e)
        sizes[-1] += m - sizes.sum()
        return sizes.astype(np.int32)
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(e))
    p[1] = 0.0
    p /= p.sum()
    sizes = np.floor(p * m).astype(np.int64)
    sizes[np.argmax(sizes)] += m - sizes.sum()
    return sizes.astype(np.int32)


def make_fns(backend):
    if backend == "dense":
        def fwd(x, w, gs, dy):
            return x @ w
    elif backend == "ragged_dot":  # XLA's op with JAX's own VJP
        def fwd(x, w, gs, dy):
            return jax.lax.ragged_dot(x, w, gs)
    else:
        def fwd(x, w, gs, dy):
            return grouped_matmul(x, w, gs, backend=backend)

    def fwd_bwd(x, w, gs, dy):
        y, vjp = jax.vjp(lambda x, w: fwd(x, w, gs, dy), x, w)
        return (y, *vjp(dy))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def bench_row(e, m, k, n, pattern, backends, reps, xla_reps, profile=False):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(jnp.bfloat16)
    sizes = group_sizes(e, m, pattern)
    gs = jnp.asarray(sizes)
    flops = 2.0 * m * k * n
    out = {"E": e, "M": m, "K": k, "N": n, "pattern": pattern, "group_sizes": sizes.tolist()}
    ref_y = None
    for b in ["dense", *backends]:
        wb = w[0] if b == "dense" else w
        f, fb = make_fns(b)
        r = xla_reps if b in ("xla", "ragged_dot") else reps
        try:
            y = f(x, wb, gs, dy)
            if b != "dense":  # correctness against XLA's ragged_dot on the same inputs
                if ref_y is None:
                    ref_y = np.asarray(grouped_matmul(x, w, gs, backend="xla"), np.float32)
                yn = np.asarray(y, np.float32)
                out[f"{b}_rel_err"] = float(np.linalg.norm(yn - ref_y) / np.linalg.norm(ref_y))
            t_f = median_seconds(f, x, wb, gs, dy, iters=r, warmup=3)
            t_fb = median_seconds(fb, x, wb, gs, dy, iters=r, warmup=3)
            out[b] = {"fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                      "fwd_tflops": flops / t_f / 1e12, "fwd_bwd_tflops": 3 * flops / t_fb / 1e12}
            if profile:  # GPU kernel time per call (no host dispatch/sync), beside the wall time
                out[b].update(fwd_gpu_ms=device_ms(f, x, wb, gs, dy),
                              fwd_bwd_gpu_ms=device_ms(fb, x, wb, gs, dy))
        except Exception as ex:  # keep the other columns
            out[b] = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
        print(f"  E={e} {k}->{n} {pattern:8s} {b:7s} {out[b]}", flush=True)
    return out


def torch_column(spec, reps):
    """torch._grouped_mm in its own process, run before JAX touches the GPU (its own allocator):
    experiments/bench_grouped_matmul_torch.py. Returns one dict per spec row."""
    path = pathlib.Path("/tmp/gmm_torch_in.json")
    path.write_text(json.dumps({"rows": spec, "reps": reps}))
    script = pathlib.Path(__file__).with_name("bench_grouped_matmul_torch.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                          text=True, env=env, timeout=900)
    print(proc.stderr[-2000:], file=sys.stderr)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:
        print("torch column failed:", proc.stdout[-2000:])
        return [{"error": "torch subprocess failed"}] * len(spec)


def best_dense(rows_out, keys):
    """{(E, K, N, key): ms}: dense depends on the shape only, so each shape's dense time is the
    faster of its measurements (conservative for our share)."""
    best = {}
    for r in rows_out:
        for key in keys:
            v = r.get("dense", {}).get(key)
            if v:
                k = (r["E"], r["K"], r["N"], key)
                best[k] = min(best.get(k, v), v)
    return best


def table(rows_out):
    lines = ["| row | groups | dense fwd ms | ragged_dot fwd | ours fwd | torch fwd | "
             "dense f+b ms | ragged_dot f+b | ours f+b | torch f+b |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    best = best_dense(rows_out, ("fwd_ms", "fwd_bwd_ms"))

    def pct(r, b, key):
        d = best.get((r["E"], r["K"], r["N"], key))
        v = r.get(b, {}).get(key)
        return f"{100 * d / v:.0f}% ({v:.2f})" if d and v else "–"

    for r in rows_out:
        d = {key: best.get((r["E"], r["K"], r["N"], key), 0) for key in ("fwd_ms", "fwd_bwd_ms")}
        lines.append(
            f"| E={r['E']} {r['K']}->{r['N']} | {r['pattern']} | {d.get('fwd_ms', 0):.2f} | "
            f"{pct(r, 'ragged_dot', 'fwd_ms')} | {pct(r, 'pallas', 'fwd_ms')} | "
            f"{pct(r, 'torch', 'fwd_ms')} | {d.get('fwd_bwd_ms', 0):.2f} | "
            f"{pct(r, 'ragged_dot', 'fwd_bwd_ms')} | {pct(r, 'pallas', 'fwd_bwd_ms')} | "
            f"{pct(r, 'torch', 'fwd_bwd_ms')} |")
    if any("fwd_gpu_ms" in r.get("pallas", {}) for r in rows_out):
        lines += ["", gpu_table(rows_out)]
    return "\n".join(lines)


def gpu_table(rows_out):
    """Shares of dense by GPU time: ours and dense from profiler traces (kernel time, no host
    dispatch); torch against torch's own dense matmul, both by CUDA events in its process."""
    lines = ["By GPU time (ours: profiler kernel time vs the same for dense; torch: CUDA events vs "
             "torch's own dense)",
             "| row | groups | dense fwd / f+b GPU ms | ours fwd | ours f+b | torch fwd | torch f+b |",
             "|---|---|---|---|---|---|---|"]
    best = best_dense(rows_out, ("fwd_gpu_ms", "fwd_bwd_gpu_ms"))

    def share(num, den):
        return f"{100 * num / den:.0f}% ({den:.2f})" if num and den else "–"

    for r in rows_out:
        shape = (r["E"], r["K"], r["N"])
        ours, th = r.get("pallas", {}), r.get("torch", {})
        df, dfb = best.get((*shape, "fwd_gpu_ms")), best.get((*shape, "fwd_bwd_gpu_ms"))
        lines.append(
            f"| E={r['E']} {r['K']}->{r['N']} | {r['pattern']} | {df or 0:.2f} / {dfb or 0:.2f} | "
            f"{share(df, ours.get('fwd_gpu_ms'))} | {share(dfb, ours.get('fwd_bwd_gpu_ms'))} | "
            f"{share(th.get('dense_fwd_ms'), th.get('fwd_ms'))} | "
            f"{share(th.get('dense_fwd_bwd_ms'), th.get('fwd_bwd_ms'))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="0,1,2,3,4")
    ap.add_argument("--patterns", default="dirichlet,uniform")
    ap.add_argument("--backends", default="ragged_dot,pallas")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--xla-reps", type=int, default=20)
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also GPU kernel time per call from a profiler trace (no host dispatch/sync)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cases = [(ROWS[i], p) for i in map(int, args.rows.split(","))
             for p in args.patterns.split(",")]
    torch_res = None
    if args.torch:  # before JAX initialises the GPU
        spec = [{"E": e, "M": m, "K": k, "N": n, "pattern": p,
                 "group_sizes": group_sizes(e, m, p).tolist()} for (e, m, k, n, _), p in cases]
        torch_res = torch_column(spec, args.reps)
    dev = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc)
    devname = dev.device_kind.replace(" ", "_")
    path = pathlib.Path(args.out or f"experiments/results/grouped_matmul_{date:%Y-%m-%d}_"
                                    f"{devname}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for j, ((e, m, k, n, _), pattern) in enumerate(cases):
        rows_out.append(bench_row(e, m, k, n, pattern, args.backends.split(","), args.reps,
                                  args.xla_reps, args.profile))
        if torch_res:
            rows_out[-1]["torch"] = torch_res[j]
        result = {"date": date.isoformat(), "device": dev.device_kind, "jax": jax.__version__,
                  "command": " ".join(sys.argv), "rows": rows_out,
                  "note": "times in ms (median); % = dense time / this time, same FLOPs, "
                          "same run; torch in its own process before JAX, same group sizes"}
        path.write_text(json.dumps(result, indent=1))  # after every row: partial runs count
        if os.environ.get("OUT"):
            (pathlib.Path(os.environ["OUT"]) / path.name).write_text(json.dumps(result, indent=1))
    print(table(rows_out))
    print("wrote", path)


if __name__ == "__main__":
    main()
