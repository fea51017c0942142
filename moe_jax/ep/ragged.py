"""The `alltoall_ragged` dispatcher: counts exchanged, then only the routed rows move
(`ops.all_to_all`), into a receive buffer of `rows` rows per device.

`RaggedAllToAll` sends one segment per destination device (packed by source there, then re-sorted by
local expert); `ExpertMajorAllToAll` one segment per (destination, local expert), so rows arrive
grouped by expert and go back without a re-sort on either side (needs the segment exchange: the
Pallas peer-memory kernel, or its emulation on CPU)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.dispatch import Permutation, sort_rows, unsort_rows
from moe_jax.ep.rows import excl_cumsum, move_rows, resort_by_local_expert
from moe_jax.routing import Assignment
from ops import all_to_all


def _ragged_raw(x, out_rows, in_off, send_sizes, out_off, recv_sizes, impl):
    # every plan here is packed: segments arrive in source order from row 0 on
    return all_to_all.ragged_all_to_all(x, out_rows, in_off, send_sizes, out_off, recv_sizes,
                                        axis_name="expert", backend=impl, packed=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 3))
def _exchange(x, out_rows, plan, impl):
    """One segment per device (plan: in_off, send_sizes, out_off, recv_sizes, recv_off, src_off);
    its transpose is the reverse plan."""
    in_off, send_sizes, out_off, recv_sizes, _, _ = plan
    return _ragged_raw(x, out_rows, in_off, send_sizes, out_off, recv_sizes, impl)


def _exchange_fwd(x, out_rows, plan, impl):
    return _exchange(x, out_rows, plan, impl), (plan, x.shape[0])


def _exchange_bwd(out_rows, impl, res, dy):
    (in_off, send_sizes, _, recv_sizes, recv_off, src_off), rows = res
    return _ragged_raw(dy, rows, recv_off, recv_sizes, src_off, send_sizes, impl), None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _reverse(plan):
    in_off, send_sizes, out_off, recv_sizes, recv_off, src_off = plan
    return (recv_off, recv_sizes, src_off, send_sizes, in_off, out_off)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 5))
def _exchange_segments(x, out_rows, plan, back_plan, back_rows, impl):
    """Segment exchange (ops.all_to_all.ragged_all_to_all_segments) whose transpose is `back_plan`."""
    return all_to_all.ragged_all_to_all_segments(x, out_rows, *plan, axis_name="expert", backend=impl)


def _exchange_segments_fwd(x, out_rows, plan, back_plan, back_rows, impl):
    return _exchange_segments(x, out_rows, plan, back_plan, back_rows, impl), (plan, back_plan)


def _exchange_segments_bwd(out_rows, back_rows, impl, res, dy):
    plan, back_plan = res
    dx = all_to_all.ragged_all_to_all_segments(dy, back_rows, *back_plan, axis_name="expert",
                                               backend=impl)
    return dx, None, None


_exchange_segments.defvjp(_exchange_segments_fwd, _exchange_segments_bwd)


class RaggedHandle(NamedTuple):
    perm: Permutation
    assignment: Assignment
    plan: Any               # the exchange's plan (its reverse brings the rows back)
    resort: Any             # (inverse order, order) of the receive-side sort; None if expert-major
    dropped: jax.Array


@dataclasses.dataclass(frozen=True)
class RaggedAllToAll:
    """Segments per destination device: rows arrive packed by source, then sorted by local expert."""

    rows: int               # receive buffer rows per device
    impl: str               # ops.all_to_all backend: pallas | xla | emulate
    probs_on_input: bool = False

    def dispatch(self, x_TD: jax.Array, a: Assignment):
        P, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
        L = a.num_experts // P
        x_RD, perm = sort_rows(x_TD, a, probs_on_input=self.probs_on_input)
        counts_PE = jax.lax.all_gather(a.tokens_per_expert, "expert")             # [source, E]
        M = counts_PE.reshape(P, P, L).sum(-1)                                     # [source, dest]
        send_sizes, recv_sizes = M[me], M[:, me]
        in_off, recv_off = excl_cumsum(send_sizes), excl_cumsum(recv_sizes)
        out_off = excl_cumsum(M, axis=0)[me]        # where my rows land in each destination
        src_off = excl_cumsum(M, axis=1)[:, me]     # where each source's rows for me start there
        plan = (in_off, send_sizes, out_off, recv_sizes, recv_off, src_off)
        recv = _exchange(x_RD, self.rows, plan, self.impl)
        counts_PL = jax.lax.dynamic_slice_in_dim(counts_PE.reshape(P, P, L), me, 1, axis=1)[:, 0]
        rows_RD, resort, group_sizes = resort_by_local_expert(recv, counts_PL, recv_off)
        return rows_RD, group_sizes, RaggedHandle(perm, a, plan, resort, jnp.zeros((), jnp.int32))

    def combine(self, y_RD: jax.Array, h: RaggedHandle) -> jax.Array:
        t, k = h.assignment.experts.shape
        inv, order = h.resort
        y_RD = _exchange(move_rows(y_RD, inv, order), t * k, _reverse(h.plan), self.impl)
        return unsort_rows(y_RD, h.perm, h.assignment, probs_on_input=self.probs_on_input)


@dataclasses.dataclass(frozen=True)
class ExpertMajorAllToAll:
    """Segments per (destination, local expert): rows land grouped by local expert (source order
    within an expert), so the experts run on the receive buffer as it is and the results go straight
    back into the sender's sorted order — no re-sort on either side, forward or backward."""

    rows: int
    impl: str               # pallas | emulate (the segment exchange)
    probs_on_input: bool = False

    def dispatch(self, x_TD: jax.Array, a: Assignment):
        P, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
        E = a.num_experts
        L = E // P
        t, k = a.experts.shape
        x_RD, perm = sort_rows(x_TD, a, probs_on_input=self.probs_on_input)
        counts_PE = jax.lax.all_gather(a.tokens_per_expert, "expert")   # [source, E]
        C = counts_PE.reshape(P, P, L)                                   # [source, dest, local expert]
        block = excl_cumsum(C.sum(0), axis=1)                            # [dest, l]: expert block start
        within = excl_cumsum(C, axis=0)                                  # [source, dest, l]
        sorted_off = excl_cumsum(counts_PE, axis=1)                      # [source, E]: in sender's rows
        group_sizes = C[:, me].sum(0)                                    # rows per local expert here
        # dispatch: my segment e = (d, l) -> device d, at its block l after the sources before me
        there = (sorted_off[me], counts_PE[me], jnp.arange(E, dtype=jnp.int32) // L,
                 (block + within[me]).reshape(E), group_sizes.sum())
        # combine: my received segment (s, l) -> back to source s, where it came from
        back_off = jax.lax.dynamic_slice_in_dim(sorted_off, me * L, L, axis=1)   # [source, l]
        back = ((block[me][None] + within[:, me]).reshape(E), C[:, me].reshape(E),
                jnp.repeat(jnp.arange(P, dtype=jnp.int32), L), back_off.reshape(E),
                counts_PE[me].sum())
        rows_RD = _exchange_segments(x_RD, self.rows, there, back, t * k, self.impl)
        return rows_RD, group_sizes, RaggedHandle(perm, a, (there, back), None,
                                                  jnp.zeros((), jnp.int32))

    def combine(self, y_RD: jax.Array, h: RaggedHandle) -> jax.Array:
        t, k = h.assignment.experts.shape
        there, back = h.plan
        y_RD = _exchange_segments(y_RD, t * k, back, there, self.rows, self.impl)
        return unsort_rows(y_RD, h.perm, h.assignment, probs_on_input=self.probs_on_input)
