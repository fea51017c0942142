"""The `alltoall` dispatcher: fixed [P, C, D] buffers per (source, destination) device and
`jax.lax.all_to_all`, there and back."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig
from moe_jax.dispatch import Permutation, sort_rows, unsort_rows
from moe_jax.ep.rows import excl_cumsum, inverse, move_rows, resort_by_local_expert
from moe_jax.routing import Assignment, expert_counts


def fixed_capacity(tokens: int, m: MoEConfig, ep: int) -> int:
    """Rows per (source, destination) buffer for `tokens` local tokens: the worst case
    T·min(k, E/EP) when dropless, else ceil(T·k/EP·expert_capacity_factor) (at most the worst)."""
    worst = tokens * min(m.router_topk, m.num_experts // ep)
    if m.expert_capacity_factor is None:
        return worst
    return max(1, min(worst, -(-int(tokens * m.router_topk * m.expert_capacity_factor) // ep)))


class AllToAllHandle(NamedTuple):
    perm: Permutation       # the source-side sort
    assignment: Assignment
    slot: jax.Array         # [T*k] sorted row -> send-buffer row (P*C where not sent)
    send_src: jax.Array     # [P*C] send-buffer row -> sorted row (T*k where unused)
    inv: jax.Array          # receive-side sort by local expert and its inverse
    order: jax.Array
    dropped: jax.Array      # rows past a (source, destination) buffer's C


@dataclasses.dataclass(frozen=True)
class AllToAll:
    """Each device sends C = `cap` rows to each device of the `expert` axis (rows past C are dropped
    and counted; with the worst-case C none is); the receiver sorts what came by local expert."""

    cap: int
    probs_on_input: bool = False

    def dispatch(self, x_TD: jax.Array, a: Assignment):
        P, C = jax.lax.axis_size("expert"), self.cap
        E = a.num_experts
        L = E // P
        t, k = a.experts.shape
        d = x_TD.shape[1]
        x_RD, perm = sort_rows(x_TD, a, probs_on_input=self.probs_on_input)
        sent_e = jnp.sort(jnp.where(a.kept, a.experts, E).reshape(-1))   # expert of each sorted row
        dev_r = sent_e // L                                                # P if dropped
        dev_counts = jnp.zeros((P,), jnp.int32).at[jnp.arange(E) // L].add(a.tokens_per_expert)
        pos = jnp.arange(t * k, dtype=jnp.int32) - excl_cumsum(dev_counts)[jnp.minimum(dev_r, P - 1)]
        ok = (dev_r < P) & (pos < C)
        slot = jnp.where(ok, dev_r * C + pos, P * C).astype(jnp.int32)
        dropped = jnp.sum((dev_r < P) & ~ok).astype(jnp.int32)
        counts_E = expert_counts(jnp.where(ok, sent_e, 0)[:, None], E, ok[:, None])
        send_src = inverse(slot, P * C)
        send = move_rows(x_RD, send_src, slot)
        recv = jax.lax.all_to_all(send.reshape(P, C, d), "expert", 0, 0)          # [source, C, D]
        counts_PL = jax.lax.all_to_all(counts_E.reshape(P, L), "expert", 0, 0)   # [source, L]
        rows_RD, (inv, order), group_sizes = resort_by_local_expert(
            recv.reshape(P * C, d), counts_PL, jnp.arange(P, dtype=jnp.int32) * C)
        return rows_RD, group_sizes, AllToAllHandle(perm, a, slot, send_src, inv, order, dropped)

    def combine(self, y_RD: jax.Array, h: AllToAllHandle) -> jax.Array:
        P, C, d = jax.lax.axis_size("expert"), self.cap, y_RD.shape[1]
        y_RD = move_rows(y_RD, h.inv, h.order)
        back = jax.lax.all_to_all(y_RD.reshape(P, C, d), "expert", 0, 0)        # [destination, C, D]
        y_RD = move_rows(back.reshape(P * C, d), h.slot, h.send_src)
        return unsort_rows(y_RD, h.perm, h.assignment, probs_on_input=self.probs_on_input)
