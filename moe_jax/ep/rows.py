"""Row bookkeeping the EP dispatchers share (inside `jax.shard_map` over the MoE mesh): which mesh
axes are live, row permutations with gather-only gradients, prefix sums, and the receiver-side sort
by local expert."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import vma
from ops.permute import inverse, stable_rank

MESH_AXES = ("edata", "expert", "etensor")


def live_axes(axes):
    """The mesh axes among `axes` that values here may vary over (inside shard_map): `expert`, and
    `edata`/`etensor` only where they hold more than one device — the EP specs name no others.
    Collectives and varying-type casts name only these: XLA keeps an all-reduce over single-device
    groups in the compiled program (a NCCL launch for nothing)."""
    return tuple(a for a in axes if a == "expert" or jax.lax.axis_size(a) > 1)


def vary(x, axes):
    """Mark x as varying over `axes` inside shard_map (no data movement)."""
    missing = tuple(a for a in axes if a not in vma(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def psum_live(x, axes):
    """psum over the live ones of `axes` (x itself where none is live)."""
    live = live_axes(axes)
    return jax.lax.psum(x, live) if live else x


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


def excl_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def resort_by_local_expert(rows_RD, counts_PL, row_start_P):
    """Received rows (per-source chunks, each sorted by local expert) -> grouped by local expert.

    counts_PL[p, l]: rows from source device p for local expert l, starting at row_start_P[p].
    Returns (rows sorted by local expert with padding last, (inverse order, order), group sizes [L]).
    """
    P, L = counts_PL.shape
    ends = (row_start_P[:, None] + jnp.cumsum(counts_PL, axis=1)).reshape(-1)     # [P*L]
    starts = ends - counts_PL.reshape(-1)
    r = jnp.arange(rows_RD.shape[0], dtype=jnp.int32)
    inside = (r[:, None] >= starts[None]) & (r[:, None] < ends[None])            # [R, P*L]
    seg = jnp.argmax(inside, axis=1)
    local = jnp.where(inside.any(1), seg % L, L)                                 # L = padding
    inv = stable_rank(local, L + 1)
    order = inverse(inv, inv.shape[0])
    return move_rows(rows_RD, order, inv), (inv, order), counts_PL.sum(0)
