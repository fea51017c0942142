"""RMSNorm over the last axis as two Pallas (Triton) kernels, forward and backward, with a custom VJP.

  rms_norm(x[..., D], scale[D], eps) = x / sqrt(mean(x², -1) + eps) · scale   (float32 math, x's dtype out)

Forward: one program per block of rows writes y and each row's 1/rms (float32, saved for the backward).
Backward: one program per `ROWS_PER_PROGRAM` rows, in chunks, writes
  dx = r · (s·dy − x̂ · mean(x̂ · s·dy))        (x̂ = x·r, r = 1/rms, s = scale)
and accumulates its rows' share of dscale = Σ_rows dy · x̂ in registers; XLA sums the [programs, D]
partials. Rows of width D that is a power of two up to 16384 take the kernels (`backend="auto"` on an
NVIDIA GPU); other widths, and CPU, take the reference: the formula with plain autodiff, which XLA fuses.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.pallas_triton import MAX_ROW, compiler_params, is_pow2, resolve, rows_per_block
from ops.shard_types import match_vma

ROWS_PER_PROGRAM = 64  # backward: rows whose dscale share one program sums before XLA adds the partials


def reference_rms_norm(x, scale, eps: float):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(x_ref, s_ref, y_ref, r_ref, *, eps):
    x = x_ref[...].astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + eps)
    y_ref[...] = (x * r[:, None] * s_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
    r_ref[...] = r


def _bwd_kernel(x_ref, s_ref, r_ref, dy_ref, dx_ref, ds_ref, *, chunk):
    s = s_ref[...].astype(jnp.float32)

    def body(i, acc):
        rows = pl.ds(i * chunk, chunk)
        x = x_ref[rows, :].astype(jnp.float32)
        dy = dy_ref[rows, :].astype(jnp.float32)
        r = r_ref[rows]
        xh = x * r[:, None]
        g = dy * s[None, :]
        c = jnp.mean(xh * g, axis=1)
        dx_ref[rows, :] = (r[:, None] * (g - xh * c[:, None])).astype(dx_ref.dtype)
        return acc + jnp.sum(dy * xh, axis=0)

    acc = jax.lax.fori_loop(0, x_ref.shape[0] // chunk, body, jnp.zeros(s.shape, jnp.float32))
    ds_ref[0, :] = acc


def _fwd(x2, scale, eps, interpret):
    rows, d = x2.shape
    br = rows_per_block(rows, d)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps), grid=(rows // br,),
        in_specs=[pl.BlockSpec((br, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((br, d), lambda i: (i, 0)), pl.BlockSpec((br,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((rows, d), x2.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        compiler_params=compiler_params(num_warps=8 if d >= 4096 else 4, interpret=interpret),
        interpret=interpret, name="rms_norm_fwd")(x2, scale)


def _bwd(x2, scale, r, dy2, interpret):
    rows, d = x2.shape
    per = rows_per_block(rows, 1, ROWS_PER_PROGRAM)  # rows per program (a power of two dividing rows)
    chunk = min(per, rows_per_block(rows, d))
    dx, ds = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk), grid=(rows // per,),
        in_specs=[pl.BlockSpec((per, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,)),
                  pl.BlockSpec((per,), lambda i: (i,)), pl.BlockSpec((per, d), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((per, d), lambda i: (i, 0)), pl.BlockSpec((1, d), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, d), x2.dtype),
                   jax.ShapeDtypeStruct((rows // per, d), jnp.float32)],
        compiler_params=compiler_params(num_warps=8 if d >= 4096 else 4, interpret=interpret),
        interpret=interpret, name="rms_norm_bwd")(x2, scale, r, dy2)
    return dx, jnp.sum(ds, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, scale, eps, interpret):
    return match_vma(_fwd(x.reshape(-1, x.shape[-1]), scale, eps, interpret)[0].reshape(x.shape), x, scale)


def _rms_norm_fwd(x, scale, eps, interpret):
    y, r = _fwd(x.reshape(-1, x.shape[-1]), scale, eps, interpret)
    return match_vma(y.reshape(x.shape), x, scale), (x, scale, r)


def _rms_norm_bwd(eps, interpret, res, dy):
    x, scale, r = res
    dx, ds = _bwd(x.reshape(-1, x.shape[-1]), scale, r, dy.reshape(-1, x.shape[-1]).astype(x.dtype),
                  interpret)
    return match_vma(dx.reshape(x.shape), x), match_vma(ds.astype(scale.dtype), scale)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def kernel_takes(x_shape) -> tuple[bool, str]:
    """Whether the kernels take rows of this shape, and why not."""
    d = x_shape[-1]
    if not (is_pow2(d) and d <= MAX_ROW):
        return False, f"row width {d} is not a power of two <= {MAX_ROW}"
    return True, ""


def rms_norm(x, scale, eps: float, *, backend: str = "auto", interpret: bool = False):
    """RMSNorm of x [..., D] with scale [D]; float32 math, x's dtype out. Backends: "pallas" (the
    kernels), "reference" (plain JAX), "auto" (pallas on an NVIDIA GPU where the shape fits)."""
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: scale {scale.shape} must be [{x.shape[-1]}] for x {x.shape}")
    ok, why = kernel_takes(x.shape)
    if resolve("rms_norm", backend, ok, why, interpret) == "reference":
        return reference_rms_norm(x, scale, eps)
    # inside shard_map a replicated scale takes x's varying axes here, outside the custom VJP: the cast's
    # transpose sums its gradient over them, as autodiff of the reference would
    return _rms_norm(x, match_vma(scale, x), float(eps), bool(interpret))
