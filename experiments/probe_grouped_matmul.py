"""Where the Pallas grouped-GEMM forward spends its time: GPU kernel time of config variants and
of timing probes, per shape, for Dirichlet and uniform group sizes (one compile per variant).

  PYTHONPATH=. python3 experiments/probe_grouped_matmul.py [--rows 2,3,4] [--variants a,b]

Variants are the shape class's tuning-table config with overrides (VARIANTS). Probes change the
kernel only for timing and give wrong results (never checked, never in a table):
  no_epilogue — the compute warpgroups skip the epilogue (no SMEM staging, no stores);
  no_store    — the epilogue stages its tile in SMEM but issues no TMA store (ladder path);
  no_wait     — the epilogue never waits for its earlier TMA stores to have read the staging
                buffer before overwriting it (racy output; the accumulator stays live).
Caution: no_epilogue leaves the accumulator dead, and it ran faster than the H100's peak (up to
1.12 PFLOP/s on 2026-11-22; so did a probe that skipped only the staging writes): MMA work was
dropped, so its time is not the cost of a main loop. no_store and no_wait keep the accumulator
live (it is written to SMEM) and are valid.
Every other variant is checked against XLA's ragged_dot before it is timed. Times are GPU kernel
time per call from a profiler trace (timing.device_ms; the segment-table ops included), % is a
dense x@w of the same FLOPs timed the same way. Writes experiments/results/gmm_probe_<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import sys

import numpy as np

import jax
import jax.numpy as jnp

from ops import gmm_pallas as P, gmm_pallas_fwd, gmm_pallas_pipeline, tuning
from ops.grouped_matmul import xla_fwd

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_grouped_matmul import ROWS, group_sizes  # noqa: E402
from timing import device_ms  # noqa: E402

M256 = {"split": "m", "tile_m": 256, "tile_n": 128, "max_concurrent_steps": 4, "delay_release": 1}
N64 = {"split": "n", "tile_m": 128, "tile_n": 64, "max_concurrent_steps": 6, "delay_release": 1}
PP = {"pingpong": True, "split": "n", "tile_m": 128, "tile_n": 128, "max_concurrent_steps": 6}
VARIANTS = {  # name -> (config overrides on the class's table entry, probe)
    "table": ({}, None),
    "no_epilogue": ({}, "no_epilogue"),
    "no_store": ({}, "no_store"),
    "epi128_s3": ({"epi_n": 128, "max_concurrent_steps": 3}, None),
    "m256": (M256, None),
    "m256_no_epilogue": (M256, "no_epilogue"),
    "n64": (N64, None),
    "n64_no_epilogue": (N64, "no_epilogue"),
    "no_wait": ({}, "no_wait"),
    "block_tiles": ({"group_tiles": False}, None),  # row tiles on aligned blocks (pre-v10)
}
VARIANTS.update({  # ping-pong WGs (ordered main loops, one shared ring)
    "pp6_d1": ({**PP, "delay_release": 1}, None),
    "pp6_d0": ({**PP, "delay_release": 0}, None),
    "pp6_d1_no_epilogue": ({**PP, "delay_release": 1}, "no_epilogue"),
    "pp5_d1_epi128": ({**PP, "delay_release": 1, "max_concurrent_steps": 5, "epi_n": 128}, None),
})


@contextlib.contextmanager
def probe(kind):
    """Patch the epilogue or its stores out while the kernel is traced (kind None: as is)."""
    real, real_store = gmm_pallas_pipeline.run, gmm_pallas_fwd._ladder_store
    real_wait = gmm_pallas_fwd._wait_staging
    if kind == "no_wait":
        gmm_pallas_fwd._wait_staging = lambda: None
    elif kind == "no_store":  # the ladder's TMA stores (unswizzled staging) are not issued
        gmm_pallas_fwd._ladder_store = lambda *a: None
    elif kind == "no_epilogue":
        gmm_pallas_pipeline.run = lambda **kw: real(**{**kw, "epilogue": lambda info, acc: None})
    try:
        yield
    finally:
        gmm_pallas_pipeline.run, gmm_pallas_fwd._ladder_store = real, real_store
        gmm_pallas_fwd._wait_staging = real_wait


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2,3,4", help="bench_grouped_matmul.ROWS indices")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--patterns", default="dirichlet,uniform")
    ap.add_argument("--transpose", action="store_true", help="the dgrad form (rhs [G,N,K])")
    ap.add_argument("--extra", default=None,
                    help='more variants as JSON {"name": [overrides, probe or null], ...}')
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if jax.devices()[0].platform != "gpu":
        sys.exit("probe_grouped_matmul: needs a Hopper GPU (Mosaic GPU kernels, profiler times)")
    date = datetime.datetime.now(datetime.timezone.utc)
    path = pathlib.Path(args.out or f"experiments/results/gmm_probe_{date:%Y-%m-%d}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tr = args.transpose
    if args.extra:
        VARIANTS.update({k: tuple(v) for k, v in json.loads(args.extra).items()})
    results = []
    for row in map(int, args.rows.split(",")):
        e, m, k, n, name = ROWS[row]
        ks = jax.random.split(jax.random.key(row), 3)
        x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(ks[1], (e, n, k) if tr else (e, k, n), jnp.float32)
             / np.sqrt(k)).astype(jnp.bfloat16)
        w0 = w[0].T if tr else w[0]
        t_dense = device_ms(jax.jit(lambda a, b: a @ b), x, w0, calls=args.calls)
        sizes = {p: group_sizes(e, m, p) for p in args.patterns.split(",")}
        refs = {p: jax.jit(lambda x, w, gs: xla_fwd(x, w, gs, tr, jnp.float32))(
            x, w, jnp.asarray(s)) for p, s in sizes.items()}
        base = tuning.fwd_config(m, k, n, e)
        print(f"== {name} E={e} {k}->{n}{' (transposed rhs)' if tr else ''}: dense "
              f"{t_dense:.3f} ms; table {base}", flush=True)
        for vname in args.variants.split(","):
            over, kind = VARIANTS[vname]
            rec = {"row": name, "E": e, "M": m, "K": k, "N": n, "transpose_rhs": tr,
                   "variant": vname, "overrides": over, "probe": kind, "dense_ms": t_dense}
            try:
                cfg = dataclasses.replace(base, **over)
                with probe(kind):
                    f = jax.jit(lambda x, w, gs, cfg=cfg: P.gmm_fwd(x, w, gs, tr, jnp.bfloat16,
                                                                   cfg=cfg))
                    for pattern, s in sizes.items():
                        gs = jnp.asarray(s)
                        y = f(x, w, gs)
                        if kind is None:
                            ref = refs[pattern]
                            err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref)
                                        / jnp.linalg.norm(ref))
                            if not err < 2e-2:
                                raise AssertionError(f"{pattern}: rel err {err:.2e}")
                            rec[f"{pattern}_rel_err"] = err
                        t = device_ms(f, x, w, gs, calls=args.calls)
                        rec[f"{pattern}_ms"] = t
                        rec[f"{pattern}_pct_dense"] = 100 * t_dense / t
            except Exception as ex:  # keep the other variants
                rec["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            results.append(rec)
            cells = "  ".join(f"{p} {rec[p + '_ms']:.3f} ms ({rec[p + '_pct_dense']:.0f}%)"
                              for p in sizes if p + "_ms" in rec)
            print(f"  {vname:14s} {cells} {rec.get('error', '')}", flush=True)
            out = {"date": date.isoformat(), "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "command": " ".join(sys.argv), "results": results}
            path.write_text(json.dumps(out, indent=1))
            if os.environ.get("OUT"):
                (pathlib.Path(os.environ["OUT"]) / path.name).write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
