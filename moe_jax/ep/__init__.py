"""Expert parallelism: the MoE layer's dispatch → experts → combine inside `jax.shard_map` over the
MoE mesh.

Tokens are split over (`edata`, `expert`); the experts module's parameters over `expert` (EP) and
their hidden dim over `etensor` (ETP: its partial outputs are summed over `etensor`). Routing is
decided before, on the global batch, so results equal one device's. On every device a dispatcher
(`MoEConfig.dispatcher.type`, the `moe_jax.dispatch` contract) sorts the device's assignments,
exchanges rows with the devices that hold their experts, the same experts module as on one device
runs on what arrived, and `combine` sends the outputs back:

- `alltoall` (`AllToAll`): fixed [P, C, D] buffers per (source, destination) and `jax.lax.all_to_all`.
  Dropless: C = `buffer_factor` × the balanced share T·k/P while every (source, destination) count
  fits — one scalar pmax decides — else (`lax.cond`) the worst case C = T·min(k, L); `dropped` stays
  0. With `expert_capacity_factor`: C = ceil(T·k/P·factor), overflow dropped (by position), counted.
- `alltoall_ragged` (`RaggedAllToAll`, `ExpertMajorAllToAll`): counts exchanged, then only the
  routed rows move (`ops.all_to_all`): on Hopper with one process driving the GPUs a peer-memory
  Pallas kernel, else XLA's `ragged_all_to_all` (GPU only) or, for CPU tests, an emulation. The
  receive buffer holds `buffer_factor` × T·k rows per device (same pmax/cond fallback). With the
  Pallas exchange the rows go as one segment per (destination, local expert) (`expert_major`).
- `allgather` (`AllGather`): all-gather the tokens, run the local experts, reduce-scatter back.
- `auto`: `alltoall_ragged` where its Pallas exchange runs, else `alltoall` (measured on 2 and 4
  H200: BENCHMARKS.md §4).
`overlap_chunks > 1` runs dispatch → experts → combine on each chunk of the local tokens as an
independent chain, so chunk c+1's exchange can overlap chunk c's experts.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax import parallel
from moe_jax.config import DispatchConfig, MoEConfig
from moe_jax.ep.allgather import AllGather
from moe_jax.ep.alltoall import AllToAll, fixed_capacity
from moe_jax.ep.ragged import ExpertMajorAllToAll, RaggedAllToAll
from moe_jax.ep.rows import MESH_AXES, live_axes, psum_live, vary
from moe_jax.routing import Assignment
from ops import all_to_all, vma

TOKENS = ("edata", "expert")

__all__ = ["AllGather", "AllToAll", "ExpertMajorAllToAll", "RaggedAllToAll", "buffer_rows",
           "check", "fixed_capacity", "resolve", "resolve_type", "run"]


def check(dc: DispatchConfig, ep: int) -> None:
    """Fail early (before any trace) on a dispatcher that cannot run on this platform."""
    if (dc.type == "alltoall_ragged" and dc.ragged_impl in ("auto", "xla") and ep > 1
            and jax.devices()[0].platform == "cpu"):
        raise ValueError("MoEConfig.dispatcher.type='alltoall_ragged' needs GPUs: XLA:CPU does not "
                         "implement ragged_all_to_all; use 'alltoall' or 'allgather' (or "
                         "dispatcher.ragged_impl='emulate' for tests)")


def resolve_type(kind: str, x_TD) -> str:
    """`auto` -> `alltoall_ragged` where the peer-memory Pallas exchange runs for rows like x_TD's,
    else `alltoall` (XLA's own ragged exchange is slower than `alltoall` on GPUs, and absent on CPU)."""
    if kind == "auto":
        return "alltoall_ragged" if all_to_all.pallas_supported(x_TD) else "alltoall"
    return kind


def resolve(dc: DispatchConfig, x_TD, ep: int) -> tuple[str, str, bool]:
    """(type, ragged exchange backend, expert_major) with every `auto` decided for rows like x_TD's."""
    kind = resolve_type(dc.type, x_TD)
    impl = dc.ragged_impl
    if impl == "auto":  # the peer-memory Pallas kernel where it runs (Hopper, one process)
        impl = "pallas" if all_to_all.pallas_supported(x_TD) else "xla"
    check(DispatchConfig(type=kind, ragged_impl=impl), ep)
    expert_major = dc.expert_major
    if expert_major is None:
        expert_major = kind == "alltoall_ragged" and impl == "pallas"
    if expert_major and (kind != "alltoall_ragged" or impl not in ("pallas", "emulate")):
        raise ValueError("MoEConfig.dispatcher.expert_major=True needs type='alltoall_ragged' with "
                         f"the Pallas exchange (or 'emulate'); got {kind!r} with {impl!r}")
    return kind, impl, expert_major


def round_up(x: float, mult: int) -> int:
    return int(-(-int(-(-x // 1)) // mult) * mult)


def buffer_rows(kind: str, tokens: int, m: MoEConfig, n: int, L: int, buffer_factor):
    """(fast, worst) buffer rows for `tokens` local tokens: per (source, destination) for alltoall,
    received rows per device for alltoall_ragged."""
    k = m.router_topk
    if kind == "alltoall":
        worst, share = fixed_capacity(tokens, m, n), tokens * k / n
    else:
        worst, share = n * tokens * min(k, L), tokens * k
    if buffer_factor is None:
        return worst, worst
    return min(worst, round_up(share * buffer_factor, 8)), worst


def _dispatcher(kind: str, rows: int | None, impl: str, expert_major: bool, probs_on_input: bool):
    if kind == "alltoall":
        return AllToAll(rows, probs_on_input)
    if kind == "allgather":
        return AllGather(probs_on_input)
    cls = ExpertMajorAllToAll if expert_major else RaggedAllToAll
    return cls(rows, impl, probs_on_input)


def chunked(routed, chunks: int):
    """`routed(dispatcher, x_TD, assignment, experts)` on `chunks` consecutive slices of the tokens,
    as independent chains (XLA may overlap one chunk's exchange with another's experts)."""
    if chunks == 1:
        return routed

    def run(d, x_TD, a: Assignment, experts):
        tc = x_TD.shape[0] // chunks
        outs = [routed(d, x_TD[c * tc:(c + 1) * tc], a.rows(c * tc, (c + 1) * tc), experts)
                for c in range(chunks)]
        return jnp.concatenate([y for y, _ in outs], axis=0), sum(dr for _, dr in outs)
    return run


def _local_experts(graphdef, treedef, leaves):
    """This device's experts module (its shard of the parameters), typed varying over every live
    mesh axis (so the grouped GEMM's custom_vjp transposes sum dx over `etensor`, dw over `edata`),
    with the ETP partial outputs summed over `etensor`."""
    axes = live_axes(MESH_AXES)
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, [vary(v, axes) for v in leaves]))

    def experts(rows_RD, group_sizes_L):
        return psum_live(module(vary(rows_RD, axes), group_sizes_L), ("etensor",))
    return experts


def _need(kind, a: Assignment, chunks: int, n: int):
    """The largest buffer fill this device sees over its chunks: per destination (alltoall) or, for
    the ragged buffer, rows received by each device of the `expert` axis (one psum)."""
    tc = a.experts.shape[0] // chunks
    per_dest = jnp.stack([a.rows(c * tc, (c + 1) * tc).tokens_per_expert.reshape(n, -1).sum(1)
                          for c in range(chunks)])                               # [chunks, n]
    return jnp.max(per_dest) if kind == "alltoall" else jnp.max(jax.lax.psum(per_dest, "expert"))


def _body(x_TD, a: Assignment, leaves, *, routed, graphdef, treedef, m: MoEConfig, kind, impl,
          expert_major):
    dc = m.dispatcher
    chunks = dc.overlap_chunks
    a = a.recount()  # this shard's counts
    pipeline = chunked(routed, chunks)

    def run(rows, x_TD, a, leaves):
        d = _dispatcher(kind, rows, impl, expert_major, m.apply_probs_on_input)
        return pipeline(d, x_TD, a, _local_experts(graphdef, treedef, leaves))

    zero = jnp.zeros((), jnp.int32)
    if kind == "allgather":
        return run(None, x_TD, a, leaves)[0], zero  # dropless
    n, tc = jax.lax.axis_size("expert"), x_TD.shape[0] // chunks
    capacity = kind == "alltoall" and m.expert_capacity_factor is not None
    fast, worst = buffer_rows(kind, tc, m, n, m.num_experts // n,
                              None if capacity else dc.buffer_factor)
    if capacity or fast >= worst:
        y_TD, dropped = run(worst, x_TD, a, leaves)  # capacity: C = factor x balanced share
    elif not dc.fallback:
        y_TD, dropped = run(fast, x_TD, a, leaves)
    else:
        # Dropless: the fast buffer unless some fill on some device exceeds it (one scalar pmax).
        # One cond around all chunks keeps them overlappable inside each branch; the rare worst-case
        # branch is rematerialized in the backward pass so the common path does not carry its
        # (large, zero) residuals.
        need = _need(kind, a, chunks, n)
        axes = tuple(ax for ax in live_axes(MESH_AXES) if ax in vma(need))
        overflow = (jax.lax.pmax(need, axes) if axes else need) > fast
        y_TD, dropped = jax.lax.cond(overflow, jax.checkpoint(functools.partial(run, worst)),
                                     functools.partial(run, fast), x_TD, a, leaves)
    # only a capacity factor (or the fast buffer without its fallback) drops; dropless counts are
    # zero by construction and need no collective
    may_drop = capacity or (not dc.fallback and fast < worst)
    return y_TD, (psum_live(dropped, TOKENS) if may_drop else zero)


def _spec(mesh, names) -> P:
    """PartitionSpec of logical names on the MoE mesh, naming `expert` and the other axes only where
    they hold more than one device (see `live_axes`)."""
    keep = lambda ax: ax == "expert" or mesh.shape[ax] > 1  # noqa: E731
    out = []
    for ax in parallel.spec(names):
        axes = tuple(a for a in ((ax,) if isinstance(ax, str) else (ax or ())) if keep(a))
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def run(routed, x_TD: jax.Array, a: Assignment, experts: nnx.Module, m: MoEConfig,
        layout: parallel.Layout):
    """`routed(dispatcher, x_TD, assignment, experts) -> (y_TD, dropped)` on every device of the
    layout's MoE mesh (and chunk), with the dispatcher `m.dispatcher` picks. Returns (y[T,D], the
    assignments dropped in dispatch)."""
    mesh = layout.moe_mesh
    kind, impl, expert_major = resolve(m.dispatcher, x_TD, mesh.shape["expert"])
    shards = layout.token_shards * m.dispatcher.overlap_chunks
    if x_TD.shape[0] % shards:
        raise ValueError(f"MoE layer: {x_TD.shape[0]} tokens are not divisible by "
                         f"edata*expert*overlap_chunks = {shards}")
    graphdef, state = nnx.split(experts)
    leaves, treedef = jax.tree.flatten(state)
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    # logical names of each array's dims (a layer of a scanned stack keeps the stack's leading
    # `layers` name in its metadata: the trailing names are the array's)
    names = [tuple(v.get_metadata().get("logical_axes") or (None,) * v.ndim)[-v.ndim:]
             for v in variables]
    tok = _spec(mesh, ("act_tokens_moe",))
    a_spec = Assignment(weights=tok, experts=tok, kept=tok, tokens_per_expert=P())
    body = functools.partial(_body, routed=routed, graphdef=graphdef, treedef=treedef, m=m,
                             kind=kind, impl=impl, expert_major=expert_major)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, a_spec, [_spec(mesh, n) for n in names]),
                       out_specs=(tok, P()))
    return fn(x_TD, a, leaves)
