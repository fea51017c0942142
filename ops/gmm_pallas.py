"""Mosaic-GPU (Hopper) grouped-matmul kernels: forward/dgrad and wgrad.

Both kernels are persistent (one CTA per SM looping over output tiles) and warp-specialized: one
memory warpgroup issues TMA copies into a `max_concurrent_steps`-deep SMEM ring, two compute
warpgroups issue wgmma into fp32 register accumulators.

fwd  out[M,N]   = lhs rows of group g @ rhs[g]       (rhs[g] is [K,N], or [N,K] if transpose_rhs)
     Work items are (row-tile segment, N tile). A segment is the intersection of a tile_m-row block
     with one group (or with the tail past sum(group_sizes), which gets zeros: its pipeline has zero
     steps). The segment table is computed outside the kernel (a few tiny XLA ops). Each segment
     stores only its rows, with a ladder of power-of-two-row TMA stores. The two compute WGs split N.
wgrad out[G,A,B] = a_g^T @ b_g  over the rows of group g   (a[M,A], b[M,B])
     Work items are (g, A tile, B tile); the pipeline runs over the group's row blocks (a dynamic
     number of steps, zero for an empty group) and zeroes, in SMEM, the rows of the first and last
     block that belong to neighbouring groups. The two compute WGs split A or B (cfg.split; each
     masks its own slice).

Requirements (padded by gmm_fwd/gmm_wgrad when not met): K % tile_k == 0 and N % (2*tile_n) == 0
for fwd; A and B multiples of the CTA tile for wgrad. M and group sizes are arbitrary.
Dtypes: bf16/fp16 operands (fp32 wgmma would be tf32: not offered; ops.grouped_matmul rejects it).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    tile_m: int = 128          # rows per segment (both WGs)
    tile_n: int = 128          # columns per compute WG (CTA covers 2*tile_n)
    tile_k: int = 64
    max_concurrent_steps: int = 4
    grid_minor_dim: int = 1    # planar_snake minor dim over (segments, N tiles)
    grid_tile_width: int = 8
    delay_release: int = 0      # 0: each step released after its wgmma (see NOTES: >0 races)
    epi_n: int = 64            # epilogue column chunk (SMEM staging: 2 WGs x tile_m x epi_n)
    slice_then_transpose: bool = False  # transpose_rhs: slice rhs SMEM tile before transposing


@dataclasses.dataclass(frozen=True)
class WgradConfig:
    tile_r: int = 64           # rows (contraction) per pipeline step
    tile_a: int = 128          # output rows per compute WG (CTA covers 2*tile_a)
    tile_b: int = 128
    max_concurrent_steps: int = 3
    grid_minor_dim: int = 1
    grid_tile_width: int = 8
    delay_release: int = 0      # 0: each step released after its wgmma (see NOTES: >0 races)
    split: str = "b"           # which operand the 2 compute WGs split: "a" (A rows) or "b"
    slice_then_transpose: bool = False  # split "a": slice a's SMEM tile before transposing


def _transforms(dtype, minor_elems):
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _num_sms(interpret):
    if interpret:
        return 2
    return jax.devices()[0].core_count


def _compiler_params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _interpret_params(interpret):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


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


# ----------------------------------------------------------------------------- wgrad
def gmm_wgrad_kernel(a, b, group_sizes, *, out_dtype, cfg: WgradConfig, interpret=False,
                     a_transposed=False):
    """out[g] = a_g^T b_g : a[M,A] (or a^T [A,M] if a_transposed), b[M,B] -> [G,A,B].

    a_transposed=False feeds wgmma an M-major (transposed) A operand straight from the [M,A]
    tiles; GPU interpret mode (JAX 0.10) supports neither that nor layout_cast, so interpret runs
    take a pre-transposed a (a copy outside the kernel). cfg.split picks which operand the two
    compute WGs split (each masks the boundary rows of its own slice of that operand).
    """
    if a_transposed:
        adim, m = a.shape
    else:
        m, adim = a.shape
    bdim = b.shape[1]
    g = group_sizes.shape[0]
    tr, ta, tb = cfg.tile_r, cfg.tile_a, cfg.tile_b
    split_a = cfg.split == "a"
    ca, cb = (2 * ta, tb) if split_a else (ta, 2 * tb)  # CTA tile
    if adim % ca or bdim % cb:
        raise ValueError(f"gmm_wgrad_kernel: needs A % {ca} == 0 and B % {cb} == 0, got "
                         f"A={adim} B={bdim}")
    grid_a, grid_b = adim // ca, bdim // cb
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_blk = starts // tr
    nblk = jnp.where(sizes > 0, (ends - 1) // tr - first_blk + 1, 0)
    table = jnp.stack([starts, ends, first_blk, nblk]).astype(jnp.int32)
    a_tf = _transforms(a.dtype, tr if a_transposed else ca)
    b_tf = _transforms(b.dtype, cb)
    o_tf = _transforms(out_dtype, tb)

    def body(table_gmem, a_gmem, b_gmem, out_gmem):
        wg = lax.axis_index("wg")

        def make(steps, fblk, ai, bi, lo, hi, ctx):
            def mma(idx, a_smem, b_smem, acc_ref):
                row_blk0 = (fblk + idx[0]) * tr
                if split_a:
                    own, shape, axis = ((a_smem.at[pl.ds(wg * ta, ta), :], (ta, tr), 1)
                                        if a_transposed else
                                        (a_smem.at[:, pl.ds(wg * ta, ta)], (tr, ta), 0))
                else:
                    own, shape, axis = b_smem.at[:, pl.ds(wg * tb, tb)], (tr, tb), 0

                @pl.when((row_blk0 < lo) | (row_blk0 + tr > hi))
                def _mask():  # rows of neighbouring groups in a boundary block: zero them
                    iota = lax.broadcasted_iota(jnp.int32, shape, axis)
                    if not interpret:
                        iota = plgpu.layout_cast(iota, plgpu.Layout.WGMMA)
                    rows = row_blk0 + iota
                    keep = ((rows >= lo) & (rows < hi)).astype(own.dtype)
                    own[...] = own[...] * keep
                    plgpu.commit_smem()

                if a_transposed:
                    a_op = own if split_a else a_smem
                elif not split_a:
                    a_op = plgpu.transpose_ref(a_smem, (1, 0))
                elif cfg.slice_then_transpose:
                    a_op = plgpu.transpose_ref(own, (1, 0))
                else:
                    a_op = plgpu.transpose_ref(a_smem, (1, 0)).at[pl.ds(wg * ta, ta), :]
                b_op = b_smem if split_a else own
                plgpu.wgmma(acc_ref, a_op, b_op)
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

        ignore = lambda *_, **__: None
        # a static grid of max_concurrent_steps steps: allocations for that many slots
        allocs = make(cfg.max_concurrent_steps, 0, 0, 0, 0, 0, ignore).get_allocations(a_gmem,
                                                                                       b_gmem)

        @functools.partial(pl.run_scoped, allocs=allocs,
                           out_smem=plgpu.SMEM((2, ta, tb), out_dtype, transforms=o_tf),
                           collective_axes="wg")
        def _scope(allocs, out_smem):
            @plgpu.nd_loop((g, grid_a * grid_b), collective_axes="sm")
            def _loop(info):
                gi = info.index[0]
                ai, bi = plgpu.planar_snake(info.index[1], (grid_a, grid_b),
                                            cfg.grid_minor_dim, cfg.grid_tile_width)
                lo, hi = table_gmem[0, gi], table_gmem[1, gi]
                fblk, steps = table_gmem[2, gi], table_gmem[3, gi]

                def ctx(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((ta, tb), jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...].astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        out_smem[wg] = acc
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg],
                            out_gmem.at[gi, pl.ds(ai * ca + (wg * ta if split_a else 0), ta),
                                        pl.ds(bi * cb + (0 if split_a else wg * tb), tb)])

                make(steps, fblk, ai, bi, lo, hi, ctx)(a_gmem, b_gmem, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((g, adim, bdim), out_dtype),
        grid=(_num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=_compiler_params(), interpret=_interpret_params(interpret))
    return kernel(table, a, b)


# ----------------------------------------------------------------------------- entry points
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
INTERPRET_FWD = FwdConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, epi_n=32,
                          grid_tile_width=2)
INTERPRET_WGRAD = WgradConfig(tile_r=64, tile_a=64, tile_b=64, max_concurrent_steps=2,
                              grid_tile_width=2)


def check_dtype(dtype):
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"grouped_matmul: backend='pallas' supports bfloat16/float16 operands, "
                         f"got {jnp.dtype(dtype)} (float32 would run as tf32 on wgmma); use "
                         f"backend='xla' (backend='auto' does so for float32)")


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
    check_dtype(lhs.dtype)
    from ops.tuning import fwd_config
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    cfg = cfg or (INTERPRET_FWD if interpret else fwd_config(lhs.shape[0], lhs.shape[1], n,
                                                             rhs.shape[0]))
    lhs_p = _pad_to(lhs, 1, cfg.tile_k)
    rhs_p = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, cfg.tile_k),
                    1 if transpose_rhs else 2, 2 * cfg.tile_n)
    if interpret and transpose_rhs:  # interpret mode (JAX 0.10) has no transposed wgmma operand
        rhs_p, transpose_rhs = jnp.swapaxes(rhs_p, 1, 2), False
    out = gmm_fwd_kernel(lhs_p, rhs_p, group_sizes, transpose_rhs=transpose_rhs,
                         out_dtype=out_dtype, cfg=cfg, interpret=interpret)
    return out[:, :n] if out.shape[1] != n else out


def gmm_wgrad(a, b, group_sizes, out_dtype, *, interpret=False, cfg=None):
    """[G,A,B] with out[g] = a_g^T b_g; pads A and B to the tile sizes when needed."""
    check_dtype(a.dtype)
    from ops.tuning import wgrad_config
    adim, bdim = a.shape[1], b.shape[1]
    cfg = cfg or (INTERPRET_WGRAD if interpret else wgrad_config(a.shape[0], adim, bdim,
                                                                 group_sizes.shape[0]))
    two_a, two_b = (2, 1) if cfg.split == "a" else (1, 2)
    a_p = _pad_to(a, 1, two_a * cfg.tile_a)
    b_p = _pad_to(b, 1, two_b * cfg.tile_b)
    if interpret:  # see gmm_wgrad_kernel: interpret mode takes a pre-transposed a
        a_p = a_p.T
    out = gmm_wgrad_kernel(a_p, b_p, group_sizes, out_dtype=out_dtype, cfg=cfg,
                           interpret=interpret, a_transposed=interpret)
    if out.shape[1:] != (adim, bdim):
        out = out[:, :adim, :bdim]
    return out
