"""Varying-axes types inside `jax.shard_map`: what a value may differ over, and casts to match."""
from __future__ import annotations

import jax


def vma(x) -> frozenset:
    """The mesh axes `x` may vary over inside shard_map (empty outside it)."""
    t = jax.typeof(x)
    have = getattr(t, "vma", None)
    if have is None:  # JAX 0.10 keeps it on the manual axis type
        have = getattr(getattr(t, "manual_axis_type", None), "varying", None)
    return frozenset(have or ())


def match_vma(x, *likes):
    """Inside shard_map, Pallas outputs carry no varying-axes type: give x the union of `likes`'
    (so custom_vjp and psum see the right type). A no-op outside shard_map and for XLA outputs."""
    missing = tuple(sorted(frozenset().union(*map(vma, likes)) - vma(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
