"""Forward / dgrad grouped-matmul kernel (Mosaic GPU, Hopper): out[M,N] = lhs_g @ rhs[g].

See ops/gmm_pallas.py for the design; segment_table is the row-tile schedule.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.gmm_pallas_common import (MEMORY_REGISTERS, FwdConfig, _compiler_params,
                                   _interpret_params, _num_sms, _transforms)


# ----------------------------------------------------------------------------- schedule
def segment_table(group_sizes, m, tile_m):
    """int32 [2, S], S = cdiv(m, tile_m) + G: per segment its block's first row, and packed
    (rows, first row within the block, compute flag (0 for the tail past sum(group_sizes)), group);
    segments past the count have rows == 0. Returns (table, count[1])."""
    g = group_sizes.shape[0]
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32),
                             (m - jnp.sum(group_sizes)).astype(jnp.int32)[None]])  # tail = G
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_blk = starts // tile_m
    last_blk = (ends - 1) // tile_m
    nseg = jnp.where(sizes > 0, last_blk - first_blk + 1, 0)
    seg_end = jnp.cumsum(nseg)
    seg_start = seg_end - nseg
    s_max = pl.cdiv(m, tile_m) + g
    t = jnp.arange(s_max, dtype=jnp.int32)
    gid = jnp.searchsorted(seg_end, t, side="right").astype(jnp.int32)
    gid_c = jnp.minimum(gid, g)
    blk = first_blk[gid_c] + t - seg_start[gid_c]
    row0 = blk * tile_m
    lo = jnp.maximum(starts[gid_c], row0)
    hi = jnp.minimum(ends[gid_c], row0 + tile_m)
    count = seg_end[-1]
    valid = t < count
    rows = jnp.where(valid, hi - lo, 0)
    compute = (valid & (gid_c < g)).astype(jnp.int32)
    group = jnp.where(gid_c < g, gid_c, 0)  # tail segments read rhs[0] but run zero steps
    start = jnp.where(valid, lo - row0, 0)
    # one int32 per segment besides row0: rows (8 bits) | start (8) | compute (1) | group (15)
    packed = rows | (start << 8) | (compute << 16) | (group << 17)
    table = jnp.stack([jnp.where(valid, row0, 0), packed]).astype(jnp.int32)
    return table, count.astype(jnp.int32)[None]


# ----------------------------------------------------------------------------- fwd / dgrad
def gmm_fwd_kernel(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, cfg: FwdConfig,
                   interpret=False):
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    if k % tk or n % (2 * tn):
        raise ValueError(f"gmm_fwd_kernel: needs K % {tk} == 0 and N % {2 * tn} == 0, got K={k} "
                         f"N={n}")
    if tm > 128 or g >= 1 << 14:
        raise ValueError(f"gmm_fwd_kernel: needs tile_m <= 128 and G < 16384 (packed segment "
                         f"table), got tile_m={tm} G={g}")
    grid_n = n // (2 * tn)
    k_iters = k // tk
    epi_n = min(cfg.epi_n, tn)
    mcs = max(min(cfg.max_concurrent_steps, k_iters), cfg.delay_release + 1)
    table, count = segment_table(group_sizes, m, tm)
    in_tf = _transforms(lhs.dtype, tk)
    rhs_tf = _transforms(rhs.dtype, tk if transpose_rhs else 2 * tn)
    rhs_block = (2 * tn, tk) if transpose_rhs else (tk, 2 * tn)

    def body(table_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
        wg = lax.axis_index("wg")
        num_segments = count_gmem[0]

        def pipeline(seg_k_steps, blk, ni):
            def mma(idx, a_smem, b_smem, acc_ref):
                if transpose_rhs:
                    b = (plgpu.transpose_ref(b_smem.at[pl.ds(wg * tn, tn), :], (1, 0))
                         if cfg.slice_then_transpose else
                         plgpu.transpose_ref(b_smem, (1, 0)).at[:, pl.ds(wg * tn, tn)])
                else:
                    b = b_smem.at[:, pl.ds(wg * tn, tn)]
                plgpu.wgmma(acc_ref, a_smem, b)
                plgpu.wgmma_wait(cfg.delay_release)
                return acc_ref

            return mma, [
                plgpu.BlockSpec((tm, tk), lambda kk: (blk, kk), transforms=in_tf,
                                delay_release=cfg.delay_release),
                plgpu.BlockSpec(rhs_block, (lambda kk: (ni, kk)) if transpose_rhs
                                else (lambda kk: (kk, ni)), transforms=rhs_tf,
                                delay_release=cfg.delay_release),
            ]

        def make(mma, specs, steps, ctx):
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(steps,), memory_registers=MEMORY_REGISTERS, in_specs=specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=mcs,
                compute_context=ctx)

        ignore = lambda *_, **__: None
        mma0, specs0 = pipeline(mcs, 0, 0)  # a static grid of mcs steps: allocations for mcs slots
        allocs = make(mma0, specs0, mcs, ignore).get_allocations(lhs_gmem, rhs_gmem.at[0])

        @functools.partial(pl.run_scoped, allocs=allocs,
                           out_smem=plgpu.SMEM((2, tm, epi_n), out_dtype), collective_axes="wg")
        def _scope(allocs, out_smem):
            total = num_segments * grid_n
            sms = lax.axis_size("sm")

            def coords(lin):
                return plgpu.planar_snake(lin, (num_segments, grid_n), cfg.grid_minor_dim,
                                          cfg.grid_tile_width)

            def fetch(lin):  # this SM's next work item's table entry (clamped at the end)
                si, _ = coords(jnp.maximum(jnp.minimum(lin, total - 1), 0))
                return table_gmem[0, si], table_gmem[1, si]

            # The table loads for item i+1 are issued while item i runs (nd_loop carry): a
            # dependent GMEM load at each item's start would stall both TMA and wgmma WGs.
            @plgpu.nd_loop((total,), collective_axes="sm", init_carry=fetch(lax.axis_index("sm")))
            def _loop(info, carry):
                row0, packed = carry
                _, ni = coords(info.index[0])
                nxt = fetch(info.index[0] + sms)
                rows = packed & 0xFF
                start = (packed >> 8) & 0xFF
                steps = ((packed >> 16) & 1) * k_iters  # 0 for tail segments: zeros out
                grp = packed >> 17
                blk = lax.div(row0, jnp.int32(tm))

                def ctx(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...].astype(out_dtype)
                        for c in range(tn // epi_n):  # column chunks: SMEM stays small
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            out_smem[wg] = acc[:, c * epi_n:(c + 1) * epi_n]
                            plgpu.commit_smem()
                            _ladder_store(out_smem.at[wg], out_gmem, row0, start, rows,
                                          ni * (2 * tn) + wg * tn + c * epi_n, epi_n, min(tm, m))

                mma, specs = pipeline(steps, blk, ni)
                make(mma, specs, steps, ctx)(lhs_gmem, rhs_gmem.at[grp], allocations=allocs)
                return nxt

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(_num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=_compiler_params(), interpret=_interpret_params(interpret))
    return kernel(table, count, lhs, rhs)


def _ladder_store(src_smem, out_gmem, row0, start, rows, col0, cols, max_rows):
    """TMA-store rows [start, start+rows) of src_smem to out_gmem[row0+start:, col0:col0+cols],
    as power-of-two row chunks (TMA boxes are static; the row count is not)."""
    smem_start = start
    remaining = max_rows
    while remaining > 0:
        chunk = 1 << int(math.log2(remaining))
        remaining //= 2

        @pl.when((rows & chunk) != 0)
        def _():
            plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(smem_start, chunk)],
                                    out_gmem.at[pl.ds(row0 + smem_start, chunk),
                                                pl.ds(col0, cols)])

        smem_start = smem_start + (rows & chunk)
