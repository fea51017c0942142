"""The MoE permutation's row gathers as Pallas (Triton) kernels: the passes of `ops.permute` at HBM speed.

Two kernels serve the forward and backward of both permute and unpermute (`ops.permute` holds the
formulas, the plain-JAX paths and the custom VJPs that call these), and two token-major forms of them
serve buffers without padding rows (`ops.permute.FORWARD_KERNEL`, `UNPERMUTE_BACKWARD`):

  gather_rows(x[T, D], tok[R], gate[R] | None) -> rows[R, D]
      rows[r] = x[tok[r]] (· gate[r], float32 math); 0 where tok[r] >= T (padding rows)
  gather_sum(y[R, D], dest[T, k], w[T, k] | None, other[T, D] | None, need_sum) -> (out[T, D] | None,
                                                                                   dw[T, k] | None)
      out[t]   = Σ_j w[t, j] · y[dest[t, j]]   (w = 1 when None; float32 accumulation)
      dw[t, j] = <y[dest[t, j]], other[t]>    (float32; only when `other` is given)
      a slot with dest[t, j] >= R (dropped) adds 0

  scatter_rows(x[T, D], dest[T, k], R, gate[T, k] | None) -> rows[R, D]   (token-major gather_rows)
  scatter_dots(y[R, D], dest[T, k], w[T, k], dout[T, D]) -> (dy[R, D], dw[T, k])   (unpermute's backward)
      rows[dest[t, j]] = x[t] (· gate[t, j]); dy[dest[t, j]] = w[t, j] · dout[t], dw[t, j] = <y[dest[t, j]],
      dout[t]>: each token's row read once; only for a buffer every row of which holds an assignment

One program per block of rows (gather_rows) or tokens (the others); a block's row indices are loaded
once and its rows fetched (or stored) with masked vector accesses, so each byte of the buffer crosses HBM
once per pass and no atomics are needed (each buffer row has one writer). The row width D must be a power
of two between 16 and `MAX_ROW` elements; the slot maps are passed slot-major ([k, T]) so each slot's
indices are one contiguous load.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops.pallas_triton import MAX_ROW, compiler_params, is_pow2, rows_per_block

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Launch:
    """Both kernels' launch shape: elements of one program's row block (rows · D) and its warps."""
    block_elems: int = 8192
    warps: int = 4


LAUNCH = Launch()  # `bench_ops.py --tune-permute` sweeps it


def check_width(d: int) -> str:
    """Why rows of width d cannot take the kernels ("" when they can)."""
    if not is_pow2(d) or not 16 <= d <= MAX_ROW:
        return f"the row width D = {d} must be a power of two in [16, {MAX_ROW}]"
    return ""


def _load_rows(ref, idx, limit):
    """ref[idx] as [n, D]; rows with idx >= limit read as zeros (not loaded). Both indexers are arrays
    (row [n, 1], column [1, D]): the form the interpreter's load takes; in Triton a pointer per element,
    contiguous along D. The mask is broadcast to [n, D]."""
    ok = idx < limit
    cols = jnp.arange(ref.shape[1], dtype=jnp.int32)[None, :]
    rows = jnp.where(ok, idx, 0)[:, None]
    return pltriton.load(ref.at[rows, cols], mask=ok[:, None] & (cols >= 0), other=0)


def _store_rows(ref, idx, limit, rows):
    """ref[idx] = rows ([n, D]), skipping rows with idx >= limit: `_load_rows`' store."""
    ok = idx < limit
    cols = jnp.arange(ref.shape[1], dtype=jnp.int32)[None, :]
    pltriton.store(ref.at[jnp.where(ok, idx, 0)[:, None], cols], rows.astype(ref.dtype), mask=ok[:, None] & (cols >= 0))


# ----------------------------------------------------------------------------- gather_rows
def _rows_kernel(*refs, t, gated):
    tok_ref, *rest = refs
    gate_ref, x_ref, o_ref = rest if gated else (None, *rest)
    rows = _load_rows(x_ref, tok_ref[...], t)
    if gated:
        rows = rows.astype(F32) * gate_ref[...][:, None]
    o_ref[...] = rows.astype(o_ref.dtype)


def gather_rows(x_TD, tok_R, gate_R=None, *, interpret=False):
    """rows[r] = x[tok[r]] (· gate[r]); zero rows where tok[r] >= T (see the module docstring)."""
    t, d = x_TD.shape
    r = tok_R.shape[0]
    br = rows_per_block(r, d, LAUNCH.block_elems)
    blk = pl.BlockSpec((br,), lambda i: (i,))
    args = [tok_R.astype(jnp.int32)] + ([gate_R.astype(F32)] if gate_R is not None else []) + [x_TD]
    specs = [blk] * (len(args) - 1) + [pl.BlockSpec((t, d), lambda i: (0, 0))]
    return pl.pallas_call(
        functools.partial(_rows_kernel, t=t, gated=gate_R is not None), grid=(r // br,),
        in_specs=specs, out_specs=pl.BlockSpec((br, d), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((r, d), x_TD.dtype),
        compiler_params=compiler_params(num_warps=LAUNCH.warps, interpret=interpret),
        interpret=interpret, name="permute_gather_rows")(*args)


# ----------------------------------------------------------------------------- scatter_rows
def _scatter_kernel(*refs, r, k, gated):
    dest_ref, *rest = refs
    gate_ref, x_ref, o_ref = rest if gated else (None, *rest)
    x = x_ref[...]
    for j in range(k):  # static: the block's rows stored to their j-th slot's buffer rows
        _store_rows(o_ref, dest_ref[j, :], r, x.astype(F32) * gate_ref[j, :][:, None] if gated else x)


def scatter_rows(x_TD, dest_Tk, num_rows: int, gate_Tk=None, *, interpret=False):
    """rows[dest[t, j]] = x[t] (· gate[t, j]) for every assignment with dest[t, j] < num_rows: the
    rows of `gather_rows(x, src // k, gate[src])` made token-major, each token's row read once and
    written to its k buffer rows. Only for a buffer whose every row holds an assignment (no padding
    rows): a row no assignment lands in is left unwritten."""
    t, d = x_TD.shape
    k = dest_Tk.shape[1]
    bt = rows_per_block(t, d, LAUNCH.block_elems)
    slots = pl.BlockSpec((k, bt), lambda i: (0, i))
    args, specs = [dest_Tk.astype(jnp.int32).T], [slots]
    if gate_Tk is not None:
        args.append(gate_Tk.astype(F32).T)
        specs.append(slots)
    args.append(x_TD)
    specs.append(pl.BlockSpec((bt, d), lambda i: (i, 0)))
    return pl.pallas_call(
        functools.partial(_scatter_kernel, r=num_rows, k=k, gated=gate_Tk is not None), grid=(t // bt,),
        in_specs=specs, out_specs=pl.BlockSpec((num_rows, d), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_rows, d), x_TD.dtype),
        compiler_params=compiler_params(num_warps=LAUNCH.warps, interpret=interpret),
        interpret=interpret, name="permute_scatter_rows")(*args)


def _scatter_dots_kernel(dest_ref, w_ref, y_ref, dout_ref, dy_ref, dw_ref, *, r, k):
    dout = dout_ref[...].astype(F32)
    for j in range(k):  # static: the block's j-th slot rows of y (for the dots) and of dy (stored)
        dest = dest_ref[j, :]
        dw_ref[j, :] = jnp.sum(_load_rows(y_ref, dest, r).astype(F32) * dout, axis=1)
        _store_rows(dy_ref, dest, r, dout * w_ref[j, :][:, None])


def scatter_dots(y_RD, dest_Tk, w_Tk, dout_TD, *, interpret=False):
    """unpermute's backward token-major: (dy[R, D] in y's dtype, dw[T, k] float32) with
    dy[dest[t, j]] = w[t, j] · dout[t] and dw[t, j] = <y[dest[t, j]], dout[t]>: each token's dout row
    read once (the row-major form reads it once per slot). Only for a buffer whose every row holds an
    assignment: a row no assignment lands in is left unwritten."""
    r, d = y_RD.shape
    t, k = dest_Tk.shape
    bt = rows_per_block(t, d, LAUNCH.block_elems)
    slots = pl.BlockSpec((k, bt), lambda i: (0, i))
    whole = pl.BlockSpec((r, d), lambda i: (0, 0))
    dy, dw = pl.pallas_call(
        functools.partial(_scatter_dots_kernel, r=r, k=k), grid=(t // bt,),
        in_specs=[slots, slots, whole, pl.BlockSpec((bt, d), lambda i: (i, 0))],
        out_specs=[whole, slots],
        out_shape=[jax.ShapeDtypeStruct((r, d), y_RD.dtype), jax.ShapeDtypeStruct((k, t), F32)],
        compiler_params=compiler_params(num_warps=LAUNCH.warps, interpret=interpret),
        interpret=interpret, name="permute_scatter_dots")(
            dest_Tk.astype(jnp.int32).T, w_Tk.astype(F32).T, y_RD, dout_TD)
    return dy, dw.T


# ----------------------------------------------------------------------------- gather_sum
def _sum_kernel(*refs, r, k, weighted, with_other, need_sum):
    refs = list(refs)
    dest_ref = refs.pop(0)
    w_ref = refs.pop(0) if weighted else None
    y_ref = refs.pop(0)
    other_ref = refs.pop(0) if with_other else None
    o_ref = refs.pop(0) if need_sum else None
    dw_ref = refs.pop(0) if with_other else None
    other = other_ref[...].astype(F32) if with_other else None
    acc = None
    for j in range(k):  # static: k loads of the block's j-th slot rows
        rows = _load_rows(y_ref, dest_ref[j, :], r).astype(F32)
        if need_sum:
            term = rows * w_ref[j, :][:, None] if weighted else rows
            acc = term if acc is None else acc + term
        if with_other:
            dw_ref[j, :] = jnp.sum(rows * other, axis=1)
    if need_sum:
        o_ref[...] = acc.astype(o_ref.dtype)


def gather_sum(y_RD, dest_Tk, w_Tk=None, other_TD=None, *, need_sum=True, interpret=False):
    """(out[T, D] in y's dtype or None, dw[T, k] float32 or None); see the module docstring."""
    r, d = y_RD.shape
    t, k = dest_Tk.shape
    if not need_sum and other_TD is None:
        raise ValueError("gather_sum: nothing to compute (need_sum=False and no `other`)")
    bt = rows_per_block(t, d, LAUNCH.block_elems)
    slots = pl.BlockSpec((k, bt), lambda i: (0, i))
    rows_spec = pl.BlockSpec((bt, d), lambda i: (i, 0))
    args, specs = [dest_Tk.astype(jnp.int32).T], [slots]
    if w_Tk is not None:
        args.append(w_Tk.astype(F32).T)
        specs.append(slots)
    args.append(y_RD)
    specs.append(pl.BlockSpec((r, d), lambda i: (0, 0)))
    if other_TD is not None:
        args.append(other_TD)
        specs.append(rows_spec)
    out_shape, out_specs = [], []
    if need_sum:
        out_shape.append(jax.ShapeDtypeStruct((t, d), y_RD.dtype))
        out_specs.append(rows_spec)
    if other_TD is not None:
        out_shape.append(jax.ShapeDtypeStruct((k, t), F32))
        out_specs.append(slots)
    outs = pl.pallas_call(
        functools.partial(_sum_kernel, r=r, k=k, weighted=w_Tk is not None, with_other=other_TD is not None,
                          need_sum=need_sum), grid=(t // bt,),
        in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(num_warps=LAUNCH.warps, interpret=interpret),
        interpret=interpret, name="permute_gather_sum")(*args)
    outs = list(outs)
    out = outs.pop(0) if need_sum else None
    dw = outs.pop(0).T if other_TD is not None else None
    return out, dw
