"""MoE token permutation: token rows into an expert-sorted buffer and back, weighted by the router's
gates, with gradients that are gathers (no scatter-add).

Each token t has k assignments (t, j), flat index a = t·k + j. Two index maps describe the buffer:
  dest_Tk[t, j] = the buffer row of assignment (t, j); >= R (out of range) where it was dropped;
  src_R[r]      = the flat assignment in buffer row r;   >= T·k where row r is padding.
They are inverses of each other on the rows that hold an assignment.

  permute(x_TD, dest_Tk, src_R, weights_Tk=None) -> rows_RD
      rows[r] = x[src[r] // k] (· weights[src[r]] when given: gates applied on the input); padding 0
  unpermute(y_RD, dest_Tk, src_R, weights_Tk) -> y_TD
      y[t] = Σ_j weights[t, j] · y_RD[dest[t, j]] (dropped slots add 0), summed in float32

Plain autodiff of these gathers transposes them into scatter-adds (atomics, many times slower than
the HBM allows on a GPU). Here the transposes are written as gathers through the other map:
  d permute / dx[t]   = Σ_j weights[t, j] · drows[dest[t, j]]
  d unpermute / dy[r] = weights[src[r]] · dout[src[r] // k]
and the gate gradients as row dot products. Backends: "xla" (those custom VJPs, XLA gathers),
"reference" (the plain formulas and autodiff), "auto" (= "xla").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "reference")


def _token_of(src_R, t: int, k: int):
    """Token of each buffer row; t (out of range) for padding rows."""
    return jnp.where(src_R < t * k, src_R // k, t)


def _gate_of(weights_Tk, src_R):
    """Gate of each buffer row (float32); 0 for padding rows."""
    return jnp.take(weights_Tk.reshape(-1).astype(jnp.float32), src_R, mode="fill", fill_value=0)


def _gather_slots(y_RD, dest_Tk):
    """[T, k, D] float32: the buffer row of every assignment (0 where dropped)."""
    t, k = dest_Tk.shape
    g = jnp.take(y_RD, dest_Tk.reshape(-1), axis=0, mode="fill", fill_value=0)
    return g.reshape(t, k, -1).astype(jnp.float32)


# ----------------------------------------------------------------------------- reference
def reference_permute(x_TD, dest_Tk, src_R, weights_Tk=None):
    t, k = dest_Tk.shape
    rows = jnp.take(x_TD, _token_of(src_R, t, k), axis=0, mode="fill", fill_value=0)
    if weights_Tk is None:
        return rows
    return (rows.astype(jnp.float32) * _gate_of(weights_Tk, src_R)[:, None]).astype(x_TD.dtype)


def reference_unpermute(y_RD, dest_Tk, src_R, weights_Tk):
    g = _gather_slots(y_RD, dest_Tk)
    return jnp.sum(g * weights_Tk.astype(jnp.float32)[..., None], axis=1).astype(y_RD.dtype)


# ----------------------------------------------------------------------------- gather-only VJPs
@jax.custom_vjp
def _permute(x_TD, dest_Tk, src_R, weights_Tk):
    return reference_permute(x_TD, dest_Tk, src_R, weights_Tk)


def _permute_fwd(x_TD, dest_Tk, src_R, weights_Tk):
    return _permute(x_TD, dest_Tk, src_R, weights_Tk), (x_TD, dest_Tk, src_R, weights_Tk)


def _permute_bwd(res, drows_RD):
    x_TD, dest_Tk, src_R, weights_Tk = res
    g = _gather_slots(drows_RD, dest_Tk)                                   # [T, k, D]
    if weights_Tk is None:
        return g.sum(1).astype(x_TD.dtype), None, None, None
    w = weights_Tk.astype(jnp.float32)
    dx = jnp.sum(g * w[..., None], axis=1).astype(x_TD.dtype)
    dw = jnp.einsum("tkd,td->tk", g, x_TD.astype(jnp.float32)).astype(weights_Tk.dtype)
    return dx, None, None, dw


_permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def _unpermute(y_RD, dest_Tk, src_R, weights_Tk):
    return reference_unpermute(y_RD, dest_Tk, src_R, weights_Tk)


def _unpermute_fwd(y_RD, dest_Tk, src_R, weights_Tk):
    return _unpermute(y_RD, dest_Tk, src_R, weights_Tk), (y_RD, dest_Tk, src_R, weights_Tk)


def _unpermute_bwd(res, dout_TD):
    y_RD, dest_Tk, src_R, weights_Tk = res
    t, k = dest_Tk.shape
    d = jnp.take(dout_TD, _token_of(src_R, t, k), axis=0, mode="fill", fill_value=0)
    dy = (d.astype(jnp.float32) * _gate_of(weights_Tk, src_R)[:, None]).astype(y_RD.dtype)
    dw = jnp.einsum("tkd,td->tk", _gather_slots(y_RD, dest_Tk), dout_TD.astype(jnp.float32))
    return dy, None, None, dw.astype(weights_Tk.dtype)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


# ----------------------------------------------------------------------------- public
def _check(dest_Tk, src_R, weights_Tk, backend):
    if backend not in BACKENDS:
        raise ValueError(f"permute: backend={backend!r} is invalid: one of {list(BACKENDS)}")
    if dest_Tk.ndim != 2 or src_R.ndim != 1:
        raise ValueError(f"permute: dest must be [T, k] and src [R], got {dest_Tk.shape} and "
                         f"{src_R.shape}")
    if weights_Tk is not None and weights_Tk.shape != dest_Tk.shape:
        raise ValueError(f"permute: weights {weights_Tk.shape} must match dest {dest_Tk.shape}")


def permute(x_TD, dest_Tk, src_R, weights_Tk=None, *, backend: str = "auto"):
    """rows[r] = x[src[r] // k] (· weights[src[r]]); see the module docstring."""
    _check(dest_Tk, src_R, weights_Tk, backend)
    fn = reference_permute if backend == "reference" else _permute
    return fn(x_TD, dest_Tk.astype(jnp.int32), src_R.astype(jnp.int32), weights_Tk)


def unpermute(y_RD, dest_Tk, src_R, weights_Tk, *, backend: str = "auto"):
    """y[t] = Σ_j weights[t, j] · y_RD[dest[t, j]]; see the module docstring."""
    _check(dest_Tk, src_R, weights_Tk, backend)
    fn = reference_unpermute if backend == "reference" else _unpermute
    return fn(y_RD, dest_Tk.astype(jnp.int32), src_R.astype(jnp.int32), weights_Tk)


def inverse(index, rows: int):
    """inv[j] = i where index[i] == j (out-of-range entries of `index` ignored); len(index) where
    no i maps to j — the other map of the pair above."""
    n = index.shape[0]
    return jnp.full((rows,), n, jnp.int32).at[index].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
