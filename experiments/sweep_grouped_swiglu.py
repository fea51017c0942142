"""Tile sweep of the fused fc1 + SwiGLU grouped GEMM (ops/gmm_pallas_swiglu.py) against the plain path, on the GPU.

  PYTHONPATH=. python experiments/sweep_grouped_swiglu.py [--shapes mixtral deepseek] [--reps 20] [--out PATH]

Per shape (one MoE layer's fc1 of `mixtral_small` or `deepseek_small`, a random routing's group sizes), the
baseline first: the grouped GEMM on its tuning-table config alone, and followed by the SwiGLU op (what
the model runs unfused); then the fused kernel's forward per config. GPU time from a profiler trace
(`timing.device_ms`). The JSON is written after every row, so a sweep cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ops import gmm_pallas_swiglu as K  # noqa: E402
from ops.gated_act import swiglu  # noqa: E402
from ops.grouped_matmul import grouped_matmul  # noqa: E402
from timing import device_ms, median_seconds, write_result  # noqa: E402

SHAPES = {"mixtral": dict(R=32768, E=8, D=2048, F=4096), "deepseek": dict(R=98304, E=64, D=2048, F=1408)}
CONFIGS = [  # fields of FwdConfig over SWIGLU_FWD's
    {},
    dict(max_concurrent_steps=3),
    dict(delay_release=0),
    dict(grid_tile_width=4),
    dict(grid_minor_dim=0),
    dict(tile_m=128, tile_n=64, max_concurrent_steps=3),
    dict(tile_m=128, tile_n=64, max_concurrent_steps=4, epi_n=64),
    dict(tile_m=128, tile_n=64, max_concurrent_steps=4, grid_tile_width=4),
    dict(tile_m=128, tile_n=64, max_concurrent_steps=4, grid_minor_dim=0),
    dict(tile_m=128, tile_n=64, max_concurrent_steps=4, epi_n=64, delay_release=0),
    dict(tile_m=64, tile_n=64, max_concurrent_steps=6),
    dict(tile_m=64, tile_n=64, max_concurrent_steps=8),
]


def _time(fn, *args, reps):
    ms = device_ms(fn, *args, calls=reps)
    return ms if ms is not None else 1e3 * median_seconds(fn, *args, iters=reps)


def sweep(shape: dict, reps: int, on_row):
    R, E, D, F = shape["R"], shape["E"], shape["D"], shape["F"]
    key = jax.random.key(0)
    gs = jnp.bincount(jax.random.randint(key, (R,), 0, E), length=E).astype(jnp.int32)
    x = jax.random.normal(jax.random.fold_in(key, 1), (R, D), jnp.bfloat16)
    w1 = (0.02 * jax.random.normal(jax.random.fold_in(key, 2), (E, D, 2 * F))).astype(jnp.bfloat16)
    tflop = 2 * R * D * 2 * F / 1e12
    rows = []

    def add(name, fn):
        try:
            ms = _time(jax.jit(fn), x, w1, reps=reps)
            row = {"variant": name, "ms": ms, "tflops": tflop / ms * 1e3}
        except Exception as e:  # a config the kernel or Mosaic refuses: keep sweeping
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(row, flush=True)
        on_row(rows)

    add("gmm fwd (table config)", lambda x, w: grouped_matmul(x, w, gs))
    add("gmm fwd + swiglu (unfused)", lambda x, w: swiglu(grouped_matmul(x, w, gs).reshape(R, 2, F)))
    ref = jax.jit(lambda x, w: swiglu(grouped_matmul(x, w, gs).reshape(R, 2, F)))(x, w1).astype(jnp.float32)
    for over in CONFIGS:
        cfg = dataclasses.replace(K.SWIGLU_FWD, **over)
        try:
            h = K.gmm_swiglu_kernel(x, w1, gs, out_dtype=jnp.bfloat16, cfg=cfg)[1].astype(jnp.float32)
            err = float(jnp.linalg.norm(h - ref) / jnp.linalg.norm(ref))
        except Exception as e:
            rows.append({"variant": f"fused {over}", "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
            continue
        add(f"fused {over}", lambda x, w, cfg=cfg: K.gmm_swiglu_kernel(x, w, gs, out_dtype=jnp.bfloat16, cfg=cfg))
        rows[-1]["rel_err_vs_unfused"] = err
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "deepseek"], choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"device": jax.devices()[0].device_kind, "default": dataclasses.asdict(K.SWIGLU_FWD)}
    for name in args.shapes:
        def save(rows, name=name):
            result[name] = {"shape": SHAPES[name], "rows": rows}
            return write_result("sweep_grouped_swiglu", "_".join(args.shapes), result, args.out)
        rows = sweep(SHAPES[name], args.reps, save)
        ok = [r for r in rows if "ms" in r and r["variant"].startswith("fused")]
        if ok:
            print(f"best {name}: {min(ok, key=lambda r: r['ms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
