"""Expert-parallel dispatch → experts → combine, inside `jax.shard_map` over the MoE mesh.

Tokens are split over (`edata`, `expert`); expert weights over `expert` (EP) and their hidden dim over
`etensor` (ETP). Routing is decided before (on the global batch, so results equal one device's); each
shard then sorts its assignments with `dispatch.permute`, exchanges rows with the shards that own the
experts, runs the grouped-GEMM experts, sends results back and combines with `dispatch.unpermute`.

Dispatchers (`MoEConfig.token_dispatcher_type`):
- `alltoall`: fixed [EP, C, D] buffers per (source, destination) and `jax.lax.all_to_all`. Dropless:
  C = 2·T·k/EP (`buffer_factor`) while every (source, destination) count fits it — checked with one
  pmax across devices — else (lax.cond) the worst case C = T·min(k, E/EP); `dropped` stays 0.
  With `expert_capacity_factor`: C = ceil(T·k/EP·factor), overflow rows dropped (by position) and
  counted.
- `alltoall_ragged`: dropless, counts exchanged, then only the routed rows move there and back
  (`ops.all_to_all.ragged_all_to_all`): on Hopper with one process per host a peer-memory Pallas
  kernel (`ragged_impl="pallas"`), else `jax.lax.ragged_all_to_all` ("xla": GPU only; "emulate" runs
  the same plan through all_gather, for CPU tests). Rows arrive packed into a buffer of
  `buffer_factor` x T·k rows per device (same pmax/cond fallback to the worst case as above).
  With the Pallas exchange they go as one segment per (destination, local expert), so they arrive
  grouped by expert and need no re-sort (`expert_major`); otherwise packed by source, re-sorted.
- `allgather`: all-gather the tokens over `expert`, compute the local experts, reduce-scatter back.
- `auto` (the default): `alltoall_ragged` where its Pallas exchange runs (Hopper, one process
  driving all GPUs), else `alltoall` (measured on 2 and 4 H200: BENCHMARKS.md §4).
`chunks > 1` splits the local tokens so that chunk i+1's exchange can overlap chunk i's experts.

The ragged dispatcher lives in `moe_jax.ep_ragged`, the row bookkeeping they share in
`moe_jax.ep_rows`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import dispatch
from moe_jax.config import MoEConfig
from moe_jax.ep_ragged import _alltoall_ragged
from moe_jax.ep_rows import (MESH_AXES, _excl_cumsum, _inverse, _live, _local_routing,
                             _resort_by_local_expert, _sorted_rows, expert_ffn, move_rows)
from moe_jax.routing import Routing, expert_counts
from ops import all_to_all
from ops.grouped_matmul import _vma

TOKENS = ("edata", "expert")
DISPATCHERS = ("alltoall", "alltoall_ragged", "allgather")  # plus "auto": see resolve_dispatcher


# ------------------------------------------------------------------ alltoall (fixed capacity)
def _alltoall(x_TD, routing, w1, w2, *, m: MoEConfig, cap: int):
    n = jax.lax.axis_size("expert")
    E, L = m.num_experts, w1.shape[0]
    t, k = routing.experts.shape
    d = x_TD.shape[1]
    x_SD, perm = _sorted_rows(x_TD, routing, m.apply_probs_on_input)
    dev_E = jnp.arange(E) // L
    sent_e = jnp.sort(jnp.where(routing.kept, routing.experts, E).reshape(-1))   # expert of each row
    dev_r = sent_e // L                                                            # n if dropped
    dev_counts = jnp.zeros((n,), jnp.int32).at[dev_E].add(routing.tokens_per_expert)
    pos = jnp.arange(t * k, dtype=jnp.int32) - _excl_cumsum(dev_counts)[jnp.minimum(dev_r, n - 1)]
    ok = (dev_r < n) & (pos < cap)
    slot = jnp.where(ok, dev_r * cap + pos, n * cap)
    dropped = jnp.sum((dev_r < n) & ~ok).astype(jnp.int32)
    counts_E = expert_counts(jnp.where(ok, sent_e, 0)[:, None], E, ok[:, None])
    slot = slot.astype(jnp.int32)
    send_src = _inverse(slot, n * cap)                                             # buffer row -> row
    send = move_rows(x_SD, send_src, slot)
    recv = jax.lax.all_to_all(send.reshape(n, cap, d), "expert", 0, 0)            # [src, C, D]
    rc_SL = jax.lax.all_to_all(counts_E.reshape(n, L), "expert", 0, 0)            # [src, L]
    x_RD, (inv, order), gs = _resort_by_local_expert(recv.reshape(n * cap, d), rc_SL,
                                                     jnp.arange(n, dtype=jnp.int32) * cap)
    y_RD = move_rows(expert_ffn(x_RD, gs, w1, w2, m.activation, m.grouped_gemm_backend), inv, order)
    back = jax.lax.all_to_all(y_RD.reshape(n, cap, d), "expert", 0, 0)           # [dst, C, D]
    y_SD = move_rows(back.reshape(n * cap, d), slot, send_src)
    y_TD = dispatch.unpermute(y_SD, perm, routing, apply_weights=not m.apply_probs_on_input)
    return y_TD, dropped


def fixed_capacity(tokens: int, m: MoEConfig, ep: int) -> int:
    """Rows per (source, destination) buffer for `tokens` local tokens."""
    worst = tokens * min(m.router_topk, m.num_experts // ep)
    if m.expert_capacity_factor is None:
        return worst
    return max(1, min(worst, -(-int(tokens * m.router_topk * m.expert_capacity_factor) // ep)))


# ------------------------------------------------------------------ allgather
def _allgather(x_TD, routing, w1, w2, *, m: MoEConfig):
    me, L = jax.lax.axis_index("expert"), w1.shape[0]
    gather = functools.partial(jax.lax.all_gather, axis_name="expert", tiled=True)
    x_gD, w_gk, e_gk, kept_gk = gather(x_TD), gather(routing.weights), gather(routing.experts), \
        gather(routing.kept)
    local_e = e_gk - me * L
    mine = kept_gk & (local_e >= 0) & (local_e < L)
    local = _local_routing(w_gk, jnp.clip(local_e, 0, L - 1), mine, L)
    x_SD, perm = _sorted_rows(x_gD, local, m.apply_probs_on_input)
    y_SD = expert_ffn(x_SD, local.tokens_per_expert, w1, w2, m.activation, m.grouped_gemm_backend)
    y_gD = dispatch.unpermute(y_SD, perm, local, apply_weights=not m.apply_probs_on_input)
    y_TD = jax.lax.psum_scatter(y_gD, "expert", scatter_dimension=0, tiled=True)
    return y_TD, jnp.zeros((), jnp.int32)


# ------------------------------------------------------------------ entry point
def _pipeline(x_TD, w_Tk, e_Tk, kept_Tk, w1, w2, *, m, dispatcher, chunks, ragged_impl, cap,
              expert_major=False):
    """The chunks as independent chains (XLA overlaps chunk c+1's exchange with chunk c's experts).
    `cap`: rows per (source, destination) buffer (alltoall) or received rows per device (ragged)."""
    outs, dropped = [], jnp.zeros((), jnp.int32)
    for x, routing in _chunks(x_TD, w_Tk, e_Tk, kept_Tk, m, chunks):
        if dispatcher == "alltoall":
            y, dr = _alltoall(x, routing, w1, w2, m=m, cap=cap)
        elif dispatcher == "alltoall_ragged":
            y, dr = _alltoall_ragged(x, routing, w1, w2, m=m, impl=ragged_impl, rows=cap,
                                     expert_major=expert_major)
        else:
            y, dr = _allgather(x, routing, w1, w2, m=m)
        outs.append(y)
        dropped = dropped + dr
    return (outs[0] if chunks == 1 else jnp.concatenate(outs, axis=0)), dropped


def _buffer_rows(dispatcher, tc, m: MoEConfig, n: int, L: int, buffer_factor):
    """(fast, worst) buffer rows: per (source, destination) for alltoall, received rows per device
    for alltoall_ragged."""
    k = m.router_topk
    if dispatcher == "alltoall":
        worst = fixed_capacity(tc, m, n)
        share = tc * k / n
    else:
        worst, share = n * tc * min(k, L), tc * k
    if buffer_factor is None:
        return worst, worst
    return min(worst, _round_up(share * buffer_factor, 8)), worst


def _need(dispatcher, routings, n):
    """The largest buffer fill this device sees: per destination (alltoall) or, for the ragged
    buffer, rows received by each device of the `expert` axis (one psum)."""
    per_dest = jnp.stack([r.tokens_per_expert.reshape(n, -1).sum(1) for r in routings])  # [chunks, n]
    if dispatcher == "alltoall":
        return jnp.max(per_dest)
    return jnp.max(jax.lax.psum(per_dest, "expert"))


def _body(x_TD, w_Tk, e_Tk, kept_Tk, w1, w2, *, m, dispatcher, chunks, ragged_impl, buffer_factor,
          fallback, expert_major):
    args = (x_TD, w_Tk, e_Tk, kept_Tk, w1, w2)
    run = functools.partial(_pipeline, m=m, dispatcher=dispatcher, chunks=chunks,
                            ragged_impl=ragged_impl, cap=None, expert_major=expert_major)
    if dispatcher == "allgather":
        return run(*args)[0], jnp.zeros((), jnp.int32)  # dropless
    n, tc = jax.lax.axis_size("expert"), x_TD.shape[0] // chunks
    capacity = dispatcher == "alltoall" and m.expert_capacity_factor is not None
    fast, worst = _buffer_rows(dispatcher, tc, m, n, w1.shape[0], None if capacity else buffer_factor)
    run_worst = functools.partial(run, cap=worst)
    if capacity or fast >= worst:
        y_TD, dropped = run_worst(*args)  # alltoall capacity: C = factor x balanced share, drops counted
    elif not fallback:
        y_TD, dropped = functools.partial(run, cap=fast)(*args)
    else:
        # Dropless: the small buffer unless some fill on some device exceeds it (one scalar pmax).
        # One cond around all chunks keeps them overlappable inside each branch; the rare worst-case
        # branch is rematerialized in the backward pass so the common path does not carry its
        # (large, zero) residuals.
        need = _need(dispatcher, [r for _, r in _chunks(*args[:4], m, chunks)], n)
        axes = tuple(a for a in _live(MESH_AXES) if a in _vma(need))  # invariant axes agree already
        overflow = (jax.lax.pmax(need, axes) if axes else need) > fast
        y_TD, dropped = jax.lax.cond(overflow, jax.checkpoint(run_worst), functools.partial(run, cap=fast),
                                     *args)
    # only a capacity factor (or the fast buffer without its fallback) drops; dropless counts are
    # zero by construction and need no collective
    may_drop = capacity or (not fallback and fast < worst)
    return y_TD, (_psum(dropped, TOKENS) if may_drop else jnp.zeros((), jnp.int32))


def _psum(x, axes):
    live = _live(axes)
    return jax.lax.psum(x, live) if live else x


def _round_up(x: float, mult: int) -> int:
    return int(-(-int(-(-x // 1)) // mult) * mult)


def _chunks(x_TD, w_Tk, e_Tk, kept_Tk, m, chunks):
    tc = x_TD.shape[0] // chunks
    for c in range(chunks):
        sl = slice(c * tc, (c + 1) * tc)
        yield x_TD[sl], _local_routing(w_Tk[sl], e_Tk[sl], kept_Tk[sl], m.num_experts)


def resolve_dispatcher(dispatcher: str, x_TD) -> str:
    """`auto` -> `alltoall_ragged` where the peer-memory Pallas exchange runs for rows like x_TD's,
    else `alltoall` (XLA's own ragged exchange is slower than `alltoall` on GPUs, and absent on CPU)."""
    if dispatcher == "auto":
        return "alltoall_ragged" if all_to_all.pallas_supported(x_TD) else "alltoall"
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"MoEConfig.token_dispatcher_type={dispatcher!r} is invalid: must be one of "
                         f"{['auto', *DISPATCHERS]}")
    return dispatcher


def moe_ffn(x_TD, routing: Routing, w1_EDnF, w2_EFD, layout, m: MoEConfig, *,
            dispatcher: str | None = None, chunks: int | None = None, ragged_impl: str = "auto",
            buffer_factor: float | None | str = "layout", fallback: bool = True,
            expert_major: bool | None = None):
    """Dispatch → experts → combine across the MoE mesh. Returns (y[T,D], dropped-in-dispatch).

    `expert_major` (`alltoall_ragged` through the Pallas kernel or its emulation): one segment per
    (destination, local expert), so rows arrive grouped by expert and return without a re-sort.
    None (the default): on with the Pallas exchange (2xH200, mixtral_small layer fwd+bwd: 6.92 ms
    against 7.29 ms re-sorted), off otherwise.

    `buffer_factor` (dropless `alltoall`/`alltoall_ragged`): size of the fast buffer relative to a
    balanced share ("layout": `layout.buffer_factor`, from ParallelConfig.moe_buffer_factor); None
    always uses the worst-case buffer."""
    if buffer_factor == "layout":
        buffer_factor = layout.buffer_factor
    dispatcher = resolve_dispatcher(dispatcher or m.token_dispatcher_type, x_TD)
    chunks = chunks or layout.overlap_chunks
    if ragged_impl == "auto":  # the peer-memory Pallas kernel where it runs (Hopper, one process)
        ragged_impl = "pallas" if all_to_all.pallas_supported(x_TD) else "xla"
    if dispatcher == "alltoall_ragged" and ragged_impl == "xla" and layout.moe_mesh.shape["expert"] > 1 \
            and jax.devices()[0].platform == "cpu":
        raise ValueError("token_dispatcher_type='alltoall_ragged' needs GPUs: XLA:CPU does not "
                         "implement ragged_all_to_all; use 'alltoall' or 'allgather'")
    if expert_major is None:
        expert_major = dispatcher == "alltoall_ragged" and ragged_impl == "pallas"
    if expert_major and (dispatcher != "alltoall_ragged" or ragged_impl not in ("pallas", "emulate")):
        raise ValueError("expert_major=True needs token_dispatcher_type='alltoall_ragged' with the "
                         f"Pallas exchange (or 'emulate'); got {dispatcher!r} with {ragged_impl!r}")
    shards = layout.token_shards * chunks
    if x_TD.shape[0] % shards:
        raise ValueError(f"MoE layer: {x_TD.shape[0]} tokens are not divisible by "
                         f"edata*expert*overlap_chunks = {shards}")
    # specs name `expert` (the dispatchers' collectives run over it) and the other axes only where
    # they hold more than one device (see _live)
    sizes = layout.moe_mesh.shape
    tok = P(tuple(a for a in TOKENS if a == "expert" or sizes[a] > 1))
    e, et = "expert", ("etensor" if sizes["etensor"] > 1 else None)
    body = functools.partial(_body, m=m, dispatcher=dispatcher, chunks=chunks, ragged_impl=ragged_impl,
                             buffer_factor=buffer_factor, fallback=fallback, expert_major=expert_major)
    fn = jax.shard_map(body, mesh=layout.moe_mesh,
                       in_specs=(tok, tok, tok, tok, P(e, None, None, et), P(e, et, None)),
                       out_specs=(tok, P()))
    return fn(x_TD, routing.weights, routing.experts, routing.kept, w1_EDnF, w2_EFD)
