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
and the gate gradients as row dot products. Backends: "xla" (those custom VJPs with XLA gathers),
"pallas" (the same VJPs with every pass a Pallas (Triton) kernel of `ops.permute_kernel`; one NVIDIA
GPU, a power-of-two row width, not inside shard_map), "reference" (the plain formulas and autodiff),
"auto" (the default): on one NVIDIA GPU, the kernel on permute's forward alone and XLA's gathers on
the other three passes; elsewhere "xla". Measured on the H200 (experiments/NOTES_speed.md, 2026-12-03):
permute's forward is the one pass XLA runs well under the HBM speed and fuses nothing into (0.062 ms
against 0.103 per mixtral_small layer); the backward passes and unpermute's forward are XLA fusions
with the adds beside them (the residual, the router's and shared path's share of dx), which a custom
call cannot take in; and XLA's unpermute backward beat a kernel that made its rows and gate dots in
one pass (not kept). Where the caller passes `covered` (every buffer row holds one assignment: no
capacity), "auto" and "pallas" run permute's forward and unpermute's backward as token-major kernels
instead, each token's row read once (`FORWARD_KERNEL`, `UNPERMUTE_BACKWARD`; measured faster than the
gather and than XLA's fusion on the H100, 2026-12-07).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops import permute_kernel
from ops.pallas_triton import resolve

BACKENDS = ("auto", "pallas", "xla", "reference")

# permute's forward kernel where every buffer row holds one assignment (`covered`): "gather" (a program per
# block of buffer rows, each reading x[token]: T·k row reads) or "scatter" (`permute_kernel.scatter_rows`: a
# program per block of tokens, each token's row read once and stored to its k buffer rows: T row reads).
# H100, deepseek_small shape (experiments/NOTES_speed.md, stop 47): 0.170 against 0.253 ms a call.
FORWARD_KERNEL = "scatter"
# unpermute's backward there: "xla" (XLA's fusion of dy's rows, gathered row-major, with the gate dots) or
# "scatter" (`permute_kernel.scatter_dots`: dout's rows read once, stored to their k buffer rows).
# H100, deepseek_small shape: 0.31 against 0.40 ms a call; the step's GPU time 1.7 ms less with both.
UNPERMUTE_BACKWARD = "scatter"


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


# ----------------------------------------------------------------------------- the passes
# impl: "xla" (XLA gathers) | "pallas" | "interpret" (the kernels in interpret mode)
def _rows(x_TD, src_R, k, gate_R, impl):
    """rows[r] = x[src[r] // k] (· gate[r]); 0 for padding rows."""
    tok = _token_of(src_R, x_TD.shape[0], k)
    if impl != "xla":
        return permute_kernel.gather_rows(x_TD, tok, gate_R, interpret=impl == "interpret")
    rows = jnp.take(x_TD, tok, axis=0, mode="fill", fill_value=0)
    if gate_R is None:
        return rows
    return (rows.astype(jnp.float32) * gate_R[:, None]).astype(x_TD.dtype)


def _slots(y_RD, dest_Tk, w_Tk, other_TD, impl, need_sum=True):
    """(Σ_j w[t, j] · y[dest[t, j]] in y's dtype (w = 1 when None) or None, and with `other` the
    float32 dots <y[dest[t, j]], other[t]>, else None); dropped slots add 0."""
    w = None if w_Tk is None else w_Tk.astype(jnp.float32)
    if impl != "xla":
        return permute_kernel.gather_sum(y_RD, dest_Tk, w, other_TD, need_sum=need_sum,
                                         interpret=impl == "interpret")
    g = _gather_slots(y_RD, dest_Tk)                                       # [T, k, D]
    total = None
    if need_sum:
        total = (g.sum(1) if w is None else jnp.sum(g * w[..., None], axis=1)).astype(y_RD.dtype)
    dots = None if other_TD is None else jnp.einsum("tkd,td->tk", g, other_TD.astype(jnp.float32))
    return total, dots


# ----------------------------------------------------------------------------- reference
# the XLA passes above with plain autodiff (their gathers transpose to scatter-adds)
def reference_permute(x_TD, dest_Tk, src_R, weights_Tk=None):
    gate = None if weights_Tk is None else _gate_of(weights_Tk, src_R)
    return _rows(x_TD, src_R, dest_Tk.shape[1], gate, "xla")


def reference_unpermute(y_RD, dest_Tk, src_R, weights_Tk):
    return _slots(y_RD, dest_Tk, weights_Tk, None, "xla")[0]


# ----------------------------------------------------------------------------- gather-only VJPs
# impls: (forward pass, backward pass), each "xla" | "pallas" | "interpret"
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _permute(x_TD, dest_Tk, src_R, weights_Tk, impls, scatter):
    if scatter:  # token-major (a kernel impl, and the caller said every buffer row is covered)
        return permute_kernel.scatter_rows(x_TD, dest_Tk, src_R.shape[0], weights_Tk,
                                           interpret=impls[0] == "interpret")
    gate = None if weights_Tk is None else _gate_of(weights_Tk, src_R)
    return _rows(x_TD, src_R, dest_Tk.shape[1], gate, impls[0])


def _permute_fwd(x_TD, dest_Tk, src_R, weights_Tk, impls, scatter):
    return _permute(x_TD, dest_Tk, src_R, weights_Tk, impls, scatter), (x_TD, dest_Tk, src_R, weights_Tk)


def _permute_bwd(impls, scatter, res, drows_RD):
    x_TD, dest_Tk, src_R, weights_Tk = res
    dx, dw = _slots(drows_RD, dest_Tk, weights_Tk, None if weights_Tk is None else x_TD, impls[1])
    return (dx.astype(x_TD.dtype), None, None,
            None if weights_Tk is None else dw.astype(weights_Tk.dtype))


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _unpermute(y_RD, dest_Tk, src_R, weights_Tk, impls, scatter):
    return _slots(y_RD, dest_Tk, weights_Tk, None, impls[0])[0]


def _unpermute_fwd(y_RD, dest_Tk, src_R, weights_Tk, impls, scatter):
    return _unpermute(y_RD, dest_Tk, src_R, weights_Tk, impls, scatter), (y_RD, dest_Tk, src_R, weights_Tk)


def _unpermute_bwd(impls, scatter, res, dout_TD):
    y_RD, dest_Tk, src_R, weights_Tk = res
    if scatter:  # "pallas" | "interpret": token-major, the caller said every buffer row is covered
        dy, dw = permute_kernel.scatter_dots(y_RD, dest_Tk, weights_Tk, dout_TD, interpret=scatter == "interpret")
        return dy, None, None, dw.astype(weights_Tk.dtype)
    dy = _rows(dout_TD, src_R, dest_Tk.shape[1], _gate_of(weights_Tk, src_R), impls[1]).astype(y_RD.dtype)
    _, dw = _slots(y_RD, dest_Tk, None, dout_TD, impls[1], need_sum=False)
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


def _impls(op: str, backend: str, rows, interpret: bool) -> tuple[str, str]:
    """(forward, backward) passes' implementation for `backend` on rows [*, D]: each reference | xla |
    pallas | interpret (see the module docstring for "auto")."""
    if backend in ("xla", "reference"):
        return backend, backend
    why = permute_kernel.check_width(rows.shape[-1])
    kernel = "interpret" if interpret else "pallas"
    if backend == "pallas":
        resolve(op, backend, not why, why, interpret, rows)  # raises where the kernels cannot run
        return kernel, kernel
    # auto: the kernel on permute's forward alone (the module docstring says why)
    if op == "permute" and resolve(op, "auto", not why, why, interpret, rows) == "pallas":
        return kernel, "xla"
    return "xla", "xla"


def permute(x_TD, dest_Tk, src_R, weights_Tk=None, *, backend: str = "auto", interpret: bool = False,
            covered: bool = False):
    """rows[r] = x[src[r] // k] (· weights[src[r]]); see the module docstring. `covered`: the caller
    knows every buffer row holds exactly one assignment (no padding rows, no assignment dropped out of
    the buffer), so the forward's kernel may write the rows token-major (`FORWARD_KERNEL`)."""
    _check(dest_Tk, src_R, weights_Tk, backend)
    dest_Tk, src_R = dest_Tk.astype(jnp.int32), src_R.astype(jnp.int32)
    impls = _impls("permute", backend, x_TD, interpret)
    if impls[0] == "reference":
        return reference_permute(x_TD, dest_Tk, src_R, weights_Tk)
    scatter = covered and FORWARD_KERNEL == "scatter" and impls[0] != "xla"
    return _permute(x_TD, dest_Tk, src_R, weights_Tk, impls, scatter)


def unpermute(y_RD, dest_Tk, src_R, weights_Tk, *, backend: str = "auto", interpret: bool = False,
              covered: bool = False):
    """y[t] = Σ_j weights[t, j] · y_RD[dest[t, j]]; see the module docstring. `covered` as for `permute`:
    the backward's kernel may then write dy's rows token-major (`UNPERMUTE_BACKWARD`)."""
    _check(dest_Tk, src_R, weights_Tk, backend)
    dest_Tk, src_R = dest_Tk.astype(jnp.int32), src_R.astype(jnp.int32)
    impls = _impls("unpermute", backend, y_RD, interpret)
    if impls[0] == "reference":
        return reference_unpermute(y_RD, dest_Tk, src_R, weights_Tk)
    kernel = _impls("permute", backend, y_RD, interpret)[0]  # where permute's forward kernel would run
    scatter = kernel if covered and UNPERMUTE_BACKWARD == "scatter" and kernel != "xla" else None
    return _unpermute(y_RD, dest_Tk, src_R, weights_Tk, impls, scatter)


def inverse(index, rows: int):
    """inv[j] = i where index[i] == j (out-of-range entries of `index` ignored); len(index) where
    no i maps to j — the other map of the pair above."""
    n = index.shape[0]
    return jnp.full((rows,), n, jnp.int32).at[index].set(jnp.arange(n, dtype=jnp.int32), mode="drop")


def stable_rank(keys, num_keys: int, *, block: int = 128):
    """rank[i] = the position of element i in the stable sort of `keys` (int, each in [0, num_keys)):
    `inverse(jnp.argsort(keys, stable=True), n)` without a sort. A counting sort: each key's first
    position, plus the same key's count in the earlier `block`-sized blocks (a cumsum over a
    [n / block, num_keys] count table), plus its count earlier in its own block (a [block, block]
    comparison per block, fused by XLA into one reduction). The router's keys take few values (the
    experts, plus one for dropped), where a GPU radix sort costs several kernels and memsets."""
    n = keys.shape[0]
    keys = keys.astype(jnp.int32)
    padded = jnp.pad(keys, (0, -n % block), constant_values=num_keys)    # after every real key
    kb = padded.reshape(-1, block)
    counts = (kb[:, :, None] == jnp.arange(num_keys + 1, dtype=jnp.int32)[None, None]).sum(1, dtype=jnp.int32)
    totals = counts.sum(0)
    first = jnp.cumsum(totals) - totals                                    # [num_keys + 1]
    before = jnp.cumsum(counts, axis=0) - counts                           # [blocks, num_keys + 1]
    earlier = jnp.arange(block)[:, None] > jnp.arange(block)[None, :]      # [i, j]: j before i
    within = ((kb[:, :, None] == kb[:, None, :]) & earlier[None]).sum(-1, dtype=jnp.int32)
    rank = first[kb] + jnp.take_along_axis(before, kb, axis=1) + within
    return rank.reshape(-1)[:n]
