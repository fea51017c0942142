"""Grouped GEMM with SwiGLU in its epilogue (Mosaic GPU, Hopper): fc1 of gated experts in one pass.

  gu[M, 2F] = lhs_g @ rhs[g]        rhs[g] = [K, 2F]: gate columns [0, F), up columns [F, 2F)
  h[M, F]   = silu(gate) · up

A work item is (row segment of tile_m rows, tile_n columns of F). Its compute warpgroup accumulates the
gate tile and the up tile of the same columns side by side: two fp32 accumulators, two wgmmas per k-step
on one A tile. The epilogue has both halves in registers, so it writes h beside gate and up: the
activation reads no [M, 2F] back from HBM. gu is kept for the backward (ops/grouped_swiglu.py).

Why it is not faster (measured, ops/NOTES_fused_ops.md): the plain kernel's 128 x 128 WG tile needs 96
bytes of SMEM reads per clock at full wgmma rate; two half-width wgmmas on one A tile need either 64-row
tiles (25 % more operand traffic through L2 per MAC) or 64-column wgmmas (128 B/clock, the SMEM limit).
One 128-column accumulator holding 64 gate and 64 up columns needs a B tile [tile_k, 128] whose halves
come from two places in w1. In the wgmma operand's (8, 64)-tiled layout the halves interleave every 8
rows, so a TMA copy cannot fill one half; Mosaic refuses other tilings for the operand. Filled by one
TMA copy per 8-row tile (16 per k-step) it ran correct but 1.77x slower (3.13 against 1.77 ms at the
mixtral shape, H200, commit 42edfe9). With w1's gate and up columns interleaved in HBM so that one TMA
box fills the B tile (commit d74f7b0, since removed) it matched the unfused pair and no more: 1.706 against
1.715 ms (GEMM alone 1.459) at the mixtral shape, 1.847 against 1.842 at deepseek's (H100, 2026-12-05).

Ping-pong only: each compute WG takes whole items in turn on the shared ring (ops/gmm_pallas_pipeline.py),
so one WG's epilogue runs under the other's wgmmas. The schedule (row segments, the tail past
sum(group_sizes) written as zeros, the ladder of TMA stores) is the plain forward kernel's
(ops/gmm_pallas_fwd.py).
"""
from __future__ import annotations

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

# 128 rows x (64 gate + 64 up) columns per item: 2 x 32 fp32 registers per thread of accumulators; SMEM
# per ring slot 16 KiB (A) + 16 KiB (B), 4 slots + 96 KiB of store staging. The best of the sweep
# (experiments/sweep_grouped_swiglu.py, H200, 2026-12-02); still slower than the unfused pair there.
SWIGLU_FWD = FwdConfig(tile_m=128, tile_n=64, tile_k=64, max_concurrent_steps=4, delay_release=1,
                       epi_n=64, grid_tile_width=8, pingpong=True)
INTERPRET_SWIGLU_FWD = FwdConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, epi_n=32,
                                 grid_tile_width=2, pingpong=True)


def check_shapes(m, k, n2, cfg: FwdConfig) -> str:
    """Why the kernel cannot take lhs [m, k] @ rhs [G, k, n2] with cfg ("" when it can)."""
    if n2 % 2:
        return f"the fc1 width 2F = {n2} is odd"
    if (n2 // 2) % cfg.tile_n:
        return f"F = {n2 // 2} is not a multiple of the {cfg.tile_n}-column tile"
    if k % cfg.tile_k:
        return f"K = {k} is not a multiple of the {cfg.tile_k}-row k-step"
    return ""


def gmm_swiglu_kernel(lhs, rhs, group_sizes, *, out_dtype, cfg: FwdConfig = SWIGLU_FWD,
                      interpret=False):
    """(gu [M, 2F], h [M, F]) of lhs [M, K] and rhs [G, K, 2F] (see the module docstring); rows past
    sum(group_sizes) are zeros in both."""
    m, k = lhs.shape
    g, _, n2 = rhs.shape
    f = n2 // 2
    why = check_shapes(m, k, n2, cfg)
    if why:
        raise ValueError(f"gmm_swiglu_kernel: {why}")
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    if tm % 64 or tm * tn > 64 * 128:
        raise ValueError(f"gmm_swiglu_kernel: tile_m must be a multiple of 64 with tile_m * tile_n <= "
                         f"64 * 128 (two fp32 accumulators per WG), got {tm} x {tn}")
    epi_n = min(cfg.epi_n, tn)
    if tn % epi_n or (not interpret and (epi_n * jnp.dtype(out_dtype).itemsize) % 128):
        raise ValueError(f"gmm_swiglu_kernel: epi_n must divide tile_n and be 128 bytes wide (TMA "
                         f"stores start at any staging row), got epi_n={epi_n} tile_n={tn}")
    grid_n = f // tn
    k_iters = k // tk
    stages = cfg.max_concurrent_steps
    table, count = segment_table(group_sizes, m, tm, cfg.group_tiles)
    in_tf = smem_transforms(lhs.dtype, tk)
    rhs_tf = smem_transforms(rhs.dtype, tn)

    def body(table_gmem, count_gmem, lhs_gmem, rhs_gmem, gu_gmem, h_gmem):
        pl.run_scoped(
            functools.partial(scoped, table_gmem, count_gmem, lhs_gmem, rhs_gmem, gu_gmem, h_gmem),
            lhs_smem=plgpu.SMEM((stages, tm, tk), lhs.dtype, transforms=in_tf),
            rhs_smem=plgpu.SMEM((stages, 2, tk, tn), rhs.dtype, transforms=rhs_tf),
            out_smem=plgpu.SMEM((2, 3, tm, epi_n), out_dtype),  # per WG: gate, up, h chunks
            loaded=plgpu.Barrier(num_arrivals=3, num_barriers=pipeline.loaded_barriers(stages, True)),
            consumed=plgpu.Barrier(num_arrivals=pipeline.consumers_per_slot(2, True),
                                   num_barriers=stages),
            collective_axes="wg")

    def scoped(table_gmem, count_gmem, lhs_gmem, rhs_gmem, gu_gmem, h_gmem, lhs_smem, rhs_smem,
               out_smem, loaded, consumed):
        num_items, fetch, steps_of = segment_items(table_gmem, count_gmem, grid_n, g, k_iters, cfg)

        def load(info, kk, slot, barrier):
            row0, _, grp, ni = info
            row0 = pl.multiple_of(row0, ROW_ALIGN)  # layout inference must see it (TMA tiles)
            ks = pl.ds(kk * tk, tk)
            plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(row0, tm), ks], lhs_smem.at[slot], barrier)
            for half in (0, 1):  # gate, up: the same F columns of each half of rhs
                plgpu.copy_gmem_to_smem(rhs_gmem.at[grp].at[ks, pl.ds(half * f + ni * tn, tn)],
                                        rhs_smem.at[slot, half], barrier)

        def mma(info, kk, slot, accs):
            for half, acc in enumerate(accs):
                plgpu.wgmma(acc, lhs_smem.at[slot], rhs_smem.at[slot, half])

        def epilogue(info, accs):
            row0, packed, _, ni = info
            rows, start = packed & 0xFFFF, packed >> 16
            wg = lax.axis_index("wg")
            gate, up = (acc[...] for acc in accs)
            for c in range(tn // epi_n):  # column chunks: SMEM stays small
                cols = slice(c * epi_n, (c + 1) * epi_n)
                gc, uc = gate[:, cols], up[:, cols]
                hc = gc / (1.0 + jnp.exp(-gc)) * uc  # silu(g) · u from the fp32 accumulators
                col0 = ni * tn + c * epi_n
                _wait_staging()
                out_smem[wg, 0] = gc.astype(out_dtype)
                out_smem[wg, 1] = uc.astype(out_dtype)
                out_smem[wg, 2] = hc.astype(out_dtype)
                plgpu.commit_smem()
                for j, (dst, c0) in enumerate(((gu_gmem, col0), (gu_gmem, f + col0), (h_gmem, col0))):
                    _ladder_store(out_smem.at[wg, j], dst, row0, start, rows, c0, epi_n, min(tm, m))

        pipeline.run(num_items=num_items, fetch=fetch, steps_of=steps_of, load=load,
                     mma=mma, epilogue=epilogue, acc_shape=((tm, tn), (tm, tn)), stages=stages,
                     loaded=loaded, consumed=consumed, delay_release=cfg.delay_release,
                     pingpong=True)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the compute WGs' last stores

    kernel = plgpu.kernel(
        body, out_type=(jax.ShapeDtypeStruct((m, n2), out_dtype), jax.ShapeDtypeStruct((m, f), out_dtype)),
        grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3, thread_name="wg",
        kernel_name="gmm_swiglu", compiler_params=compiler_params(),
        interpret=interpret_params(interpret))
    return kernel(table, count, lhs, rhs)
