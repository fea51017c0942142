"""Forward / dgrad grouped-matmul kernel (Mosaic GPU, Hopper): out[M,N] = lhs_g @ rhs[g].

See ops/gmm_pallas.py for the design; segment_table is the row-tile schedule and
ops/gmm_pallas_pipeline.py the one-ring-per-SM pipeline.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import gmm_pallas_pipeline as pipeline
from ops.gmm_pallas_common import (ROW_ALIGN, FwdConfig, compiler_params, interpret_params,
                                   num_sms, smem_transforms)


# ----------------------------------------------------------------------------- schedule
def segment_table(group_sizes, m, tile_m, group_tiles=True):
    """int32 [3, S]: per row segment its first row; rows | (first row of the group within the
    segment) << 16; and its group (G for the tail past sum(group_sizes), which is stored as
    zeros). Segments past the count have rows == 0. Returns (table, count[1]).

    group_tiles=True: each group's rows are tiled from its first row rounded down to a multiple
    of ROW_ALIGN (TMA boxes of the 8-row-tiled SMEM operand start on tile rows), so a group of r
    rows starting at row s takes cdiv(r + s % ROW_ALIGN, tile_m) segments; the first one's packed
    start is s % ROW_ALIGN, the others' 0, and the last one's tile overhangs into the next group's
    rows (computed, not stored). False: segments are the intersections of the groups with the
    aligned blocks [i*tile_m, (i+1)*tile_m), so every group boundary inside a block costs one
    more segment. For the benchmark's E=64 Dirichlet sizes that is 1.117 tiles of work per tile of
    rows against 1.059 with group tiles (tile_m=128).
    """
    g = group_sizes.shape[0]
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32),
                             (m - jnp.sum(group_sizes)).astype(jnp.int32)[None]])  # tail = G
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    if group_tiles:
        origin = starts - starts % ROW_ALIGN
        nseg = jnp.where(sizes > 0, (ends - origin + tile_m - 1) // tile_m, 0)
        # >= sum of cdiv(size + ROW_ALIGN - 1, tile_m) over the groups and the tail
        s_max = (m + (g + 1) * (tile_m + ROW_ALIGN - 2)) // tile_m
    else:
        first_blk = starts // tile_m
        nseg = jnp.where(sizes > 0, (ends - 1) // tile_m - first_blk + 1, 0)
        s_max = pl.cdiv(m, tile_m) + g
    seg_end = jnp.cumsum(nseg)
    seg_start = seg_end - nseg
    t = jnp.arange(s_max, dtype=jnp.int32)
    # compare_all: one fused op; the default binary search is an XLA while loop, which on GPUs
    # syncs with the host once per iteration (~log2(G) round trips per call)
    gid = jnp.searchsorted(seg_end, t, side="right", method="compare_all").astype(jnp.int32)
    gid_c = jnp.minimum(gid, g)
    first = origin if group_tiles else first_blk * tile_m
    row0 = first[gid_c] + (t - seg_start[gid_c]) * tile_m
    lo = jnp.maximum(starts[gid_c], row0)
    hi = jnp.minimum(ends[gid_c], row0 + tile_m)
    count = seg_end[-1]
    valid = t < count
    rows = jnp.where(valid, hi - lo, 0)
    start = jnp.where(valid, lo - row0, 0)
    table = jnp.stack([jnp.where(valid, row0, 0), rows | (start << 16),
                       jnp.where(valid, gid_c, g)]).astype(jnp.int32)
    return table, count.astype(jnp.int32)[None]


def segment_items(table_gmem, count_gmem, grid_n, num_groups, k_iters, cfg: FwdConfig):
    """The work items of a kernel over segment_table's row segments x grid_n column tiles, for
    gmm_pallas_pipeline.run: (num_items, fetch, steps_of). fetch(lin) -> (first row, rows | start << 16,
    group, column tile) in cfg's planar-snake order; the tail's items (group == num_groups) take 0 steps,
    so their epilogue writes zeros."""
    num_segments = count_gmem[0]
    num_items = num_segments * grid_n

    def fetch(lin):
        lin = jnp.minimum(lin, num_items - 1)
        si, ni = plgpu.planar_snake(lin, (num_segments, grid_n), cfg.grid_minor_dim, cfg.grid_tile_width)
        return table_gmem[0, si], table_gmem[1, si], table_gmem[2, si], ni

    def steps_of(info):
        return jnp.where(info[2] < num_groups, k_iters, 0)

    return num_items, fetch, steps_of


# ----------------------------------------------------------------------------- fwd / dgrad
def gmm_fwd_kernel(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, cfg: FwdConfig,
                   interpret=False):
    """cfg.split "n": the two compute WGs split the CTA tile's columns (CTA tile_m x 2*tile_n,
    WG tile_m x tile_n); "m": they split its rows (CTA tile_m x tile_n, WG tile_m/2 x tile_n).
    cfg.pingpong: each WG computes whole tile_m x tile_n work items, alternating."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    split_m = cfg.split == "m" and not cfg.pingpong
    split_n = cfg.split == "n" and not cfg.pingpong
    tm, tk = cfg.tile_m, cfg.tile_k
    cm, cn = tm, cfg.tile_n * (2 if split_n else 1)       # CTA tile (one work item)
    wm, wn = (tm // 2 if split_m else tm), cfg.tile_n      # WG tile
    if k % tk or n % cn or cfg.split not in ("m", "n") or wm % 64:
        raise ValueError(f"gmm_fwd_kernel: needs K % {tk} == 0, N % {cn} == 0, split in m/n and "
                         f"64 | WG rows, got K={k} N={n} split={cfg.split} WG rows={wm}")
    if cfg.pingpong and wm * wn > 128 * 128:
        raise ValueError(f"gmm_fwd_kernel: ping-pong WG tiles hold at most 128x128 fp32 "
                         f"accumulators, got {wm}x{wn}")
    epi_n = min(cfg.epi_n, wn)
    if not interpret and (epi_n * jnp.dtype(out_dtype).itemsize) % 128:
        # the ladder's TMA stores start at any row of the staging buffer; TMA needs 128-byte
        # aligned SMEM addresses (CUDA_ERROR_MISALIGNED_ADDRESS otherwise)
        raise ValueError(f"gmm_fwd_kernel: epi_n * itemsize must be a multiple of 128 bytes, "
                         f"got epi_n={epi_n} for {jnp.dtype(out_dtype).name}")
    if tm > 256:
        raise ValueError(f"gmm_fwd_kernel: needs tile_m <= 256, got {tm}")
    grid_n = n // cn
    k_iters = k // tk
    stages = cfg.max_concurrent_steps
    table, count = segment_table(group_sizes, m, tm, cfg.group_tiles)
    in_tf = smem_transforms(lhs.dtype, tk)
    rhs_tf = smem_transforms(rhs.dtype, tk if transpose_rhs else cn)
    rhs_block = (cn, tk) if transpose_rhs else (tk, cn)

    def body(table_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
        pl.run_scoped(
            functools.partial(scoped, table_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem),
            lhs_smem=plgpu.SMEM((stages, cm, tk), lhs.dtype, transforms=in_tf),
            rhs_smem=plgpu.SMEM((stages, *rhs_block), rhs.dtype, transforms=rhs_tf),
            out_smem=plgpu.SMEM((2, wm, epi_n), out_dtype),
            loaded=plgpu.Barrier(num_arrivals=2, num_barriers=pipeline.loaded_barriers(
                stages, cfg.pingpong)),
            consumed=plgpu.Barrier(
                num_arrivals=pipeline.consumers_per_slot(2, cfg.pingpong), num_barriers=stages),
            collective_axes="wg")

    def scoped(table_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem, lhs_smem, rhs_smem,
               out_smem, loaded, consumed):
        wg = lax.axis_index("wg")
        num_items, fetch, steps_of = segment_items(table_gmem, count_gmem, grid_n, g, k_iters, cfg)

        def wg_rows(info):  # this WG's rows [lo, hi) of the item's segment, within its WG tile
            _, packed, _, _ = info
            rows, start = packed & 0xFFFF, packed >> 16
            if not split_m:
                return start, start + rows
            w0 = wg * wm
            return jnp.clip(start - w0, 0, wm), jnp.clip(start + rows - w0, 0, wm)

        def load(info, kk, slot, barrier):
            row0, _, grp, ni = info
            row0 = pl.multiple_of(row0, ROW_ALIGN)  # layout inference must see it (TMA tiles)
            plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(row0, cm), pl.ds(kk * tk, tk)],
                                    lhs_smem.at[slot], barrier)
            cols, ks = pl.ds(ni * cn, cn), pl.ds(kk * tk, tk)
            plgpu.copy_gmem_to_smem(rhs_gmem.at[grp].at[(cols, ks) if transpose_rhs else (ks, cols)],
                                    rhs_smem.at[slot], barrier)

        def mma(info, kk, slot, acc_ref):
            a = lhs_smem.at[slot]
            if split_m:
                a = a.at[pl.ds(wg * wm, wm)]
            b = rhs_smem.at[slot]
            if transpose_rhs:
                if not split_n:
                    b = b.transpose((1, 0))
                elif cfg.slice_then_transpose:
                    b = b.at[pl.ds(wg * wn, wn), :].transpose((1, 0))
                else:
                    b = b.transpose((1, 0)).at[:, pl.ds(wg * wn, wn)]
            elif split_n:
                b = b.at[:, pl.ds(wg * wn, wn)]
            if split_m:
                lo, hi = wg_rows(info)

                @pl.when(lo < hi)
                def _():  # a WG with no rows of the segment leaves the tensor cores to the other
                    plgpu.wgmma(acc_ref, a, b)
            else:
                plgpu.wgmma(acc_ref, a, b)

        def epilogue(info, acc_ref):
            row0, _, _, ni = info
            lo, hi = wg_rows(info)
            wrow0 = row0 + (wg * wm if split_m else 0)
            col0 = ni * cn + (wg * wn if split_n else 0)
            acc = acc_ref[...].astype(out_dtype)
            for c in range(wn // epi_n):  # column chunks: SMEM stays small
                _wait_staging()
                out_smem[wg] = acc[:, c * epi_n:(c + 1) * epi_n]
                plgpu.commit_smem()
                _ladder_store(out_smem.at[wg], out_gmem, wrow0, lo, hi - lo, col0 + c * epi_n,
                              epi_n, min(wm, m))

        pipeline.run(num_items=num_items, fetch=fetch, steps_of=steps_of, load=load,
                     mma=mma, epilogue=epilogue, acc_shape=(wm, wn), stages=stages,
                     loaded=loaded, consumed=consumed, delay_release=cfg.delay_release,
                     pingpong=cfg.pingpong)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the compute WGs' last stores

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        kernel_name="gmm_fwd_t" if transpose_rhs else "gmm_fwd",  # named in profiles
        compiler_params=compiler_params(), interpret=interpret_params(interpret))
    return kernel(table, count, lhs, rhs)


def _wait_staging():
    """Wait until the TMA stores issued so far have read the staging buffer (a function of its
    own so that experiments/probe_grouped_matmul.py can time the epilogue without it)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


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
