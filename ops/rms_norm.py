"""RMSNorm over the last axis, alone or after the residual add, as Pallas (Triton) kernels with custom VJPs.

  rms_norm(x[..., D], scale[D], eps)        = x / sqrt(mean(x², -1) + eps) · scale   (float32 math, x's dtype)
  add_rms_norm(x, delta, scale, eps)         = (s, rms_norm(s))  with s = x + delta  (the residual stream)

Forward: one program per block of rows writes y (and s) and each row's 1/rms (float32, saved for the
backward). Backward: one program per `Launch.bwd_rows` rows, in chunks, writes
  dx = r · (scale·dy − x̂ · mean(x̂ · scale·dy))  [+ ds, the cotangent of s, for add_rms_norm: dx = dδ]
(x̂ = x·r, r = 1/rms) and accumulates its rows' share of dscale = Σ_rows dy · x̂ in registers; XLA sums
the [programs, D] partials. The fused add saves a pass over the residual stream each way: the forward
reads x and delta once and writes s and y; the backward adds ds in the same program.
`rms_norm(..., fanout=n)` returns n copies of y for n consumers (attention's q, k and v projections; the
MoE layer's router, dispatch and shared experts): their cotangents reach the backward kernel apart and
are summed there, which saves XLA's pass that would add them (n reads and a write of [R, D]).
Rows of width D that is a power of two up to 16384 take the kernels (`backend="auto"` on one NVIDIA GPU);
other widths, and CPU, take the reference: the formula with plain autodiff, which XLA fuses.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.pallas_triton import MAX_ROW, compiler_params, is_pow2, resolve, rows_per_block


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch shape: elements per forward program (and backward chunk), rows per backward program,
    warps per program. experiments/bench_ops.py --tune-norm sweeps them."""
    fwd_elems: int = 8192
    bwd_rows: int = 64
    warps: int = 4


LAUNCH = Launch()


def reference_rms_norm(x, scale, eps: float):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def reference_add_rms_norm(x, delta, scale, eps: float):
    s = x + delta.astype(x.dtype)
    return s, reference_rms_norm(s, scale, eps)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(*refs, eps, add):
    if add:
        x_ref, d_ref, w_ref, s_ref, y_ref, r_ref = refs
        s = x_ref[...].astype(jnp.float32) + d_ref[...].astype(jnp.float32)
        s_ref[...] = s.astype(s_ref.dtype)
        x = s_ref[...].astype(jnp.float32)  # the norm of the stored (rounded) sum, as the reference
    else:
        x_ref, w_ref, y_ref, r_ref = refs
        x = x_ref[...].astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + eps)
    y_ref[...] = (x * r[:, None] * w_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
    r_ref[...] = r


def _bwd_kernel(*refs, chunk, add, ndy):
    x_ref, w_ref, r_ref, *refs = refs
    dy_refs, refs = refs[:ndy], refs[ndy:]
    dres_ref, dx_ref, dw_ref = refs if add else (None, *refs)
    w = w_ref[...].astype(jnp.float32)

    def body(i, acc):
        rows = pl.ds(i * chunk, chunk)
        x = x_ref[rows, :].astype(jnp.float32)
        dy = dy_refs[0][rows, :].astype(jnp.float32)
        for dy_ref in dy_refs[1:]:  # the cotangents of a fan-out's copies, summed here
            dy = dy + dy_ref[rows, :].astype(jnp.float32)
        r = r_ref[rows]
        xh = x * r[:, None]
        g = dy * w[None, :]
        c = jnp.mean(xh * g, axis=1)
        dx = r[:, None] * (g - xh * c[:, None])
        if add:
            dx = dx + dres_ref[rows, :].astype(jnp.float32)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return acc + jnp.sum(dy * xh, axis=0)

    acc = jax.lax.fori_loop(0, x_ref.shape[0] // chunk, body, jnp.zeros(w.shape, jnp.float32))
    dw_ref[0, :] = acc


def _fwd(x2, d2, scale, eps, interpret):
    """(s if d2 is given,) y, r for rows x2 [R, D] (+ d2)."""
    rows, d = x2.shape
    launch = LAUNCH  # read at trace time (bench_ops.py --tune-norm sets it)
    br = rows_per_block(rows, d, launch.fwd_elems)
    row_block, vec = pl.BlockSpec((br, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))
    add = d2 is not None
    outs = [jax.ShapeDtypeStruct((rows, d), x2.dtype)] * (2 if add else 1) + [
        jax.ShapeDtypeStruct((rows,), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps, add=add), grid=(rows // br,),
        in_specs=[row_block] * (2 if add else 1) + [vec],
        out_specs=[row_block] * (2 if add else 1) + [pl.BlockSpec((br,), lambda i: (i,))],
        out_shape=outs, compiler_params=compiler_params(num_warps=launch.warps, interpret=interpret),
        interpret=interpret, name="rms_norm_fwd")(*([x2, d2] if add else [x2]), scale)


def _bwd(x2, scale, r, dy2s, dres2, interpret):
    """dx [R, D] (+ dres2 when given) and dscale [D] (float32), for dy = the sum of `dy2s` (a fan-out's
    cotangents; one array for a plain norm)."""
    rows, d = x2.shape
    launch = LAUNCH
    per = rows_per_block(rows, 1, launch.bwd_rows)  # rows per program (a power of two dividing rows)
    chunk = min(per, rows_per_block(rows, d, launch.fwd_elems))
    row_block = pl.BlockSpec((per, d), lambda i: (i, 0))
    add = dres2 is not None
    dx, ds = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, add=add, ndy=len(dy2s)), grid=(rows // per,),
        in_specs=[row_block, pl.BlockSpec((d,), lambda i: (0,)), pl.BlockSpec((per,), lambda i: (i,))]
        + [row_block] * (len(dy2s) + add),
        out_specs=[row_block, pl.BlockSpec((1, d), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, d), x2.dtype),
                   jax.ShapeDtypeStruct((rows // per, d), jnp.float32)],
        compiler_params=compiler_params(num_warps=launch.warps, interpret=interpret),
        interpret=interpret, name="rms_norm_bwd")(x2, scale, r, *dy2s, *([dres2] if add else []))
    return dx, jnp.sum(ds, axis=0)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, scale, eps, interpret):
    return _rms_norm_fwd(x, scale, eps, interpret)[0]


def _rms_norm_fwd(x, scale, eps, interpret):
    y, r = _fwd(_rows(x), None, scale, eps, interpret)
    return y.reshape(x.shape), (x, scale, r)


def _rms_norm_bwd(eps, interpret, res, dy):
    x, scale, r = res
    dx, ds = _bwd(_rows(x), scale, r, [_rows(dy).astype(x.dtype)], None, interpret)
    return dx.reshape(x.shape), ds.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms_norm_fan(x, scale, eps, interpret, n):
    return _rms_norm_fan_fwd(x, scale, eps, interpret, n)[0]


def _rms_norm_fan_fwd(x, scale, eps, interpret, n):
    y, res = _rms_norm_fwd(x, scale, eps, interpret)
    return (y,) * n, res


def _rms_norm_fan_bwd(eps, interpret, n, res, dys):
    x, scale, r = res
    dx, ds = _bwd(_rows(x), scale, r, [_rows(dy).astype(x.dtype) for dy in dys], None, interpret)
    return dx.reshape(x.shape), ds.astype(scale.dtype)


_rms_norm_fan.defvjp(_rms_norm_fan_fwd, _rms_norm_fan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _add_rms_norm(x, delta, scale, eps, interpret):
    return _add_rms_norm_fwd(x, delta, scale, eps, interpret)[0]


def _add_rms_norm_fwd(x, delta, scale, eps, interpret):
    s, y, r = _fwd(_rows(x), _rows(delta), scale, eps, interpret)
    s, y = s.reshape(x.shape), y.reshape(x.shape)
    return (s, y), (s, scale, r)


def _add_rms_norm_bwd(eps, interpret, res, cts):
    s, scale, r = res
    d_s, dy = cts
    dx, ds = _bwd(_rows(s), scale, r, [_rows(dy).astype(s.dtype)], _rows(d_s).astype(s.dtype), interpret)
    dx = dx.reshape(s.shape)
    return dx, dx, ds.astype(scale.dtype)


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def kernel_takes(x_shape) -> tuple[bool, str]:
    """Whether the kernels take rows of this shape, and why not."""
    d = x_shape[-1]
    if not (is_pow2(d) and d <= MAX_ROW):
        return False, f"row width {d} is not a power of two <= {MAX_ROW}"
    return True, ""


def _check(op, x, scale):
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"{op}: scale {scale.shape} must be [{x.shape[-1]}] for x {x.shape}")
    return kernel_takes(x.shape)


def rms_norm(x, scale, eps: float, *, fanout: int = 1, backend: str = "auto", interpret: bool = False):
    """RMSNorm of x [..., D] with scale [D]; float32 math, x's dtype out. Backends: "pallas" (the
    kernels), "reference" (plain JAX), "auto" (pallas on one NVIDIA GPU where the shape fits).
    fanout=n > 1 returns a tuple of n copies of the output, one per consumer: on the kernels their n
    cotangents are summed inside the backward kernel instead of by XLA in a pass of their own."""
    if not isinstance(fanout, int) or fanout < 1:
        raise ValueError(f"rms_norm: fanout must be an int >= 1, got {fanout!r}")
    ok, why = _check("rms_norm", x, scale)
    if resolve("rms_norm", backend, ok, why, interpret, x) == "reference":
        y = reference_rms_norm(x, scale, eps)
        return y if fanout == 1 else (y,) * fanout
    if fanout == 1:
        return _rms_norm(x, scale, float(eps), bool(interpret))
    return _rms_norm_fan(x, scale, float(eps), bool(interpret), fanout)


def add_rms_norm(x, delta, scale, eps: float, *, backend: str = "auto", interpret: bool = False):
    """(s, rms_norm(s)) with s = x + delta (delta cast to x's dtype): the residual add and the next
    norm in one pass. Backends as rms_norm."""
    if delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta {delta.shape} must have x's shape {x.shape}")
    ok, why = _check("add_rms_norm", x, scale)
    if resolve("add_rms_norm", backend, ok, why, interpret, x) == "reference":
        return reference_add_rms_norm(x, delta, scale, eps)
    return _add_rms_norm(x, delta.astype(x.dtype), scale, float(eps), bool(interpret))
