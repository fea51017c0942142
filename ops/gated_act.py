"""SwiGLU with a custom VJP: the forward is the plain JAX formula, the backward one Pallas (Triton) kernel.

  swiglu(h[R, 2, F]) = silu(g) · u            (g = h[:, 0, :] the gate, u = h[:, 1, :] the up projection)

Forward: the formula as in `moe_jax.layers.activate`; XLA fuses it and runs at HBM speed, so it stays XLA.
Backward: one program per block of `BR` rows × `BF` columns reads g, u and dy once and writes both halves
of dh [R, 2, F] itself (float32 math, h's dtype out; no concatenate in XLA afterwards):
  s = sigmoid(g);  dg = dy · u · s · (1 + g · (1 − s));  du = dy · g · s
The column block BF is the largest power of two <= `MAX_COLS` that divides F, so F need only be a multiple
of `MIN_COLS`: F = 4096 takes BF = 1024, F = 1408 = 11·128 takes BF = 128. Such shapes take the kernel
(`backend="auto"` on an NVIDIA GPU); others, and CPU, take the reference: the formula with plain autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.pallas_triton import compiler_params, resolve, rows_per_block

MAX_COLS = 1024  # widest column block of one program
MIN_COLS = 16  # narrowest column block the kernel takes (F must be a multiple of it)


def reference_swiglu(h_R2F):
    return jax.nn.silu(h_R2F[:, 0, :]) * h_R2F[:, 1, :]


def _col_block(f: int) -> int:
    """The largest power of two <= MAX_COLS that divides f."""
    return min(f & -f, MAX_COLS)


# ----------------------------------------------------------------------------- kernel
def _bwd_kernel(h_ref, dy_ref, dh_ref):
    g = h_ref[:, 0, :].astype(jnp.float32)
    u = h_ref[:, 1, :].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    dh_ref[:, 0, :] = (dy * u * s * (1.0 + g * (1.0 - s))).astype(dh_ref.dtype)
    dh_ref[:, 1, :] = (dy * g * s).astype(dh_ref.dtype)


def _bwd(h, dy, interpret):
    rows, _, f = h.shape
    bf = _col_block(f)
    br = rows_per_block(rows, 2 * bf)  # h block: br × 2 × bf <= 8192 elements
    return pl.pallas_call(
        _bwd_kernel, grid=(rows // br, f // bf),
        in_specs=[pl.BlockSpec((br, 2, bf), lambda i, j: (i, 0, j)), pl.BlockSpec((br, bf), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((br, 2, bf), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        compiler_params=compiler_params(num_warps=4, interpret=interpret),
        interpret=interpret, name="swiglu_bwd")(h, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swiglu(h, interpret):
    return reference_swiglu(h)


def _swiglu_fwd(h, interpret):
    return reference_swiglu(h), h


def _swiglu_bwd(interpret, h, dy):
    return (_bwd(h, dy.astype(h.dtype), interpret),)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_vjp(h_R2F, dy, *, backend: str = "auto", interpret: bool = False):
    """dh [R, 2, F] of swiglu at h [R, 2, F] for the cotangent dy [R, F]: the backward kernel where
    `backend` resolves to it (as in `swiglu`), else the reference's autodiff. For callers that keep h
    themselves (ops.grouped_swiglu's fused forward)."""
    ok, why = kernel_takes(h_R2F.shape)
    dy = dy.astype(h_R2F.dtype)
    if resolve("swiglu", backend, ok, why, interpret, h_R2F) == "reference":
        return jax.vjp(reference_swiglu, h_R2F)[1](dy)[0]
    return _bwd(h_R2F, dy, interpret)


def kernel_takes(h_shape) -> tuple[bool, str]:
    """Whether the backward kernel takes h of this shape [R, 2, F], and why not: F must be a multiple of
    MIN_COLS (any R: the row block is the largest power of two dividing R that fits)."""
    f = h_shape[-1]
    if f % MIN_COLS:
        return False, f"F = {f} is not a multiple of {MIN_COLS}"
    return True, ""


def swiglu(h_R2F, *, backend: str = "auto", interpret: bool = False):
    """silu(h[:, 0, :]) · h[:, 1, :] of h [R, 2, F] (gate first), [R, F] in h's dtype. Backends: "pallas"
    (plain forward, the kernel's backward), "reference" (plain JAX), "auto" (pallas on an NVIDIA GPU where
    the shape fits)."""
    if h_R2F.ndim != 3 or h_R2F.shape[1] != 2:
        raise ValueError(f"swiglu: h must be [R, 2, F] (gate, up), got {h_R2F.shape}")
    ok, why = kernel_takes(h_R2F.shape)
    if resolve("swiglu", backend, ok, why, interpret, h_R2F) == "reference":
        return reference_swiglu(h_R2F)
    return _swiglu(h_R2F, bool(interpret))
