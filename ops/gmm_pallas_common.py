"""Shared pieces of the Mosaic-GPU grouped-matmul kernels: tile configs and small helpers."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

MEMORY_REGISTERS = 40
# group tiles start on multiples of this: Mosaic's layout inference needs a TMA copy's row index
# into the 8-row-tiled, swizzled SMEM operands to be a provable multiple of the tile rows
ROW_ALIGN = 8


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    tile_m: int = 128          # rows per segment (CTA tile rows)
    tile_n: int = 128          # split "n": columns per compute WG (CTA 2*tile_n); "m": CTA cols
    tile_k: int = 64
    max_concurrent_steps: int = 4  # SMEM ring slots (one ring per SM, across work items)
    grid_minor_dim: int = 1    # planar_snake minor dim over (segments, N tiles)
    grid_tile_width: int = 8
    delay_release: int = 0     # 1: two wgmma groups in flight per WG, step t-1 released at t
    epi_n: int = 64            # epilogue column chunk (SMEM staging: 2 WGs x WG rows x epi_n)
    slice_then_transpose: bool = False  # transpose_rhs: slice rhs SMEM tile before transposing
    split: str = "n"           # the 2 compute WGs split the CTA tile's "n" (cols) or "m" (rows)
    pingpong: bool = False     # each WG takes whole tile_m x tile_n items, alternating (no split)
    group_tiles: bool = True   # row tiles start at each group's first row (else at i*tile_m)


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
    ring: bool = False         # one SMEM ring per SM across work items (gmm_pallas_pipeline)
    pingpong: bool = False     # ring only: each WG takes whole tile_a x tile_b items, alternating
    group_tiles: bool = True   # ring only: row steps start at the group's first row (8-aligned)


def smem_transforms(dtype, minor_elems):
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def sm_margin() -> int:
    """SMs the persistent kernels leave free (env MOE_JAX_SM_MARGIN, default 0), e.g. for NCCL
    kernels that XLA runs concurrently on another stream: a persistent grid that fills every SM
    makes them wait for it to finish."""
    v = os.environ.get("MOE_JAX_SM_MARGIN", "0")
    if not v.isdigit():
        raise ValueError(f"MOE_JAX_SM_MARGIN={v!r} must be a non-negative integer")
    return int(v)


def grid_sms(count: int) -> int:
    """CTAs of a persistent grid on a device with `count` SMs: all but the margin (at least one)."""
    return max(1, count - min(sm_margin(), count - 1))


def num_sms(interpret):
    return 2 if interpret else grid_sms(jax.devices()[0].core_count)


def compiler_params(approx_math: bool = False):
    """Warpgroup semantics; approx_math: exp2, rsqrt, ... as the single MUFU instructions (ex2.approx,
    rsqrt.approx: ~2^-22 relative error by the PTX ISA) instead of their IEEE-exact expansions."""
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=approx_math)


def interpret_params(interpret):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    # TMA zero-fills reads past an array's end (the last row block); the interpreter would raise
    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")
