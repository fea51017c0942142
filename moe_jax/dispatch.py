"""Token dispatch on one device: permute (token, slot) assignments into expert-contiguous rows and back.

Assignments dropped by capacity sort after every kept row, so `ops.grouped_matmul` (which zeroes rows
past `sum(group_sizes)`) gives them zero output. With `pad_expert_input_to_capacity` every expert gets
a buffer of exactly `capacity` rows (fixed shapes; padding rows are zero and never read back).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.routing import Routing


@flax.struct.dataclass
class Permutation:
    """Where each flat (token, slot) assignment lives in the expert-sorted buffer."""

    dest: jax.Array         # [T*k] int32 row in the buffer; == buffer rows (out of range) if dropped
    group_sizes: jax.Array  # [E] int32 rows per expert in the buffer
    num_rows: int = flax.struct.field(pytree_node=False)


def permute(x_TD: jax.Array, routing: Routing, *, capacity: int | None = None
            ) -> tuple[jax.Array, Permutation]:
    """Gather token rows into expert-sorted order. `capacity` (when given) pads each expert to it."""
    t, k = routing.experts.shape
    e = routing.tokens_per_expert.shape[0]
    flat_e = jnp.where(routing.kept, routing.experts, e).reshape(-1)
    order = jnp.argsort(flat_e, stable=True)              # sorted row -> flat assignment
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))  # its inverse
    if capacity is None:
        x_ND = jnp.take(x_TD, order // k, axis=0)
        return x_ND, Permutation(dest=rank, group_sizes=routing.tokens_per_expert, num_rows=t * k)
    starts = jnp.cumsum(routing.tokens_per_expert) - routing.tokens_per_expert
    pos_in_expert = rank - starts[jnp.minimum(flat_e, e - 1)]
    n = e * capacity
    dest = jnp.where(flat_e < e, flat_e * capacity + pos_in_expert, n)
    token = jnp.arange(t * k) // k
    x_ND = jnp.zeros((n, x_TD.shape[1]), x_TD.dtype).at[dest].set(x_TD[token], mode="drop")
    sizes = jnp.full((e,), capacity, jnp.int32)
    return x_ND, Permutation(dest=dest, group_sizes=sizes, num_rows=n)


def unpermute(y_ND: jax.Array, perm: Permutation, routing: Routing, *, apply_weights: bool = True
              ) -> jax.Array:
    """Bring expert outputs back to token order and sum over the k slots (weighted by the gates)."""
    t, k = routing.experts.shape
    y_flat = jnp.take(y_ND, perm.dest, axis=0, mode="fill", fill_value=0)  # dropped -> 0
    y_TkD = y_flat.reshape(t, k, -1).astype(jnp.float32)
    if apply_weights:
        y_TkD = y_TkD * routing.weights[..., None].astype(jnp.float32)
    else:
        y_TkD = y_TkD * routing.kept[..., None]
    return y_TkD.sum(1).astype(y_ND.dtype)


def sorted_weights(routing: Routing, perm: Permutation) -> jax.Array:
    """Gate weight of each buffer row ([num_rows], 0 for padding) — for probs applied on the input."""
    w = routing.weights.reshape(-1)
    return jnp.zeros((perm.num_rows,), w.dtype).at[perm.dest].set(w, mode="drop")
