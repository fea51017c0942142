"""One warp-specialized TMA→wgmma pipeline per SM over all of that SM's work items (Mosaic GPU).

`emit_pipeline_warp_specialized` runs one pipeline per work item: its SMEM ring fills at the
item's start and drains at its end. Here the ring runs across item boundaries instead: the memory
warpgroup walks this SM's (item, k-step) sequence and loads the next item's first steps while the
compute warpgroups are still on the previous item's last steps and its epilogue. Step t of the
flattened sequence uses ring slot t % stages; `loaded[slot]` completes when its copies land,
`consumed[slot]` when every compute warpgroup has finished reading it (ping-pong: the one that
owns the step). Every warpgroup waits on every phase of the barriers it waits on, in order (Mosaic
tracks the parity per thread).

Work items are handed out round-robin: SM s takes items s, s + num_sms, ... (a persistent grid).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.gmm_pallas_common import MEMORY_REGISTERS


def compute_registers(num_compute_wgs):
    """Registers per compute thread when the memory WG keeps MEMORY_REGISTERS (64k per SM)."""
    return int(min(256, (512 - MEMORY_REGISTERS) / num_compute_wgs) // 8 * 8)


def consumers_per_slot(num_compute_wgs, pingpong):
    """Arrivals that release a ring slot: every compute WG, or (ping-pong) the one that owns it."""
    return 1 if pingpong else num_compute_wgs


def loaded_barriers(stages, pingpong):
    """Barriers in the `loaded` array: one per slot, or (ping-pong) one per slot and compute WG."""
    return 2 * stages if pingpong else stages


def run(*, num_items, fetch, steps_of, load, mma, epilogue, acc_shape, stages, loaded, consumed,
        num_compute_wgs=2, delay_release=0, pingpong=False, wg_axis="wg", sm_axis="sm", prologue=None):
    """Runs the persistent pipeline; call inside the kernel body with all warpgroups.

    num_items: int32 scalar, total work items. fetch(lin) -> pytree of int32 scalars describing
    item lin (must accept lin >= num_items: clamp). steps_of(info) -> int32 steps (may be 0).
    load(info, kk, slot, barrier): memory WG, issues the copies of step kk into ring slot `slot`,
    completing on `barrier`. mma(info, kk, slot, acc_ref): compute WG, issues its wgmma(s).
    epilogue(info, acc_ref): compute WG, after the item's last step (acc_ref holds the sum; zeros
    for a 0-step item). prologue(info): compute WG, before the item's first step (e.g. to start loads
    that the epilogue needs). acc_shape may be a tuple of shapes: then mma and epilogue get a tuple of
    accumulators (e.g. the gate and up halves of a fused SwiGLU GEMM). loaded: Barrier(num_arrivals=copies per step,
    num_barriers=loaded_barriers(stages, pingpong)); consumed: Barrier(num_arrivals=
    consumers_per_slot(...), num_barriers=stages).
    delay_release=1 keeps two wgmma groups in flight per WG and releases step t-1 after step t
    is issued (the ring must then have at least 2 slots).
    pingpong: compute WG w takes this SM's items w, w+2, ... whole (acc_shape is the CTA tile).
    The ring stays one ring, filled in item order, so the WGs' main loops take turns: WG 1 can
    only start item i+1 once item i's last steps are loaded, and it computes item i+1 while WG 0
    runs item i's epilogue (and waits for item i+2's first steps). Each WG has its own `loaded`
    barrier per slot (loaded[w * stages + slot]) so that it waits on exactly the phases of its own
    steps, in order; the phases of the other WG's steps never concern it.
    """
    if pingpong and num_compute_wgs != 2:
        raise ValueError(f"flat pipeline: ping-pong needs 2 compute WGs, got {num_compute_wgs}")
    if delay_release not in (0, 1) or stages < 1 + delay_release:
        raise ValueError(f"flat pipeline: delay_release in (0, 1) and more slots than "
                         f"delay_release, got {delay_release=} {stages=}")
    sm = lax.axis_index(sm_axis)
    sms = lax.axis_size(sm_axis)
    mine = lax.div(jnp.maximum(num_items - sm + sms - 1, 0), sms)  # items of this SM

    def items(per_item, carry0):
        """fori over this SM's items with the next one's info prefetched (a dependent table load
        at each item's start would stall the warpgroup). per_item(i, info, carry) -> carry."""
        def body(i, carry):
            c, info = carry
            nxt = fetch(sm + (i + 1) * sms)
            return per_item(i, info, c), nxt
        c, _ = lax.fori_loop(0, mine, body, (carry0, fetch(sm)))
        return c

    def owner(i):  # the compute WG that takes this SM's i-th item (ping-pong)
        return lax.rem(i, 2)

    def memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def per_item(i, info, t0):
            wg_off = owner(i) * stages if pingpong else 0

            def step(kk, t):
                slot = lax.rem(t, stages)

                @pl.when(t >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                load(info, kk, slot, loaded.at[wg_off + slot])
                return t + 1
            return lax.fori_loop(0, steps_of(info), step, t0)

        t_end = items(per_item, jnp.int32(0))

        # wait for the last releases, so no arrival is left pending when the kernel ends
        @pl.loop(jnp.maximum(t_end - stages, 0), t_end)
        def _(t):
            plgpu.barrier_wait(consumed.at[lax.rem(t, stages)])

    def compute():
        plgpu.set_max_registers(compute_registers(num_compute_wgs), action="increase")
        wg = lax.axis_index(wg_axis)
        wg_off = wg * stages if pingpong else 0

        def run_item(info, t):
            steps = steps_of(info)
            if prologue is not None:
                prologue(info)

            @functools.partial(pl.run_scoped, acc_ref=_accumulators(acc_shape))
            def t_end(acc_ref):
                def step(kk, carry):
                    t, acc = carry
                    slot = lax.rem(t, stages)
                    plgpu.barrier_wait(loaded.at[wg_off + slot])
                    mma(info, kk, slot, acc)
                    plgpu.wgmma_wait(delay_release)
                    if delay_release:
                        @pl.when(kk > 0)
                        def _():
                            plgpu.barrier_arrive(consumed.at[lax.rem(t + stages - 1, stages)])
                    else:
                        plgpu.barrier_arrive(consumed.at[slot])
                    return t + 1, acc

                t_last, acc = lax.fori_loop(0, steps, step, (t, acc_ref))
                if delay_release:
                    plgpu.wgmma_wait(0)

                    @pl.when(steps > 0)
                    def _():
                        plgpu.barrier_arrive(consumed.at[lax.rem(t_last + stages - 1, stages)])
                epilogue(info, acc)
                return t_last

            return t_end

        def per_item(i, info, t):
            if not pingpong:
                return run_item(info, t)
            # the other WG's items only move this WG's position in the ring
            return lax.cond(owner(i) == wg, lambda t: run_item(info, t),
                            lambda t: t + steps_of(info), t)

        items(per_item, jnp.int32(0))

    lax.cond(lax.axis_index(wg_axis) < num_compute_wgs, compute, memory)


def _accumulators(acc_shape):
    """One fp32 wgmma accumulator of acc_shape, or a tuple of them for a tuple of shapes."""
    if isinstance(acc_shape[0], tuple):
        return tuple(plgpu.ACC(s, jnp.float32) for s in acc_shape)
    return plgpu.ACC(acc_shape, jnp.float32)
