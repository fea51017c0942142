"""Ragged all-to-all over one mesh axis, inside `jax.shard_map`.

`ragged_all_to_all(x[Rin,D], out_rows, input_offsets[n], send_sizes[n], output_offsets[n],
recv_sizes[n], axis_name=...)` -> out[out_rows, D]: rows x[input_offsets[j] : +send_sizes[j]] land on
device j at out[output_offsets[j] : +send_sizes[j]] (offsets in j's coordinates); recv_sizes[j] is
what device j sends here. Rows of `out` that receive nothing are zero. The semantics of
`jax.lax.ragged_all_to_all` with a zero output buffer.

Backends:
- "xla": `jax.lax.ragged_all_to_all` (not implemented on XLA:CPU; slow on GPUs today, see
  BENCHMARKS.md §4).
- "pallas": a Mosaic-GPU peer-memory kernel (Hopper, one process driving every device of the axis).
  Every SM copies row chunks HBM → SMEM → peer HBM over NVLink with bulk async copies (only the
  rows that are sent, not a padded buffer), then signals the destination. Requires `packed=True`:
  the incoming segments tile out[0 : sum(recv_sizes)) (the layout the EP dispatcher builds); the
  kernel zeroes the rest.
- "emulate": the same plan through all_gather (any platform; for CPU tests).
- "auto": "pallas" on Hopper when packed and single-process, else "xla".
"""
from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax

from ops.grouped_matmul import is_hopper
from ops.shard_types import match_vma

BACKENDS = ("auto", "xla", "pallas", "emulate")
CHUNK_BYTES = 32 * 1024   # rows per copy chunk: as many as fit this (power of two)
SLOTS = 4                 # SMEM chunk buffers per SM: stores in flight while the next loads


def ragged_all_to_all(x, out_rows: int, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str, backend: str = "auto", packed: bool = False):
    """See the module docstring. Not differentiable by itself: its transpose is the reverse plan
    (callers wrap it in a custom_vjp, as `moe_jax.ep_dispatch` does)."""
    if backend not in BACKENDS:
        raise ValueError(f"ragged_all_to_all: backend={backend!r} is invalid: one of {list(BACKENDS)}")
    plan = tuple(jnp.asarray(a, jnp.int32) for a in (input_offsets, send_sizes, output_offsets,
                                                     recv_sizes))
    if backend == "auto":
        backend = "pallas" if packed and pallas_supported(x) else "xla"
    if backend == "pallas":
        if not packed:
            raise ValueError("ragged_all_to_all: backend='pallas' needs packed=True (incoming "
                             "segments tile out[0:sum(recv_sizes)))")
        reason = _pallas_unsupported(x)
        if reason:
            raise ValueError(f"ragged_all_to_all: backend='pallas' cannot run here: {reason}")
        return match_vma(_pallas(x, out_rows, *plan, axis_name=axis_name,
                                  num_sms=_exchange_sms()), x)
    if backend == "emulate":
        return _emulate(x, out_rows, *plan, axis_name=axis_name)
    out = jnp.zeros_like(x, shape=(out_rows,) + x.shape[1:])  # varying like x, no cast to transpose
    return lax.ragged_all_to_all(x, out, *plan, axis_name=axis_name)


def ragged_all_to_all_segments(x, out_rows: int, input_offsets, sizes, destinations, output_offsets,
                               recv_total, *, axis_name: str, backend: str = "auto"):
    """Any number S of segments per device, each to its own device: rows
    x[input_offsets[j] : +sizes[j]] land on device destinations[j] at out[output_offsets[j] : +sizes[j]]
    (offsets in the destination's coordinates). The incoming segments must tile out[0:recv_total)
    (the rows this device receives); rows past it are zero. With segments per (destination, expert)
    the EP dispatcher receives rows already grouped by expert (no re-sort there or back).

    Backends: "pallas" (the peer-memory kernel), "emulate" (all_gather; CPU tests), "auto" (pallas
    where it runs, else emulate). XLA's ragged_all_to_all takes one segment per device, so it has no
    counterpart here. Not differentiable by itself: its transpose is the plan of the way back."""
    if backend not in ("auto", "pallas", "emulate"):
        raise ValueError(f"ragged_all_to_all_segments: backend={backend!r} is invalid: one of "
                         "['auto', 'pallas', 'emulate']")
    plan = tuple(jnp.asarray(a, jnp.int32) for a in (input_offsets, sizes, destinations,
                                                     output_offsets, recv_total))
    if backend == "auto":
        backend = "pallas" if pallas_supported(x) else "emulate"
    if backend == "emulate":
        return _emulate_segments(x, out_rows, *plan, axis_name=axis_name)
    reason = _pallas_unsupported(x)
    if reason:
        raise ValueError(f"ragged_all_to_all_segments: backend='pallas' cannot run here: {reason}")
    return match_vma(_pallas_segments(x, out_rows, *plan, axis_name=axis_name,
                                       num_sms=_exchange_sms()), x)


# ----------------------------------------------------------------------------- helpers
def _pallas_unsupported(x) -> str | None:
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return f"needs GPUs, found {dev.platform}"
    if not is_hopper(dev):
        return f"needs Hopper (sm_90) GPUs, found {dev.device_kind}"
    if jax.process_count() > 1:
        return "needs one process driving every GPU of the axis (peer memory across processes " \
               "is not wired up)"
    row_bytes = x.shape[1] * x.dtype.itemsize
    if x.ndim != 2 or row_bytes % 16 or row_bytes > CHUNK_BYTES:
        return f"needs 2-D rows of a multiple of 16 bytes up to {CHUNK_BYTES}, got {x.shape} {x.dtype}"
    return None


def pallas_supported(x) -> bool:
    return _pallas_unsupported(x) is None


# ----------------------------------------------------------------------------- emulation
def _emulate(x, out_rows, in_off, send_sizes, out_off, recv_sizes, *, axis_name):
    """The peer plan is the segment plan with segment j going to device j."""
    del recv_sizes
    dst = jnp.arange(in_off.shape[0], dtype=jnp.int32)
    return _emulate_segments(x, out_rows, in_off, send_sizes, dst, out_off, None, axis_name=axis_name)


def _emulate_segments(x, out_rows, in_off, sizes, dst, out_off, recv_total, *, axis_name):
    """The segment plan through all_gather: every device gathers all rows and picks its own."""
    del recv_total
    me = lax.axis_index(axis_name)
    xs = lax.all_gather(x, axis_name)                                          # [n, Rin, D]
    in_all, sz_all, dst_all, out_all = (lax.all_gather(a, axis_name).reshape(-1)
                                        for a in (in_off, sizes, dst, out_off))  # [n*S]
    src_dev = jnp.arange(in_all.shape[0], dtype=jnp.int32) // in_off.shape[0]
    sz = jnp.where(dst_all == me, sz_all, 0)                                   # segments for me
    p = jnp.arange(out_rows, dtype=jnp.int32)[:, None]
    hit = (p >= out_all[None]) & (p < (out_all + sz)[None])                    # [out_rows, n*S]
    j = jnp.argmax(hit, axis=1)
    row = in_all[j] + p[:, 0] - out_all[j]
    got = xs[src_dev[j], jnp.clip(row, 0, x.shape[0] - 1)]
    return jnp.where(hit.any(1)[:, None], got, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- pallas kernel
def _chunk_rows(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return 1 << int(math.log2(max(1, chunk_bytes // row_bytes)))


def _exchange_sms() -> int:
    from ops.gmm_pallas_common import num_sms
    return num_sms(False)


def _pallas(x, out_rows, in_off, send_sizes, out_off, recv_sizes, *, axis_name, num_sms,
            chunk_bytes=CHUNK_BYTES, slots=SLOTS):
    """The peer plan (one segment per device) through `_copy_kernel`: a segment's peer and rows are
    picked by selects over the n peers."""
    n = lax.axis_size(axis_name)
    meta = jnp.stack([in_off, send_sizes, out_off, recv_sizes]).astype(jnp.int32)    # [4, n]

    def plan(meta_gmem, R):
        sizes = [meta_gmem[1, p] for p in range(n)]
        items = [lax.div(s + (R - 1), jnp.int32(R)) for s in sizes]

        def locate(i):
            """Item i < send_items -> (destination device, rows, source row, destination row)."""
            dst, rows, src_row, dst_row, base = (jnp.int32(0),) * 5
            for p in range(n):
                c = i - base
                hit = (c >= 0) & (c < items[p])
                dst = jnp.where(hit, p, dst)
                rows = jnp.where(hit, jnp.minimum(sizes[p] - c * R, R), rows)
                src_row = jnp.where(hit, meta_gmem[0, p] + c * R, src_row)
                dst_row = jnp.where(hit, meta_gmem[2, p] + c * R, dst_row)
                base = base + items[p]
            return dst, rows, src_row, dst_row
        return sum(items), sum(meta_gmem[3, p] for p in range(n)), locate

    return _copy_kernel(x, out_rows, meta, plan, axis_name=axis_name, num_sms=num_sms,
                        chunk_bytes=chunk_bytes, slots=slots)


def _pallas_segments(x, out_rows, in_off, sizes, dst, out_off, recv_total, *, axis_name, num_sms,
                     chunk_bytes=CHUNK_BYTES, slots=SLOTS):
    """A segment plan (any number S of segments, each to its own device) through `_copy_kernel`:
    an item's segment is found by a loop over S (code size independent of S)."""
    R = _chunk_rows(x.shape[1] * x.dtype.itemsize, chunk_bytes)
    S = in_off.shape[0]
    item_end = jnp.cumsum((sizes + (R - 1)) // R)
    meta = jnp.stack([in_off, sizes, dst, out_off, item_end,
                      jnp.broadcast_to(recv_total, in_off.shape)]).astype(jnp.int32)  # [6, S]

    def plan(meta_gmem, R):
        def locate(i):
            j = lax.fori_loop(0, S, lambda s, acc: acc + (meta_gmem[4, s] <= i).astype(jnp.int32),
                              jnp.int32(0))
            size = meta_gmem[1, j]
            c = i - (meta_gmem[4, j] - lax.div(size + (R - 1), jnp.int32(R)))
            return (meta_gmem[2, j], jnp.minimum(size - c * R, R), meta_gmem[0, j] + c * R,
                    meta_gmem[3, j] + c * R)
        return meta_gmem[4, S - 1], meta_gmem[5, 0], locate

    return _copy_kernel(x, out_rows, meta, plan, axis_name=axis_name, num_sms=num_sms,
                        chunk_bytes=chunk_bytes, slots=slots)


def _copy_kernel(x, out_rows, meta, plan, *, axis_name, num_sms, chunk_bytes, slots):
    """The peer-memory kernel. `plan(meta_gmem, R)` -> (send items, rows received here, locate):
    the first `send items` items are chunks of at most R rows that `locate(i)` maps to (destination
    device, rows, source row, destination row); the items after them zero out[received:].
    Its code does not grow with the number of devices: peers are named by dynamic device ids and
    offsets (k = 1..n-1 steps round the ring), so Mosaic's layout inference (superlinear in the op
    count) stays fast."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n = lax.axis_size(axis_name)
    d, dtype = x.shape[1], x.dtype
    R = _chunk_rows(d * dtype.itemsize, chunk_bytes)
    sms = num_sms
    zeros = jnp.zeros((R, d), dtype)
    load_kw = {}
    if "oob_mode" in inspect.signature(plgpu.copy_gmem_to_smem).parameters:
        load_kw["oob_mode"] = plgpu.OOBFillMode.PROMISE_IN_BOUNDS  # whole rows: one bulk copy

    def body(meta_gmem, x_gmem, zeros_gmem, out_gmem):
        me = lax.axis_index(axis_name)
        sm = lax.axis_index("sm")
        # ready[k]: signals from device me - k (one per SM there); done: every peer SM's last write.
        # Global semaphores: zero again after every call.
        ready = pl.get_global(plgpu.SemaphoreType.REGULAR((max(n, 2),)))
        done = pl.get_global(plgpu.SemaphoreType.REGULAR((1,)))
        peer = lambda k: {axis_name: lax.rem(me + k, jnp.int32(n))}  # noqa: E731  k steps on

        # 1. Tell every peer that this device's kernel runs (its output buffer may be written),
        #    and wait until every peer runs: one signal per (SM, peer), each SM consumes one per peer.
        for k in range(1, n):
            pl.semaphore_signal(ready.at[k], 1, device_id=peer(k))
        for k in range(1, n):
            pl.semaphore_wait(ready.at[k], 1)

        # items: the chunks of R rows of every segment, then the zero tail
        send_items, total_recv, locate = plan(meta_gmem, R)
        tail = out_rows - total_recv
        n_items = send_items + lax.div(tail + (R - 1), jnp.int32(R))

        @functools.partial(pl.run_scoped, buf=plgpu.SMEM((slots, R, d), dtype),
                           zbuf=plgpu.SMEM((R, d), dtype), bars=plgpu.Barrier(num_barriers=slots + 1))
        def _scoped(buf, zbuf, bars):
            plgpu.copy_gmem_to_smem(zeros_gmem, zbuf, bars.at[slots], **load_kw)
            plgpu.barrier_wait(bars.at[slots])

            def ladder(rows, fn):
                """fn(offset, size) for the power-of-two pieces of `rows` (<= R): static sizes,
                dynamic offsets (TMA boxes and SMEM views are static; row counts are not)."""
                off = jnp.int32(0)
                size = R
                while size >= 1:
                    @pl.when((rows & size) != 0)
                    def _(off=off, size=size):
                        fn(off, size)
                    off = off + (rows & size)
                    size //= 2

            def send(slot, src_row, dst, dst_row, rows):
                sbuf = buf.at[slot]

                def piece(off, size):
                    # a piece of `size` rows sits at SMEM rows [size, 2*size) (or [0, R) when whole):
                    # the pieces of one item use disjoint rows of its slot
                    view = sbuf.at[pl.ds(0 if size == R else size, size)]
                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(src_row + off, size)], view,
                                            bars.at[slot], **load_kw)
                    plgpu.barrier_wait(bars.at[slot])
                    plgpu.copy_smem_to_gmem(view, dst.at[pl.ds(dst_row + off, size)])

                # a slot is refilled only once the store issued from it slots items ago has read it
                # (every item issues at least one store)
                plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                ladder(rows, piece)  # a whole chunk is the ladder's first (R-row) piece alone

            def item(i, slot):
                @pl.when(i < send_items)
                def _():
                    p, rows, src_row, dst_row = locate(i)

                    @pl.when(p == me)
                    def _():
                        send(slot, src_row, out_gmem, dst_row, rows)

                    @pl.when(p != me)
                    def _():
                        send(slot, src_row, plgpu.remote_ref(out_gmem, {axis_name: p}), dst_row, rows)

                @pl.when(i >= send_items)
                def _():
                    c = i - send_items
                    row, rows = total_recv + c * R, jnp.minimum(tail - c * R, R)
                    ladder(rows, lambda off, size: plgpu.copy_smem_to_gmem(
                        zbuf.at[pl.ds(0, size)], out_gmem.at[pl.ds(row + off, size)]))

            # this SM's items: sm, sm + sms, ...
            @pl.loop(0, lax.div(jnp.maximum(n_items - sm, 0) + (sms - 1), jnp.int32(sms)))
            def _item(j):
                item(sm + j * sms, lax.rem(j, jnp.int32(slots)))

        # 2. All my writes have landed: tell every peer; SM 0 waits for every peer's SMs.
        plgpu.wait_smem_to_gmem(0, wait_read_only=False)
        for k in range(1, n):
            pl.semaphore_signal(done.at[0], 1, device_id=peer(k))
        if n > 1:
            @pl.when(sm == 0)
            def _():
                pl.semaphore_wait(done.at[0], (n - 1) * sms)

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((out_rows, d), dtype),
                          grid=(sms,), grid_names=("sm",), kernel_name="ep_exchange")
    return kernel(meta, x, zeros)
