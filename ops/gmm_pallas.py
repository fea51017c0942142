"""Mosaic-GPU (Hopper) grouped-matmul kernels: forward/dgrad and wgrad.

Both kernels are persistent (one CTA per SM looping over work items) and warp-specialized: one
memory warpgroup issues TMA copies into a `max_concurrent_steps`-slot SMEM ring, two compute
warpgroups issue wgmma into fp32 register accumulators. In fwd/dgrad the ring runs across work
items (ops/gmm_pallas_pipeline.py): the memory WG loads the next item's first k-steps while the
compute WGs finish the current one and store it. wgrad runs one `emit_pipeline_warp_specialized`
per item by default; `WgradConfig(ring=True)` runs it on the same cross-item ring (what the tuning
tables pick for every shape class: ops/NOTES_grouped_matmul.md).

fwd  out[M,N]   = lhs rows of group g @ rhs[g]       (rhs[g] is [K,N], or [N,K] if transpose_rhs)
     Work items are (row-tile segment, N tile). A segment is a tile_m-row tile of one group (or of
     the tail past sum(group_sizes), which gets zeros: it has zero k-steps), tiled from the group's
     first row rounded down to 8 (cfg.group_tiles, the default; else the intersection of an
     aligned tile_m-row block with the group). The segment table is computed outside the kernel
     (a few tiny XLA ops). Each segment stores only its rows, with a ladder of power-of-two-row
     TMA stores. The two compute WGs split
     the tile's columns (cfg.split "n"), its rows ("m": a WG with no rows of the segment issues no
     wgmma), or take whole items in turn (cfg.pingpong: the WGs' main loops take turns on
     the one ring, so one WG's epilogue runs under the other's wgmmas).
wgrad out[G,A,B] = a_g^T b_g  over the rows of group g   (a[M,A], b[M,B])
     Work items are (g, A tile, B tile); the pipeline runs over the group's rows in tile_r steps
     (from its first row rounded down to 8 on the ring with group_tiles, else from its first
     aligned block; a dynamic number of steps, zero for an empty group: zeros out) and zeroes, in
     SMEM, the rows of the first and last step that belong to neighbouring groups. The two
     compute WGs split A or B (cfg.split; each masks its own slice).

Requirements (padded by gmm_fwd/gmm_wgrad when not met): K % tile_k == 0 and N a multiple of the
CTA tile's columns for fwd; A and B multiples of the CTA tile for wgrad. M and group sizes are
arbitrary. Dtypes: bf16/fp16 operands (fp32 wgmma would be tf32: not offered; ops.grouped_matmul
rejects it).
"""
from __future__ import annotations

import jax.numpy as jnp

from ops.gmm_pallas_common import FwdConfig, WgradConfig  # noqa: F401  (re-exported)
from ops.grouped_matmul import check_pallas_dtype
from ops.gmm_pallas_fwd import gmm_fwd_kernel, segment_table  # noqa: F401
from ops.gmm_pallas_wgrad import gmm_wgrad_kernel

# ----------------------------------------------------------------------------- entry points
INTERPRET_FWD = FwdConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, epi_n=32,
                          grid_tile_width=2)
INTERPRET_WGRAD = WgradConfig(tile_r=64, tile_a=64, tile_b=64, max_concurrent_steps=2,
                              grid_tile_width=2)


def _pad_to(x, axis, multiple):
    size = x.shape[axis]
    pad = -size % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype, *, interpret=False, cfg=None):
    """[M,N] grouped matmul; pads K and N to the tile sizes when needed (a copy: avoid it)."""
    check_pallas_dtype(lhs.dtype)
    from ops.tuning import fwd_config
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    cfg = cfg or (INTERPRET_FWD if interpret else fwd_config(lhs.shape[0], lhs.shape[1], n,
                                                             rhs.shape[0], transpose_rhs))
    lhs_p = _pad_to(lhs, 1, cfg.tile_k)
    rhs_p = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, cfg.tile_k),
                    1 if transpose_rhs else 2,
                    cfg.tile_n * (2 if cfg.split == "n" and not cfg.pingpong else 1))
    if interpret and transpose_rhs:  # interpret mode (JAX 0.10) has no transposed wgmma operand
        rhs_p, transpose_rhs = jnp.swapaxes(rhs_p, 1, 2), False
    out = gmm_fwd_kernel(lhs_p, rhs_p, group_sizes, transpose_rhs=transpose_rhs,
                         out_dtype=out_dtype, cfg=cfg, interpret=interpret)
    return out[:, :n] if out.shape[1] != n else out


def gmm_wgrad(a, b, group_sizes, out_dtype, *, interpret=False, cfg=None, sumsq=False):
    """[G,A,B] with out[g] = a_g^T b_g; pads A and B to the tile sizes when needed. sumsq=True: (out,
    Σ out² in float32 from the kernel's epilogue, of the values written)."""
    check_pallas_dtype(a.dtype)
    from ops.tuning import wgrad_config
    adim, bdim = a.shape[1], b.shape[1]
    cfg = cfg or (INTERPRET_WGRAD if interpret else wgrad_config(a.shape[0], adim, bdim,
                                                                 group_sizes.shape[0]))
    two_a, two_b = (1, 1) if cfg.pingpong else (2, 1) if cfg.split == "a" else (1, 2)
    a_p = _pad_to(a, 1, two_a * cfg.tile_a)
    b_p = _pad_to(b, 1, two_b * cfg.tile_b)
    if interpret:  # see gmm_wgrad_kernel: interpret mode takes a pre-transposed a
        a_p = a_p.T
    out = gmm_wgrad_kernel(a_p, b_p, group_sizes, out_dtype=out_dtype, cfg=cfg,
                           interpret=interpret, a_transposed=interpret, sumsq=sumsq)
    out, sq = out if sumsq else (out, None)
    if out.shape[1:] != (adim, bdim):
        out = out[:, :adim, :bdim]  # (the padding is zeros: it adds nothing to the sums)
    return (out, jnp.sum(sq)) if sumsq else out
