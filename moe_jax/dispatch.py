"""How tokens reach the experts: the dispatcher contract, and the single-device dispatcher.

A dispatcher moves each token's k assignments into rows grouped by expert, and the experts' outputs
back (shape letters: `moe_jax` module docstring):

    rows_RD, group_sizes_L, handle = dispatcher.dispatch(x_TD, assignment)
    y_TD = dispatcher.combine(experts(rows_RD, group_sizes_L), handle)

`group_sizes_L` counts the rows of each expert held where the rows are (rows past their sum are
padding: the experts give them zero output, combine never reads them); `handle` is the frozen
metadata combine needs, and `handle.dropped` the assignments dropped on the way (beyond the router's
own capacity). `combine` weights each output by its gate and sums over the k slots.

`LocalDispatcher` sorts on one device. The expert-parallel dispatchers (`moe_jax.ep`) exchange rows
over the `expert` mesh axis inside `shard_map`; they sort their own tokens with the same
`sort_rows` / `unsort_rows` first and last.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.routing import Assignment
from ops.permute import inverse, permute as permute_rows, stable_rank, unpermute as unpermute_rows


@flax.struct.dataclass
class Permutation:
    """Where each flat (token, slot) assignment lives in the expert-sorted buffer, and back."""

    dest: jax.Array         # [T, k] int32 buffer row of each assignment; >= num_rows if dropped
    src: jax.Array          # [num_rows] int32 flat assignment of each row; >= T*k for padding
    group_sizes: jax.Array  # [E] int32 rows per expert in the buffer
    num_rows: int = flax.struct.field(pytree_node=False)


def sort_by_expert(a: Assignment, *, capacity: int | None = None) -> Permutation:
    """The buffer layout: assignments sorted by expert, dropped ones after every kept row (they get
    zero expert output). With `capacity` every expert gets exactly `capacity` rows (fixed shapes;
    padding rows are zero and never read back)."""
    t, k = a.experts.shape
    e = a.num_experts
    flat_e = jnp.where(a.kept, a.experts, e).reshape(-1)
    rank = stable_rank(flat_e, e + 1)                 # flat assignment -> sorted row
    order = inverse(rank, t * k)                      # sorted row -> flat assignment
    if capacity is None:
        return Permutation(dest=rank.reshape(t, k), src=order, group_sizes=a.tokens_per_expert,
                           num_rows=t * k)
    starts = jnp.cumsum(a.tokens_per_expert) - a.tokens_per_expert
    pos_in_expert = rank - starts[jnp.minimum(flat_e, e - 1)]
    n = e * capacity
    dest = jnp.where(flat_e < e, flat_e * capacity + pos_in_expert, n).astype(jnp.int32)
    return Permutation(dest=dest.reshape(t, k), src=inverse(dest, n),
                       group_sizes=jnp.full((e,), capacity, jnp.int32), num_rows=n)


def _permute_args(kernels: str) -> dict:
    """ops.permute's backend for `ModelConfig.fused_kernels`: "auto" runs its kernel on permute's forward,
    the pass XLA fuses nothing into (one NVIDIA GPU; ops.permute), "pallas" on all four, "reference" keeps the
    gather-only VJPs through XLA (the plain autodiff would scatter-add)."""
    return {"auto": dict(backend="auto"), "pallas": dict(backend="pallas"), "reference": dict(backend="xla"),
            "interpret": dict(backend="pallas", interpret=True)}[kernels]


def sort_rows(x_TD: jax.Array, a: Assignment, *, probs_on_input: bool = False,
              capacity: int | None = None, kernels: str = "auto") -> tuple[jax.Array, Permutation]:
    """A device's own assignments as token rows sorted by expert (`sort_by_expert`); with
    `probs_on_input` each row already multiplied by its gate (Megatron's
    `moe_apply_probs_on_input`, top-1). Gradients are gathers (`ops.permute`; `kernels` as
    `ModelConfig.fused_kernels`)."""
    perm = sort_by_expert(a, capacity=capacity)
    gates = a.weights if probs_on_input else None
    return rows_maker(kernels, capacity is None)(x_TD, perm.dest, perm.src, gates), perm


@functools.lru_cache(maxsize=None)
def rows_maker(kernels: str = "auto", covered: bool = False):
    """`make(x_TD, dest, src, gates=None)` -> the expert-sorted rows of `sort_rows` (one function per
    `kernels` and `covered`, so that ops.grouped_matmul_remade_lhs sees the same static function each
    trace). `covered`: every buffer row holds an assignment (no capacity, so no padding rows)."""
    def make(x_TD, dest, src, gates=None):
        return permute_rows(x_TD, dest, src, gates, covered=covered, **_permute_args(kernels))
    return make


def unsort_rows(y_RD: jax.Array, perm: Permutation, a: Assignment, *, probs_on_input: bool = False,
                kernels: str = "auto", covered: bool = False) -> jax.Array:
    """Inverse of `sort_rows`: each token's rows summed over its k slots, weighted by the gates
    (by `kept` alone when they were applied on the input); dropped slots add nothing. `covered`: the
    buffer has no padding rows (`sort_rows` without a capacity)."""
    w = a.kept.astype(jnp.float32) if probs_on_input else a.weights
    return unpermute_rows(y_RD, perm.dest, perm.src, w, covered=covered, **_permute_args(kernels))


def permute(x_TD: jax.Array, a: Assignment, *, capacity: int | None = None
            ) -> tuple[jax.Array, Permutation]:
    """Token rows in expert-sorted order (`sort_rows` without gates)."""
    return sort_rows(x_TD, a, capacity=capacity)


def unpermute(y_RD: jax.Array, perm: Permutation, a: Assignment, *, apply_weights: bool = True
              ) -> jax.Array:
    """Expert outputs back in token order, summed over the k slots (weighted by the gates)."""
    return unsort_rows(y_RD, perm, a, probs_on_input=not apply_weights)


@flax.struct.dataclass
class LocalHandle:
    perm: Permutation
    assignment: Assignment
    dropped: jax.Array


@dataclasses.dataclass(frozen=True)
class LocalDispatcher:
    """One device: sort by expert (padded to `capacity` rows per expert when given), and back."""

    capacity: int | None = None
    probs_on_input: bool = False
    kernels: str = "auto"  # ModelConfig.fused_kernels: the permutation's kernels per ops.permute's backends
    # MoEConfig.recompute_rows: the rows are made again in the backward for fc1's weight gradient
    # (`dispatch_remade`), not kept from the forward
    recompute_rows: bool = False

    def dispatch(self, x_TD: jax.Array, a: Assignment):
        rows_RD, perm = sort_rows(x_TD, a, probs_on_input=self.probs_on_input, capacity=self.capacity,
                                  kernels=self.kernels)
        return rows_RD, perm.group_sizes, LocalHandle(perm, a, jnp.zeros((), jnp.int32))

    def dispatch_remade(self, x_TD: jax.Array, a: Assignment):
        """`dispatch` without the rows: (make, args, group_sizes, handle) with rows = make(*args), for
        experts that make them inside fc1's grouped GEMM and again in its backward
        (`GroupedExperts.on_remade_rows`)."""
        perm = sort_by_expert(a, capacity=self.capacity)
        args = (x_TD, perm.dest, perm.src) + ((a.weights,) if self.probs_on_input else ())
        return (rows_maker(self.kernels, self.capacity is None), args, perm.group_sizes,
                LocalHandle(perm, a, jnp.zeros((), jnp.int32)))

    def combine(self, y_RD: jax.Array, h: LocalHandle) -> jax.Array:
        return unsort_rows(y_RD, h.perm, h.assignment, probs_on_input=self.probs_on_input,
                           kernels=self.kernels, covered=self.capacity is None)
