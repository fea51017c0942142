"""Row bookkeeping shared by the EP dispatchers (inside `jax.shard_map` over the MoE mesh): which
mesh axes are live, the local experts, row permutations with gather-only gradients, and the
source/receiver-side sorts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import dispatch
from moe_jax.experts import grouped_ffn
from moe_jax.routing import Routing, expert_counts
from ops.grouped_matmul import _vma

MESH_AXES = ("edata", "expert", "etensor")


def _live(axes):
    """The mesh axes among `axes` that values here may vary over (inside shard_map): `expert`, and
    `edata`/`etensor` only where they hold more than one device — moe_ffn's specs name no others.
    Collectives and varying-type casts name only these: XLA keeps an all-reduce over single-device
    groups in the compiled program (a NCCL launch over the expert weight gradients for nothing).
    (The 2.3 ms NCCL all-reduce per layer step first blamed on this was the cotangent psum fixed
    in ops.grouped_matmul on 2026-11-22.)"""
    return tuple(a for a in axes if a == "expert" or jax.lax.axis_size(a) > 1)


def expert_ffn(x_ND, group_sizes, w1_EDnF, w2_EFD, activation: str, backend: str):
    """Local experts on expert-sorted rows; ETP partial sums reduced over `etensor`."""
    # one varying type for the kernels' custom_vjp; its transpose sums dx over etensor, dw over edata
    x_ND, w1_EDnF, w2_EFD = (_vary(a, _live(MESH_AXES)) for a in (x_ND, w1_EDnF, w2_EFD))
    y = grouped_ffn(x_ND, group_sizes, w1_EDnF, w2_EFD, activation, backend)
    return jax.lax.psum(y, "etensor") if _live(("etensor",)) else y


def _vary(x, axes):
    """Mark x as varying over `axes` inside shard_map (no data movement)."""
    have = _vma(x)
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


@jax.custom_vjp
def move_rows(x, src, inv):
    """out[i] = x[src[i]] (0 where src[i] is out of range), for an injective `src` whose inverse is
    `inv` (inv[j] = i, or out of range where row j is unused). The backward is the gather by `inv` —
    no scatter-add (atomics) for what is a row permutation."""
    return jnp.take(x, src, axis=0, mode="fill", fill_value=0)


def _move_rows_fwd(x, src, inv):
    return move_rows(x, src, inv), inv


def _move_rows_bwd(inv, dy):
    return jnp.take(dy, inv, axis=0, mode="fill", fill_value=0), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _inverse(src, rows: int):
    """inv[j] = i where src[i] == j, else len(src) (out of range)."""
    n = src.shape[0]
    return jnp.full((rows,), n, jnp.int32).at[src].set(jnp.arange(n, dtype=jnp.int32), mode="drop")


def _excl_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def _local_routing(w_Tk, e_Tk, kept_Tk, num_experts: int) -> Routing:
    counts = expert_counts(e_Tk, num_experts, kept_Tk)
    zero = jnp.zeros((), jnp.int32)
    return Routing(weights=w_Tk, experts=e_Tk, kept=kept_Tk, tokens_per_expert=counts, dropped=zero,
                   losses={}, routed_counts=counts)


def _sorted_rows(x_TD, routing: Routing, probs_on_input: bool):
    """Source side: rows sorted by global expert (dropped last), optionally pre-weighted."""
    x_SD, perm = dispatch.permute(x_TD, routing)
    if probs_on_input:
        x_SD = (x_SD * dispatch.sorted_weights(routing, perm)[:, None]).astype(x_SD.dtype)
    return x_SD, perm


def _resort_by_local_expert(rows_RD, counts_SL, row_start_S):
    """Received rows (per-source chunks, each sorted by local expert) -> grouped by local expert.

    counts_SL[s, l]: rows from source s for local expert l, starting at row_start_S[s].
    Returns (x sorted by local expert with padding last, inverse order, group sizes [L]).
    """
    n, L = counts_SL.shape
    ends = (row_start_S[:, None] + jnp.cumsum(counts_SL, axis=1)).reshape(-1)     # [n*L]
    starts = ends - counts_SL.reshape(-1)
    p = jnp.arange(rows_RD.shape[0], dtype=jnp.int32)
    inside = (p[:, None] >= starts[None]) & (p[:, None] < ends[None])            # [R, n*L]
    seg = jnp.argmax(inside, axis=1)
    local = jnp.where(inside.any(1), seg % L, L)                                 # L = padding
    order = jnp.argsort(local, stable=True).astype(jnp.int32)
    inv = _inverse(order, order.shape[0])
    return move_rows(rows_RD, order, inv), (inv, order), counts_SL.sum(0)
