"""fc2's dgrad with SwiGLU's backward in its epilogue (Mosaic GPU, Hopper): one pass from dy to dgu.

  dh[M, F]   = dy_g @ w2[g]^T          dy [M, N], w2 [G, F, N]   (fc2's dgrad: the transposed GEMM)
  dgu[M, 2F] = SwiGLU's backward at gu [M, 2F] (gate [0, F), up [F, 2F)) for the cotangent dh:
               s = sigmoid(g);  dgate = dh · u · s · (1 + g · (1 − s));  dup = dh · g · s

dh stays in the fp32 accumulators: it is never written to HBM nor read back, and the standalone
backward kernel's pass over [M, 2F] disappears (its reads of gu and writes of dgu move into this
epilogue, under the other compute warpgroup's wgmmas).

A work item is (row segment of tile_m rows, tile_n columns of F) in ping-pong (each compute WG takes
whole items in turn on the shared ring, ops/gmm_pallas_pipeline.py). With cfg.pingpong False both WGs
work on each item, as the plain dgrad does: split "n", items of 2 tile_n columns, the WGs share the dy
tile and each takes tile_n columns; split "m", the WGs share the w2 tile and each takes half of the
segment's tile_m rows. Then the two epilogues run together, not under the other WG's main loop.

The epilogue works in column chunks of epi_n: it TMA-loads the gate and up chunks of its rows into its
staging buffer (the first chunk's loads start before the item's main loop, PREFETCH), computes both
gradients in fp32 from the accumulator, a block of rows at a time (ROW_SPLIT), writes them back over the
staging buffer, then TMA-stores the segment's rows of them (the ladder of ops/gmm_pallas_fwd.py). The tail past
sum(group_sizes) is written as zeros without reading gu.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import gmm_pallas_pipeline as pipeline
from ops.gmm_pallas_common import (ROW_ALIGN, FwdConfig, compiler_params, interpret_params,
                                   num_sms, smem_transforms)
from ops.gmm_pallas_fwd import _ladder_store, _wait_staging, segment_items, segment_table

# 128 x 128 WG tiles as the plain dgrad's H200 pick; SMEM: 4 ring slots of 32 KiB + 64 KiB of staging
# (2 WGs x gate/up x 128 x 64 bf16). With few groups (long row runs) a fifth slot measured 6 % faster
# (mixtral_small, E=8: 1.277 against 1.358 ms) and with 64 groups 2 % slower (1.454 against 1.428 ms);
# experiments/bench_ops.py, H200, 2026-12-03, before PREFETCH (with it: 1.203 against 1.316 ms at E=8,
# 1.252 against 1.249 ms at E=64).
DSWIGLU_BWD = FwdConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, delay_release=1,
                        epi_n=64, grid_tile_width=8, pingpong=True)
DSWIGLU_BWD_FEW_GROUPS = dataclasses.replace(DSWIGLU_BWD, max_concurrent_steps=5)
# the first chunk's gate/up loads start before the item's main loop (its latency off the epilogue)
PREFETCH = True
# The epilogue's SwiGLU math on row blocks of a WG's rows // ROW_SPLIT of each column chunk (64-row
# multiples: the WGMMA layout's tile). On whole chunks (1) the 128 x 128 float32 accumulator plus a
# 64-column chunk's gate, up and gradients pass the 232 registers a compute thread has, and the kernel
# spills. Row blocks are contiguous in the staging buffer, so their loads keep the whole chunk's access
# pattern (column slices conflict on banks). H200, mixtral shape: spill requests 1.37 M -> 0.31 M, 1.290
# -> 1.159 ms per call (deepseek's 1.307 -> 1.310); in the step ~1 % less kernel time (ops/NOTES_fused_ops.md).
ROW_SPLIT = 2
# The epilogue's sigmoid from the MUFU's ex2.approx and rsqrt.approx (True): s = rsqrt(1 + 2^(-g log2 e))^2, two
# MUFU instructions and three arithmetic ones in place of the exact exp's and division's longer sequences; or as
# 1 / (1 + e^-g) with an IEEE exp and division (False). The form with exact operations is within 2e-6 of the
# sigmoid for |g| <= 16 (tests); the two instructions add ~2^-22 each by the PTX ISA's bounds, and the gradients
# are rounded to bf16 (2^-9); the GPU tests match the reference with either. H100, GPU time per call: 2-3 % less
# (mixtral shape 0.983 -> 0.950 ms, deepseek 1.131 -> 1.108); in the step 0.3-0.6 ms a step less of this
# kernel (experiments/NOTES_speed.md, stop 50).
FAST_SIGMOID = True
# Split "n" / "m" (both WGs on one 128 x 256 / 256 x 128 item, as the plain dgrad's and the E=64 forward's
# table picks): a WG tile's share of the L2 -> SMEM traffic is 3/4 of ping-pong's, but the two epilogues run
# together, not under the other WG's main loop. SMEM: 3 slots of 48 KiB + the 64 KiB of staging. Split n
# needs F % 256 == 0 (mixtral_small's 4096; not deepseek_small's 1408); split m takes 256-row segments.
# Not used: 10-15 % slower than ping-pong at the mixtral shape (H100, experiments/NOTES_speed.md stop 48);
# kept to be timed at E=64 (split m).
DSWIGLU_BWD_SPLIT_N = FwdConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=3, delay_release=1,
                                epi_n=64, grid_tile_width=8, split="n", pingpong=False)
DSWIGLU_BWD_SPLIT_M = dataclasses.replace(DSWIGLU_BWD_SPLIT_N, tile_m=256, split="m")
INTERPRET_DSWIGLU_BWD = FwdConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, epi_n=32,
                                  grid_tile_width=2, pingpong=True)


def config_for(num_groups: int) -> FwdConfig:
    """The GPU config for w2 of num_groups experts (see DSWIGLU_BWD)."""
    return DSWIGLU_BWD_FEW_GROUPS if num_groups <= 16 else DSWIGLU_BWD


def _tiles(cfg: FwdConfig) -> tuple[int, int]:
    """(rows, columns of F) of one compute WG's tile: tile_m x tile_n, or half the rows in split "m"."""
    split_m = not cfg.pingpong and cfg.split == "m"
    return (cfg.tile_m // 2 if split_m else cfg.tile_m), cfg.tile_n


def _cta_cols(cfg: FwdConfig) -> int:
    """Columns of F per work item: both WGs' tile_n in split "n", one tile_n otherwise."""
    return 2 * cfg.tile_n if not cfg.pingpong and cfg.split == "n" else cfg.tile_n


def check_shapes(m, n, f, cfg: FwdConfig) -> str:
    """Why the kernel cannot take dy [m, n] against w2 [G, f, n] with cfg ("" when it can)."""
    if f % _cta_cols(cfg):
        return f"F = {f} is not a multiple of the {_cta_cols(cfg)}-column work item"
    if n % cfg.tile_k:
        return f"N = {n} (fc2's output width) is not a multiple of the {cfg.tile_k}-row k-step"
    return ""


def gmm_dswiglu_kernel(dy, w2, gu, group_sizes, *, cfg: FwdConfig = DSWIGLU_BWD, interpret=False):
    """dgu [M, 2F] in gu's dtype (see the module docstring); rows past sum(group_sizes) are zeros.
    interpret: w2 comes pre-transposed as [G, N, F] (interpret mode has no transposed wgmma operand)."""
    m, n = dy.shape
    g = w2.shape[0]
    f = w2.shape[2] if interpret else w2.shape[1]
    out_dtype = gu.dtype
    if gu.shape != (m, 2 * f):
        raise ValueError(f"gmm_dswiglu_kernel: gu must be [M, 2F] = {(m, 2 * f)}, got {gu.shape}")
    why = check_shapes(m, n, f, cfg)
    if why:
        raise ValueError(f"gmm_dswiglu_kernel: {why}")
    pp = cfg.pingpong
    tm, tk = cfg.tile_m, cfg.tile_k
    wm, tn = _tiles(cfg)  # a WG's tile
    split_m = wm < tm
    cn = _cta_cols(cfg)
    epi_n = min(cfg.epi_n, tn)
    if cfg.split not in ("m", "n") or wm % 64 or wm * tn > 128 * 128 or tn % epi_n:
        raise ValueError(f"gmm_dswiglu_kernel: needs split m or n, 64 | WG rows, WG tile <= 128 x 128 "
                         f"and epi_n | tile_n, got {cfg}")
    if wm % ROW_SPLIT or (not interpret and (wm // ROW_SPLIT) % 64):  # the WGMMA layout's 64-row tiles
        raise ValueError(f"gmm_dswiglu_kernel: ROW_SPLIT={ROW_SPLIT} must cut the WG's {wm} rows into blocks "
                         f"of 64k rows")
    if not interpret and (epi_n * jnp.dtype(out_dtype).itemsize) % 128:
        raise ValueError(f"gmm_dswiglu_kernel: epi_n must be 128 bytes wide (TMA stores start at any "
                         f"staging row), got epi_n={epi_n}")
    grid_n = f // cn
    k_iters = n // tk
    stages = cfg.max_concurrent_steps
    table, count = segment_table(group_sizes, m, tm, cfg.group_tiles)
    in_tf = smem_transforms(dy.dtype, tk)
    rhs_tf = smem_transforms(w2.dtype, cn if interpret else tk)
    rhs_block = (tk, cn) if interpret else (cn, tk)

    def body(table_gmem, count_gmem, dy_gmem, w2_gmem, gu_gmem, dgu_gmem):
        pl.run_scoped(
            functools.partial(scoped, table_gmem, count_gmem, dy_gmem, w2_gmem, gu_gmem, dgu_gmem),
            lhs_smem=plgpu.SMEM((stages, tm, tk), dy.dtype, transforms=in_tf),
            rhs_smem=plgpu.SMEM((stages, *rhs_block), w2.dtype, transforms=rhs_tf),
            stage_smem=plgpu.SMEM((2, 2, wm, epi_n), out_dtype),  # per WG: gate, up chunks in; grads out
            loaded=plgpu.Barrier(num_arrivals=2, num_barriers=pipeline.loaded_barriers(stages, pp)),
            consumed=plgpu.Barrier(num_arrivals=pipeline.consumers_per_slot(2, pp),
                                   num_barriers=stages),
            gu_loaded=plgpu.Barrier(num_arrivals=2, num_barriers=2),
            collective_axes="wg")

    def scoped(table_gmem, count_gmem, dy_gmem, w2_gmem, gu_gmem, dgu_gmem, lhs_smem, rhs_smem,
               stage_smem, loaded, consumed, gu_loaded):
        num_items, fetch, steps_of = segment_items(table_gmem, count_gmem, grid_n, g, k_iters, cfg)
        wg = lax.axis_index("wg")

        def wg_rows(info):
            """This WG's first row in dy, and its rows [lo, hi) of the segment within its tile."""
            row0, packed, _, _ = info
            row0 = pl.multiple_of(row0, ROW_ALIGN)  # layout inference must see it (TMA tiles)
            rows, start = packed & 0xFFFF, packed >> 16
            if not split_m:
                return row0, start, start + rows
            w0 = wg * wm
            return row0 + w0, jnp.clip(start - w0, 0, wm), jnp.clip(start + rows - w0, 0, wm)

        def wg_col0(ni):  # this WG's first column of F in item column tile ni
            return ni * cn + (wg * tn if cn > tn else 0)

        def load(info, kk, slot, barrier):
            row0, _, grp, ni = info
            row0 = pl.multiple_of(row0, ROW_ALIGN)
            ks, cols = pl.ds(kk * tk, tk), pl.ds(ni * cn, cn)
            plgpu.copy_gmem_to_smem(dy_gmem.at[pl.ds(row0, tm), ks], lhs_smem.at[slot], barrier)
            plgpu.copy_gmem_to_smem(w2_gmem.at[grp].at[(ks, cols) if interpret else (cols, ks)],
                                    rhs_smem.at[slot], barrier)

        def mma(info, kk, slot, acc_ref):
            a, b = lhs_smem.at[slot], rhs_smem.at[slot]
            cols = pl.ds(wg * tn, tn)  # split n: this WG's columns of the item
            if interpret:
                b = b.at[:, cols] if cn > tn else b
            elif cn > tn:  # slice the [2 tn, tk] tile's rows first: JAX 0.10's Mosaic cannot slice a transposed ref
                b = b.at[cols, :].transpose((1, 0))
            else:
                b = b.transpose((1, 0))
            if not split_m:
                plgpu.wgmma(acc_ref, a, b)
                return
            _, lo, hi = wg_rows(info)

            @pl.when(lo < hi)
            def _():  # a WG with no rows of the segment leaves the tensor cores to the other
                plgpu.wgmma(acc_ref, a.at[pl.ds(wg * wm, wm)], b)

        def load_gu(info, c):
            """Start the TMA loads of the WG's gate and up chunk c into its staging buffer (after the
            stores issued so far have read it)."""
            _, _, grp, ni = info
            wrow0, _, _ = wg_rows(info)
            _wait_staging()

            @pl.when(grp < g)
            def _():
                for half in (0, 1):
                    plgpu.copy_gmem_to_smem(
                        gu_gmem.at[pl.ds(wrow0, wm), pl.ds(half * f + wg_col0(ni) + c * epi_n, epi_n)],
                        stage_smem.at[wg, half], gu_loaded.at[wg])

        def prologue(info):  # chunk 0 lands while the main loop runs
            if PREFETCH:
                load_gu(info, 0)

        def epilogue(info, acc_ref):
            _, _, grp, ni = info
            wrow0, lo, hi = wg_rows(info)
            dh = acc_ref[...]
            rb = wm // ROW_SPLIT  # read at trace time
            for c in range(tn // epi_n):  # column chunks: SMEM stays small
                cols = slice(c * epi_n, (c + 1) * epi_n)
                col0 = wg_col0(ni) + c * epi_n
                if c or not PREFETCH:
                    load_gu(info, c)

                @pl.when(grp < g)
                def _():
                    plgpu.barrier_wait(gu_loaded.at[wg])

                @pl.when(grp >= g)
                def _():  # the tail: dh is zero; zeros in, so no NaN from stale staging
                    zeros = jnp.zeros((wm, epi_n), out_dtype)
                    stage_smem[wg, 0] = zeros
                    stage_smem[wg, 1] = zeros

                for r in range(ROW_SPLIT):
                    rs = slice(r * rb, (r + 1) * rb)
                    gate = stage_smem[wg, 0, rs].astype(jnp.float32)
                    up = stage_smem[wg, 1, rs].astype(jnp.float32)
                    d = dh[rs, cols]
                    dgate, dup = _dswiglu(d, gate, up)
                    stage_smem[wg, 0, rs] = dgate.astype(out_dtype)
                    stage_smem[wg, 1, rs] = dup.astype(out_dtype)
                plgpu.commit_smem()
                for half in (0, 1):
                    _ladder_store(stage_smem.at[wg, half], dgu_gmem, wrow0, lo, hi - lo, half * f + col0,
                                  epi_n, min(wm, m))

        pipeline.run(num_items=num_items, fetch=fetch, steps_of=steps_of, load=load,
                     mma=mma, epilogue=epilogue, acc_shape=(wm, tn), stages=stages,
                     loaded=loaded, consumed=consumed, delay_release=cfg.delay_release,
                     pingpong=pp, prologue=prologue)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the compute WGs' last stores

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m, 2 * f), out_dtype),
        grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        kernel_name="gmm_dswiglu", compiler_params=compiler_params(approx_math=FAST_SIGMOID),
        interpret=interpret_params(interpret))
    return kernel(table, count, dy, w2, gu)


def _dswiglu(d, gate, up):
    """SwiGLU's backward for the cotangent d in float32: (dgate, dup) = (d·u·s·(1 + g·(1 − s)), d·g·s).

    As ds = d·s, dup = ds·g, a = ds·u, dgate = a + a·(g − g·s): five multiplies or FMAs per element
    after the sigmoid, where the product form takes eight operations."""
    s = _sigmoid(gate)
    ds = d * s
    a = ds * up
    return a + a * (gate - gate * s), ds * gate


def _sigmoid(x):
    """sigmoid(x) in float32, in the form FAST_SIGMOID picks (read when the kernel is traced)."""
    if not FAST_SIGMOID:
        return 1.0 / (1.0 + jnp.exp(-x))
    # exp2, not exp: Mosaic's approximate exp scales then calls the exact exp2. 2^(-x log2 e) = inf for
    # x < -88: rsqrt(inf) = 0, the sigmoid's limit
    r = lax.rsqrt(1.0 + jnp.exp2(x * -1.4426950408889634))
    return r * r
