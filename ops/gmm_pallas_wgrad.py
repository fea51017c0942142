"""Weight-gradient grouped-matmul kernel (Mosaic GPU, Hopper): out[g] = a_g^T b_g -> [G,A,B].

See ops/gmm_pallas.py for the design.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import gmm_pallas_pipeline as pipeline
from ops.gmm_pallas_common import (MEMORY_REGISTERS, ROW_ALIGN, WgradConfig, compiler_params,
                                   interpret_params, num_sms, smem_transforms)


# ----------------------------------------------------------------------------- wgrad
def gmm_wgrad_kernel(a, b, group_sizes, *, out_dtype, cfg: WgradConfig, interpret=False,
                     a_transposed=False, sumsq=False):
    """out[g] = a_g^T b_g : a[M,A] (or a^T [A,M] if a_transposed), b[M,B] -> [G,A,B].

    sumsq=True: also (out, sq) with sq[g, j, r] = Σ over the j-th tile_b columns of out[g, r, :]², in
    float32, of the values written (cast to out_dtype): each epilogue sums its tile's squares along its
    columns from the registers and stores the [tile_a] vector beside the tile. `sq.sum()` is Σ out², what
    the optimizer's clip would otherwise read the whole gradient again for.

    a_transposed=False feeds wgmma an M-major (transposed) A operand straight from the [M,A]
    tiles; GPU interpret mode (JAX 0.10) supports neither that nor layout_cast, so interpret runs
    take a pre-transposed a (a copy outside the kernel). cfg.split picks which operand the two
    compute WGs split (each masks the boundary rows of its own slice of that operand).

    Two pipelines over the same steps: per work item (`emit_pipeline_warp_specialized`, the
    default of `WgradConfig`), or `cfg.ring`: one SMEM ring per SM across work items
    (ops/gmm_pallas_pipeline.py, as fwd uses), with `delay_release` and `pingpong` options; the
    tuning tables pick per shape class.
    """
    if cfg.delay_release and not cfg.ring:
        raise ValueError(f"gmm_wgrad_kernel: needs delay_release=0 (each step released after its "
                         f"wgmma; > 0 races in this per-item pipeline), got {cfg.delay_release}")
    if cfg.pingpong and not cfg.ring:
        raise ValueError("gmm_wgrad_kernel: pingpong=True needs ring=True (the WGs take turns on the cross-item ring)")
    if a_transposed:
        adim, m = a.shape
    else:
        m, adim = a.shape
    bdim = b.shape[1]
    g = group_sizes.shape[0]
    tr, ta, tb = cfg.tile_r, cfg.tile_a, cfg.tile_b
    pp = cfg.pingpong  # each WG takes whole ta x tb items (masks all of b), alternating
    split_a = cfg.split == "a" and not pp
    ca, cb = (2 * ta, tb) if split_a else (ta, tb if pp else 2 * tb)  # CTA tile (one item)
    if adim % ca or bdim % cb:
        raise ValueError(f"gmm_wgrad_kernel: needs A % {ca} == 0 and B % {cb} == 0, got "
                         f"A={adim} B={bdim}")
    grid_a, grid_b = adim // ca, bdim // cb
    group_tiles = cfg.ring and cfg.group_tiles
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    # the group's row steps start on its first row rounded down to ROW_ALIGN (group tiles, ring
    # only: the per-item pipeline's BlockSpecs index whole blocks) or on its first aligned block
    first = starts - starts % (ROW_ALIGN if group_tiles else tr)
    nsteps = jnp.where(sizes > 0, (ends - first + tr - 1) // tr, 0)
    table = jnp.stack([starts, ends, first, nsteps]).astype(jnp.int32)
    a_tf = smem_transforms(a.dtype, tr if a_transposed else ca)
    b_tf = smem_transforms(b.dtype, cb)
    o_tf = smem_transforms(out_dtype, tb)
    a_block = (ca, tr) if a_transposed else (tr, ca)

    sq_alloc = {"sq_smem": plgpu.SMEM((2, ta), jnp.float32)} if sumsq else {}  # the rows' sums of squares

    def step(wg, a_s, b_s, acc_ref, row_blk0, lo, hi):
        """One k-step of a WG: zero the rows of neighbouring groups in a boundary block (its own
        slice), then wgmma."""
        if split_a:
            own, shape, axis = ((a_s.at[pl.ds(wg * ta, ta), :], (ta, tr), 1) if a_transposed else
                                (a_s.at[:, pl.ds(wg * ta, ta)], (tr, ta), 0))
        else:
            own, shape, axis = (b_s if pp else b_s.at[:, pl.ds(wg * tb, tb)]), (tr, tb), 0

        @pl.when((row_blk0 < lo) | (row_blk0 + tr > hi))
        def _mask():
            iota = lax.broadcasted_iota(jnp.int32, shape, axis)
            if not interpret:
                iota = plgpu.layout_cast(iota, plgpu.Layout.WGMMA)
            rows = row_blk0 + iota
            keep = ((rows >= lo) & (rows < hi)).astype(own.dtype)
            own[...] = own[...] * keep
            plgpu.commit_smem()

        if a_transposed:
            a_op = own if split_a else a_s
        elif not split_a:
            a_op = a_s.transpose((1, 0))
        elif cfg.slice_then_transpose:
            a_op = own.transpose((1, 0))
        else:
            a_op = a_s.transpose((1, 0)).at[pl.ds(wg * ta, ta), :]
        plgpu.wgmma(acc_ref, a_op, b_s if split_a else own)

    def store(wg, out_smem, out_gmem, acc_ref, gi, ai, bi, sq_smem=None, sq_gmem=None):
        """A WG's [ta, tb] result: registers -> SMEM -> TMA store (and its rows' sums of squares)."""
        acc = acc_ref[...].astype(out_dtype)
        a0, b0 = ai * ca + (wg * ta if split_a else 0), bi * cb + (0 if split_a or pp else wg * tb)
        if sq_smem is not None:
            wide = acc.astype(jnp.float32)
            rows_sq = jnp.sum(wide * wide, axis=1)  # [ta]: a one-axis reduction of the WGMMA layout
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg] = acc
        if sq_smem is not None:
            sq_smem[wg] = rows_sq
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[gi, pl.ds(a0, ta), pl.ds(b0, tb)])
        if sq_smem is not None:
            plgpu.copy_smem_to_gmem(sq_smem.at[wg], sq_gmem.at[gi, lax.div(b0, jnp.int32(tb)), pl.ds(a0, ta)])

    def body_per_item(table_gmem, a_gmem, b_gmem, out_gmem, sq_gmem=None):
        wg = lax.axis_index("wg")

        def make(steps, fblk, ai, bi, lo, hi, ctx):
            def mma(idx, a_smem, b_smem, acc_ref):
                step(wg, a_smem, b_smem, acc_ref, (fblk + idx[0]) * tr, lo, hi)
                plgpu.wgmma_wait(cfg.delay_release)
                return acc_ref

            a_spec = (plgpu.BlockSpec((ca, tr), lambda r: (ai, fblk + r), transforms=a_tf,
                                      delay_release=cfg.delay_release) if a_transposed else
                      plgpu.BlockSpec((tr, ca), lambda r: (fblk + r, ai), transforms=a_tf,
                                      delay_release=cfg.delay_release))
            specs = [a_spec,
                     plgpu.BlockSpec((tr, cb), lambda r: (fblk + r, bi), transforms=b_tf,
                                     delay_release=cfg.delay_release)]
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(steps,), memory_registers=MEMORY_REGISTERS, in_specs=specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.max_concurrent_steps,
                compute_context=ctx)

        def ignore(*_, **__):
            return None
        # a static grid of max_concurrent_steps steps: allocations for that many slots
        allocs = make(cfg.max_concurrent_steps, 0, 0, 0, 0, 0, ignore).get_allocations(a_gmem,
                                                                                       b_gmem)

        @functools.partial(pl.run_scoped, allocs=allocs,
                           out_smem=plgpu.SMEM((2, ta, tb), out_dtype, transforms=o_tf),
                           **sq_alloc, collective_axes="wg")
        def _scope(allocs, out_smem, sq_smem=None):
            @plgpu.nd_loop((g, grid_a * grid_b), collective_axes="sm")
            def _loop(info):
                gi = info.index[0]
                ai, bi = plgpu.planar_snake(info.index[1], (grid_a, grid_b),
                                            cfg.grid_minor_dim, cfg.grid_tile_width)
                lo, hi = table_gmem[0, gi], table_gmem[1, gi]
                fblk, steps = lax.div(table_gmem[2, gi], jnp.int32(tr)), table_gmem[3, gi]

                def ctx(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((ta, tb), jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        store(wg, out_smem, out_gmem, acc_ref, gi, ai, bi, sq_smem, sq_gmem)

                make(steps, fblk, ai, bi, lo, hi, ctx)(a_gmem, b_gmem, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    stages = cfg.max_concurrent_steps

    def body_ring(table_gmem, a_gmem, b_gmem, out_gmem, sq_gmem=None):
        pl.run_scoped(
            functools.partial(ring_scoped, table_gmem, a_gmem, b_gmem, out_gmem, sq_gmem),
            a_smem=plgpu.SMEM((stages, *a_block), a.dtype, transforms=a_tf),
            b_smem=plgpu.SMEM((stages, tr, cb), b.dtype, transforms=b_tf),
            out_smem=plgpu.SMEM((2, ta, tb), out_dtype, transforms=o_tf),
            **sq_alloc,
            loaded=plgpu.Barrier(num_arrivals=2, num_barriers=pipeline.loaded_barriers(
                stages, pp)),
            consumed=plgpu.Barrier(num_arrivals=pipeline.consumers_per_slot(2, pp),
                                   num_barriers=stages),
            collective_axes="wg")

    def ring_scoped(table_gmem, a_gmem, b_gmem, out_gmem, sq_gmem, a_smem, b_smem, out_smem, loaded,
                    consumed, sq_smem=None):
        wg = lax.axis_index("wg")
        tiles = grid_a * grid_b

        def fetch(lin):  # item lin -> (group, A tile, B tile, rows lo, rows hi, first row, steps)
            lin = jnp.minimum(lin, g * tiles - 1)
            gi = lax.div(lin, jnp.int32(tiles))
            ai, bi = plgpu.planar_snake(lax.rem(lin, jnp.int32(tiles)), (grid_a, grid_b),
                                        cfg.grid_minor_dim, cfg.grid_tile_width)
            return (gi, ai, bi, table_gmem[0, gi], table_gmem[1, gi], table_gmem[2, gi],
                    table_gmem[3, gi])

        def load(info, r, slot, barrier):
            _, ai, bi, _, _, first, _ = info
            # layout inference must see the alignment (the SMEM tiles' 8-row TMA boxes)
            rows = pl.ds(pl.multiple_of(first + r * tr, ROW_ALIGN), tr)
            plgpu.copy_gmem_to_smem(
                a_gmem.at[pl.ds(ai * ca, ca), rows] if a_transposed else
                a_gmem.at[rows, pl.ds(ai * ca, ca)], a_smem.at[slot], barrier)
            plgpu.copy_gmem_to_smem(b_gmem.at[rows, pl.ds(bi * cb, cb)], b_smem.at[slot], barrier)

        def mma(info, r, slot, acc_ref):
            _, _, _, lo, hi, first, _ = info
            step(wg, a_smem.at[slot], b_smem.at[slot], acc_ref, first + r * tr, lo, hi)

        def epilogue(info, acc_ref):
            store(wg, out_smem, out_gmem, acc_ref, *info[:3], sq_smem, sq_gmem)

        pipeline.run(num_items=jnp.int32(g * tiles), fetch=fetch, steps_of=lambda info: info[6],
                     load=load, mma=mma, epilogue=epilogue, acc_shape=(ta, tb), stages=stages,
                     loaded=loaded, consumed=consumed, delay_release=cfg.delay_release,
                     pingpong=pp)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the compute WGs' last stores

    body = body_ring if cfg.ring else body_per_item
    out_type = jax.ShapeDtypeStruct((g, adim, bdim), out_dtype)
    if sumsq:
        out_type = (out_type, jax.ShapeDtypeStruct((g, bdim // tb, adim), jnp.float32))
    kernel = plgpu.kernel(
        body, out_type=out_type,
        grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        kernel_name="gmm_wgrad_ring" if cfg.ring else "gmm_wgrad",  # named in profiles
        compiler_params=compiler_params(), interpret=interpret_params(interpret))
    return kernel(table, a, b)
