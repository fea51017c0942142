"""Rotary position embeddings (rotate-half) as a Pallas (Triton) kernel, forward and backward, with a
custom VJP.

  rope(x[B,S,N,H], cos[S,H], sin[S,H]):  with x1, x2 the halves of the head dim and c1|c2, s1|s2 those
  of the tables (not assumed equal: YaRN scales them),
    out1 = x1·c1 − x2·s1,   out2 = x2·c2 + x1·s2           (float32 math, x's dtype out)
  its VJP w.r.t. x (the transposed rotation):
    dx1 = dy1·c1 + dy2·s2,  dx2 = dy2·c2 − dy1·s1
  cos/sin are position tables, not trained: the custom VJP gives them zero cotangents.

Layout: x is viewed as [B·S, N, H]; one program per block of BS positions (a power of two dividing S,
about 8K elements a block) loads its [BS, N, H/2] halves and the matching [BS, H/2] halves of the
tables by ref slicing. One kernel serves both directions (the backward is the forward with the sines
swapped and negated). Shapes with N and H/2 powers of two, H <= 256 and N·H <= 16384 take the kernel
(`backend="auto"` on an NVIDIA GPU); others, and CPU, take the reference (`moe_jax.rope.apply_rope`'s
formula with plain autodiff, which XLA fuses).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.pallas_triton import MAX_ROW, compiler_params, is_pow2, resolve, rows_per_block

MAX_HEAD = 256


def reference_rope(x_BSNH, cos_SH, sin_SH):
    h = x_BSNH.shape[-1] // 2
    xf = x_BSNH.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    out = xf * cos_SH[None, :, None, :] + rot * sin_SH[None, :, None, :]
    return out.astype(x_BSNH.dtype)


# ----------------------------------------------------------------------------- kernel
def _kernel(x_ref, c_ref, s_ref, o_ref, *, bwd):
    h = x_ref.shape[-1] // 2
    lo, hi = pl.ds(0, h), pl.ds(h, h)
    x1 = x_ref[:, :, lo].astype(jnp.float32)
    x2 = x_ref[:, :, hi].astype(jnp.float32)
    c1, c2 = c_ref[:, lo][:, None, :], c_ref[:, hi][:, None, :]
    s1, s2 = s_ref[:, lo][:, None, :], s_ref[:, hi][:, None, :]
    if bwd:  # the transpose: the sines swap halves and sign
        s1, s2 = -s2, -s1
    o_ref[:, :, lo] = (x1 * c1 - x2 * s1).astype(o_ref.dtype)
    o_ref[:, :, hi] = (x2 * c2 + x1 * s2).astype(o_ref.dtype)


def _call(x, cos, sin, bwd, interpret):
    b, s, n, hd = x.shape
    bs = rows_per_block(s, n * hd)
    per_seq = s // bs
    x_spec = pl.BlockSpec((bs, n, hd), lambda i: (i, 0, 0))
    t_spec = pl.BlockSpec((bs, hd), lambda i: (i % per_seq, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, bwd=bwd), grid=(b * per_seq,),
        in_specs=[x_spec, t_spec, t_spec], out_specs=x_spec,
        out_shape=jax.ShapeDtypeStruct((b * s, n, hd), x.dtype),
        compiler_params=compiler_params(num_warps=4, interpret=interpret),
        interpret=interpret, name="rope_bwd" if bwd else "rope_fwd",
    )(x.reshape(b * s, n, hd), cos.astype(jnp.float32), sin.astype(jnp.float32))
    return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rope(x, cos, sin, interpret):
    return _call(x, cos, sin, False, interpret)


def _rope_fwd(x, cos, sin, interpret):
    return _call(x, cos, sin, False, interpret), (cos, sin)


def _rope_bwd(interpret, res, dy):
    cos, sin = res
    return _call(dy, cos, sin, True, interpret), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope.defvjp(_rope_fwd, _rope_bwd)


def kernel_takes(x_shape, table_shape) -> tuple[bool, str]:
    """Whether the kernel takes x [B, S, N, H] with tables of `table_shape`, and why not."""
    _, s, n, hd = x_shape
    if tuple(table_shape) != (s, hd):
        return False, f"tables {tuple(table_shape)} are not [S, H] = {(s, hd)}"
    if hd % 2 or not is_pow2(hd // 2) or hd > MAX_HEAD:
        return False, f"head dim {hd} is not 2·(a power of two) <= {MAX_HEAD}"
    if not is_pow2(n):
        return False, f"{n} heads (needs a power of two)"
    if n * hd > MAX_ROW:
        return False, f"N·H = {n * hd} elements a position (at most {MAX_ROW})"
    return True, ""


def rope(x_BSNH, cos_SH, sin_SH, *, backend: str = "auto", interpret: bool = False):
    """Rotate-half RoPE of x [B, S, N, H] by cos/sin [S, H]; float32 math, x's dtype out. Backends:
    "pallas" (the kernel), "reference" (plain JAX), "auto" (pallas on an NVIDIA GPU where the shape
    fits). On the kernel path cos/sin get zero gradients (position tables, not trained)."""
    if x_BSNH.ndim != 4 or x_BSNH.shape[-1] % 2:
        raise ValueError(f"rope: x {x_BSNH.shape} must be [B, S, N, H] with an even head dim H")
    want = (x_BSNH.shape[1], x_BSNH.shape[3])
    if cos_SH.shape != want or sin_SH.shape != want:
        raise ValueError(f"rope: cos {cos_SH.shape} and sin {sin_SH.shape} must be [S, H] = {want} "
                         f"for x {x_BSNH.shape}")
    ok, why = kernel_takes(x_BSNH.shape, cos_SH.shape)
    if resolve("rope", backend, ok, why, interpret, x_BSNH) == "reference":
        return reference_rope(x_BSNH, cos_SH, sin_SH)
    return _rope(x_BSNH, cos_SH, sin_SH, bool(interpret))
