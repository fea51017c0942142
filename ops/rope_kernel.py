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

  rope_qkv(y[B,S,N+2K,H], cos, sin, num_kv=K) -> (q[B,S,N,H], k[B,S,K,H], v[B,S,K,H]): the q, k and v
  heads of one merged projection, RoPE applied to q and k, in one pass over y. Its backward writes the
  merged gradient [B,S,N+2K,H] in one pass (dq, dk rotated back, dv copied). With separate projections
  XLA merges the three GEMMs itself and then slices q, k, v out of the product (a copy) and
  concatenates dq, dk, dv for the backward's GEMM (another); here neither copy is made. Each program
  takes a [BS, K, H] chunk of heads: chunks 0..N/K-1 are q's, then k's, then v's.
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


def _bad_head_dim(hd) -> str:
    """Why the kernels cannot take head dim hd ("" when they can)."""
    if hd % 2 or not is_pow2(hd // 2) or hd > MAX_HEAD:
        return f"head dim {hd} is not 2·(a power of two) <= {MAX_HEAD}"
    return ""


def kernel_takes(x_shape, table_shape) -> tuple[bool, str]:
    """Whether the kernel takes x [B, S, N, H] with tables of `table_shape`, and why not."""
    _, s, n, hd = x_shape
    if tuple(table_shape) != (s, hd):
        return False, f"tables {tuple(table_shape)} are not [S, H] = {(s, hd)}"
    if why := _bad_head_dim(hd):
        return False, why
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


# ----------------------------------------------------------------------------- q, k, v of one projection
def reference_rope_qkv(y_BSCH, cos_SH, sin_SH, num_kv):
    """(q, k, v) of the merged heads y [B, S, N + 2K, H]: slices, RoPE on q and k (plain JAX)."""
    n = y_BSCH.shape[2] - 2 * num_kv
    q, k, v = y_BSCH[:, :, :n], y_BSCH[:, :, n:n + num_kv], y_BSCH[:, :, n + num_kv:]
    return reference_rope(q, cos_SH, sin_SH), reference_rope(k, cos_SH, sin_SH), v


def _by_chunk(nq, q, k, v, c_ref, s_ref, bwd):
    """Program (i, j) of the chunk grid: rotates q's chunk j (j < nq) or k's (j == nq), copies v's
    (j == nq + 1); q, k and v are (source, destination) ref pairs."""
    j = pl.program_id(1)
    for when, (src, dst), rotate in ((j < nq, q, True), (j == nq, k, True), (j == nq + 1, v, False)):
        @pl.when(when)
        def _(src=src, dst=dst, rotate=rotate):
            if rotate:
                _kernel(src, c_ref, s_ref, dst, bwd=bwd)
            else:
                dst[...] = src[...]


def _qkv_fwd_kernel(y_ref, c_ref, s_ref, q_ref, k_ref, v_ref, *, nq):
    _by_chunk(nq, (y_ref, q_ref), (y_ref, k_ref), (y_ref, v_ref), c_ref, s_ref, bwd=False)


def _qkv_bwd_kernel(dq_ref, dk_ref, dv_ref, c_ref, s_ref, dy_ref, *, nq):
    _by_chunk(nq, (dq_ref, dy_ref), (dk_ref, dy_ref), (dv_ref, dy_ref), c_ref, s_ref, bwd=True)


def _qkv_specs(b, s, num_kv, hd, nq):
    """grid and block specs over [B·S, ., H] in chunks of K heads: (grid, the merged array's chunk j,
    q's chunk (j clamped into q's nq chunks), k's or v's whole heads, the tables)."""
    bs = rows_per_block(s, num_kv * hd)
    per_seq = s // bs
    chunk = (bs, num_kv, hd)
    return ((b * per_seq, nq + 2), pl.BlockSpec(chunk, lambda i, j: (i, j, 0)),
            pl.BlockSpec(chunk, lambda i, j: (i, jnp.minimum(j, nq - 1), 0)),
            pl.BlockSpec(chunk, lambda i, j: (i, 0, 0)),
            pl.BlockSpec((bs, hd), lambda i, j: (i % per_seq, 0)))


def _qkv_call(y, cos, sin, num_kv, interpret):
    b, s, c, hd = y.shape
    n = c - 2 * num_kv
    grid, merged, q_spec, kv_spec, t_spec = _qkv_specs(b, s, num_kv, hd, n // num_kv)
    q, k, v = pl.pallas_call(
        functools.partial(_qkv_fwd_kernel, nq=n // num_kv), grid=grid,
        in_specs=[merged, t_spec, t_spec], out_specs=[q_spec, kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct((b * s, n, hd), y.dtype),
                   jax.ShapeDtypeStruct((b * s, num_kv, hd), y.dtype),
                   jax.ShapeDtypeStruct((b * s, num_kv, hd), y.dtype)],
        compiler_params=compiler_params(num_warps=4, interpret=interpret),
        interpret=interpret, name="rope_qkv_fwd",
    )(y.reshape(b * s, c, hd), cos.astype(jnp.float32), sin.astype(jnp.float32))
    return q.reshape(b, s, n, hd), k.reshape(b, s, num_kv, hd), v.reshape(b, s, num_kv, hd)


def _qkv_bwd_call(dq, dk, dv, cos, sin, interpret):
    b, s, n, hd = dq.shape
    num_kv = dk.shape[2]
    grid, merged, q_spec, kv_spec, t_spec = _qkv_specs(b, s, num_kv, hd, n // num_kv)
    dy = pl.pallas_call(
        functools.partial(_qkv_bwd_kernel, nq=n // num_kv), grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, t_spec, t_spec], out_specs=merged,
        out_shape=jax.ShapeDtypeStruct((b * s, n + 2 * num_kv, hd), dq.dtype),
        compiler_params=compiler_params(num_warps=4, interpret=interpret),
        interpret=interpret, name="rope_qkv_bwd",
    )(dq.reshape(b * s, n, hd), dk.reshape(b * s, num_kv, hd), dv.reshape(b * s, num_kv, hd),
      cos.astype(jnp.float32), sin.astype(jnp.float32))
    return dy.reshape(b, s, n + 2 * num_kv, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rope_qkv(y, cos, sin, num_kv, interpret):
    return _qkv_call(y, cos, sin, num_kv, interpret)


def _rope_qkv_fwd(y, cos, sin, num_kv, interpret):
    return _qkv_call(y, cos, sin, num_kv, interpret), (cos, sin)


def _rope_qkv_bwd(num_kv, interpret, res, g):
    cos, sin = res
    dq, dk, dv = g
    return _qkv_bwd_call(dq, dk, dv, cos, sin, interpret), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_qkv.defvjp(_rope_qkv_fwd, _rope_qkv_bwd)


def qkv_kernel_takes(y_shape, table_shape, num_kv) -> tuple[bool, str]:
    """Whether the merged kernel takes y [B, S, N + 2K, H] (K = num_kv), and why not."""
    _, s, c, hd = y_shape
    n = c - 2 * num_kv
    if tuple(table_shape) != (s, hd):
        return False, f"tables {tuple(table_shape)} are not [S, H] = {(s, hd)}"
    if why := _bad_head_dim(hd):
        return False, why
    if not is_pow2(num_kv) or num_kv * hd > MAX_ROW:
        return False, f"{num_kv} KV heads (needs a power of two with K·H <= {MAX_ROW})"
    if n <= 0 or n % num_kv:
        return False, f"{n} query heads (needs a positive multiple of the {num_kv} KV heads)"
    return True, ""


def takes_qkv(y_shape, table_shape, num_kv, *, backend: str = "auto", interpret: bool = False, x=None) -> bool:
    """Whether `rope_qkv` with these arguments runs the kernel (not the reference); never raises."""
    ok, why = qkv_kernel_takes(y_shape, table_shape, num_kv)
    return ok and resolve("rope_qkv", backend, ok, why, interpret, x) == "pallas"


def rope_qkv(y_BSCH, cos_SH, sin_SH, *, num_kv: int, backend: str = "auto", interpret: bool = False):
    """(q [B,S,N,H], k [B,S,K,H], v [B,S,K,H]) from the merged projection y [B, S, N + 2K, H]
    (K = num_kv; its heads in the order q, k, v), RoPE (rotate-half, float32 math) on q and k.
    Backends as `rope`; the kernel's backward writes the merged gradient in one pass."""
    if y_BSCH.ndim != 4 or y_BSCH.shape[-1] % 2 or y_BSCH.shape[2] <= 2 * num_kv or num_kv < 1:
        raise ValueError(f"rope_qkv: y {y_BSCH.shape} must be [B, S, N + 2K, H] with N >= 1 query heads, "
                         f"K = num_kv = {num_kv} >= 1 and an even head dim H")
    want = (y_BSCH.shape[1], y_BSCH.shape[3])
    if cos_SH.shape != want or sin_SH.shape != want:
        raise ValueError(f"rope_qkv: cos {cos_SH.shape} and sin {sin_SH.shape} must be [S, H] = {want} "
                         f"for y {y_BSCH.shape}")
    ok, why = qkv_kernel_takes(y_BSCH.shape, cos_SH.shape, num_kv)
    if resolve("rope_qkv", backend, ok, why, interpret, y_BSCH) == "reference":
        return reference_rope_qkv(y_BSCH, cos_SH, sin_SH, num_kv)
    return _rope_qkv(y_BSCH, cos_SH, sin_SH, int(num_kv), bool(interpret))
