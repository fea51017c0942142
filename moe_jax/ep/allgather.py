"""The `allgather` dispatcher: every device gathers the tokens of the `expert` axis, runs its own
experts on the assignments that name them, and reduce-scatters the outputs back."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.dispatch import Permutation, sort_rows, unsort_rows
from moe_jax.routing import Assignment


class AllGatherHandle(NamedTuple):
    perm: Permutation
    assignment: Assignment  # the gathered tokens' assignments to this device's experts
    dropped: jax.Array


@dataclasses.dataclass(frozen=True)
class AllGather:
    probs_on_input: bool = False

    def dispatch(self, x_TD: jax.Array, a: Assignment):
        P, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
        L = a.num_experts // P
        gather = functools.partial(jax.lax.all_gather, axis_name="expert", tiled=True)
        x_gD, w_gk, e_gk, kept_gk = gather(x_TD), gather(a.weights), gather(a.experts), gather(a.kept)
        local_e = e_gk - me * L
        mine = kept_gk & (local_e >= 0) & (local_e < L)
        local = Assignment.of(w_gk, jnp.clip(local_e, 0, L - 1), mine, L)
        rows_RD, perm = sort_rows(x_gD, local, probs_on_input=self.probs_on_input)
        return rows_RD, local.tokens_per_expert, AllGatherHandle(perm, local, jnp.zeros((), jnp.int32))

    def combine(self, y_RD: jax.Array, h: AllGatherHandle) -> jax.Array:
        y_gD = unsort_rows(y_RD, h.perm, h.assignment, probs_on_input=self.probs_on_input)
        return jax.lax.psum_scatter(y_gD, "expert", scatter_dimension=0, tiled=True)
