"""fc2's fused dgrad (ops/gmm_pallas_dswiglu.py) beside the plain transposed grouped GEMM it replaces, at a
benchmark shape: wall time per call (median), after each has run twice — the launches a kernel profiler
reads when the timing is off. The fused kernel's epilogue runs on whole column chunks and/or on row
blocks of them (`ROW_SPLIT`, the candidate fix for its register spills):

  python3 experiments/probe_dswiglu.py --shape mixtral --out probe.json
  ncu --kernel-name regex:"gmm_dswiglu|gmm_fwd_t" --launch-skip 2 --launch-count 2 --set full \\
      python3 experiments/probe_dswiglu.py --shape mixtral --row-split 2 --reps 0
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ops import gmm_pallas, gmm_pallas_dswiglu as dsw  # noqa: E402
from timing import median_seconds  # noqa: E402

SHAPES = {"mixtral": (16384, 2, 8, 2048, 4096), "deepseek": (16384, 6, 64, 2048, 1408)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--row-split", choices=("1", "2", "both"), default="both",
                    help="ops.gmm_pallas_dswiglu.ROW_SPLIT for the fused kernel (both: one of each)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per kernel (0: the two untimed calls only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    T, k, E, D, F = SHAPES[args.shape]
    key, bf16, rows = jax.random.key(11), jnp.bfloat16, T * k
    gs = jnp.bincount(jax.random.randint(key, (rows,), 0, E), length=E).astype(jnp.int32)
    gu = jax.random.normal(jax.random.fold_in(key, 1), (rows, 2 * F), bf16)
    w2 = (0.02 * jax.random.normal(jax.random.fold_in(key, 2), (E, F, D))).astype(bf16)
    dy = jax.random.normal(jax.random.fold_in(key, 3), (rows, D), bf16)
    plain = jax.jit(lambda dy, w: gmm_pallas.gmm_fwd(dy, w, gs, True, bf16))
    res = {"shape": args.shape, "device": jax.devices()[0].device_kind, "ms": {}}
    outs = {}
    for split in {"1": [1], "2": [2], "both": [1, 2]}[args.row_split]:
        dsw.ROW_SPLIT = split  # read when the kernel is traced: a new jit per value
        fused = jax.jit(lambda dy, w, gu: dsw.gmm_dswiglu_kernel(dy, w, gu, gs, cfg=dsw.config_for(E)))
        for _ in range(2):
            outs[split] = fused(dy, w2, gu).block_until_ready()
            plain(dy, w2).block_until_ready()
        if args.reps:
            name = "fused_dgrad" if split == 1 else f"fused_dgrad_rows{split}"
            res["ms"][name] = 1e3 * median_seconds(fused, dy, w2, gu, iters=args.reps)
    if len(outs) == 2:  # the same math per element on other register blocks: expected 0
        res["max_abs_diff_split"] = float(jnp.max(jnp.abs(outs[1].astype(jnp.float32) - outs[2].astype(jnp.float32))))
    if args.reps:
        res["ms"]["plain_dgrad"] = 1e3 * median_seconds(plain, dy, w2, iters=args.reps)
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
