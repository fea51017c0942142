"""The `alltoall_ragged` dispatcher: counts exchanged, then only the routed rows move
(`ops.all_to_all`), packed by source (then re-sorted by local expert), or — `expert_major` — one
segment per (destination, local expert), so they arrive grouped by expert."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax import dispatch
from moe_jax.config import MoEConfig
from moe_jax.ep_rows import _excl_cumsum, _resort_by_local_expert, _sorted_rows, expert_ffn, move_rows
from ops import all_to_all


def _ragged_raw(x, out_rows, in_off, send_sizes, out_off, recv_sizes, impl):
    # every plan here is packed: segments arrive in source order from row 0 on
    return all_to_all.ragged_all_to_all(x, out_rows, in_off, send_sizes, out_off, recv_sizes,
                                        axis_name="expert", backend=impl, packed=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 3))
def _exchange(x, out_rows, plan, impl):
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


def _alltoall_ragged(x_TD, routing, w1, w2, *, m: MoEConfig, impl: str, rows: int,
                     expert_major: bool = False):
    n, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
    L = w1.shape[0]  # experts per device
    t, k = routing.experts.shape
    x_SD, perm = _sorted_rows(x_TD, routing, m.apply_probs_on_input)
    counts_nE = jax.lax.all_gather(routing.tokens_per_expert, "expert")          # [src, E]
    if expert_major:
        return _alltoall_expert_major(x_SD, perm, routing, counts_nE, w1, w2, m=m, impl=impl,
                                      rows=rows)
    M = counts_nE.reshape(n, n, L).sum(-1)                                         # [src, dst]
    send_sizes, recv_sizes = M[me], M[:, me]
    in_off, recv_off = _excl_cumsum(send_sizes), _excl_cumsum(recv_sizes)
    out_off = _excl_cumsum(M, axis=0)[me]          # where my rows land in each destination
    src_off = _excl_cumsum(M, axis=1)[:, me]       # where each source's rows for me start there
    plan = (in_off, send_sizes, out_off, recv_sizes, recv_off, src_off)
    recv = _exchange(x_SD, rows, plan, impl)
    rc_SL = jax.lax.dynamic_slice_in_dim(counts_nE.reshape(n, n, L), me, 1, axis=1)[:, 0]
    x_RD, (inv, order), gs = _resort_by_local_expert(recv, rc_SL, recv_off)
    y_RD = move_rows(expert_ffn(x_RD, gs, w1, w2, m.activation, m.grouped_gemm_backend), inv, order)
    y_SD = _exchange(y_RD, t * k, _reverse(plan), impl)
    y_TD = dispatch.unpermute(y_SD, perm, routing, apply_weights=not m.apply_probs_on_input)
    return y_TD, jnp.zeros((), jnp.int32)


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


def _alltoall_expert_major(x_SD, perm, routing, counts_nE, w1, w2, *, m: MoEConfig, impl, rows):
    """`alltoall_ragged` with one segment per (destination, local expert): rows land grouped by
    local expert (source order within an expert), so the experts run on the receive buffer as it
    is and the results go straight back into the sender's sorted order — no re-sort on either side,
    forward or backward. Needs the segment exchange (Pallas kernel, or emulation on CPU)."""
    n, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
    L = w1.shape[0]
    t, k = routing.experts.shape
    C = counts_nE.reshape(n, n, L)                                    # [src, dst, local expert]
    block = _excl_cumsum(C.sum(0), axis=1)                            # [dst, l]: expert block start
    within = _excl_cumsum(C, axis=0)                                  # [src, dst, l]: source's place
    sorted_off = _excl_cumsum(counts_nE, axis=1)                      # [src, E]: in the sender's rows
    E = n * L
    gs = C[:, me].sum(0)                                              # rows per local expert here
    # dispatch: my segment e = (d, l) -> device d, at its block l after the sources before me
    dispatch_plan = (sorted_off[me], counts_nE[me], jnp.arange(E, dtype=jnp.int32) // L,
                     (block + within[me]).reshape(E), gs.sum())
    # combine: my received segment (s, l) -> back to source s, where it came from
    back = jax.lax.dynamic_slice_in_dim(sorted_off, me * L, L, axis=1)       # [src, l]
    combine_plan = ((block[me][None] + within[:, me]).reshape(E), C[:, me].reshape(E),
                    jnp.repeat(jnp.arange(n, dtype=jnp.int32), L), back.reshape(E), counts_nE[me].sum())
    recv = _exchange_segments(x_SD, rows, dispatch_plan, combine_plan, t * k, impl)
    y_RD = expert_ffn(recv, gs, w1, w2, m.activation, m.grouped_gemm_backend)
    y_SD = _exchange_segments(y_RD, t * k, combine_plan, dispatch_plan, rows, impl)
    y_TD = dispatch.unpermute(y_SD, perm, routing, apply_weights=not m.apply_probs_on_input)
    return y_TD, jnp.zeros((), jnp.int32)
