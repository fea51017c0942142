"""One warp-specialized TMA→wgmma pipeline per SM over all of that SM's work items (Mosaic GPU).

`emit_pipeline_warp_specialized` runs one pipeline per work item: its SMEM ring fills at the
item's start and drains at its end. Here the ring runs across item boundaries instead: the memory
warpgroup walks this SM's (item, k-step) sequence and loads the next item's first steps while the
compute warpgroups are still on the previous item's last steps and its epilogue. Step t of the
flattened sequence uses ring slot t % stages; `loaded[slot]` completes when its copies land,
`consumed[slot]` when every compute warpgroup has finished reading it. Every warpgroup waits on
every phase of the barriers it waits on, in order (Mosaic tracks the parity per thread).

Work items are handed out round-robin: SM s takes items s, s + num_sms, ... (a persistent grid).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MEMORY_REGISTERS = 40


def compute_registers(num_compute_wgs):
    """Registers per compute thread when the memory WG keeps MEMORY_REGISTERS (64k per SM)."""
    return int(min(256, (512 - MEMORY_REGISTERS) / num_compute_wgs) // 8 * 8)


def consumers_per_slot(num_compute_wgs, pingpong):
    """Arrivals that release a ring slot: every compute WG, or (ping-pong) the one that owns it."""
    return 1 if pingpong else num_compute_wgs


def run(*, num_items, fetch, steps_of, load, mma, epilogue, acc_shape, stages, loaded, consumed,
        num_compute_wgs=2, delay_release=0, pingpong=False, wg_axis="wg", sm_axis="sm"):
    """Runs the persistent pipeline; call inside the kernel body with all warpgroups.

    num_items: int32 scalar, total work items. fetch(lin) -> pytree of int32 scalars describing
    item lin (must accept lin >= num_items: clamp). steps_of(info) -> int32 steps (may be 0).
    load(info, kk, slot, barrier): memory WG, issues the copies of step kk into ring slot `slot`,
    completing on `barrier`. mma(info, kk, slot, acc_ref): compute WG, issues its wgmma(s).
    epilogue(info, acc_ref): compute WG, after the item's last step (acc_ref holds the sum; zeros
    for a 0-step item). loaded: Barrier(num_arrivals=copies per step, num_barriers=stages);
    consumed: Barrier(num_arrivals=consumers_per_slot(...), num_barriers=stages).
    delay_release=1 keeps two wgmma groups in flight per WG and releases step t-1 after step t
    is issued (each ring must then have at least 2 slots).
    pingpong: compute WG w takes this SM's items w, w+2, ... whole (acc_shape is the CTA tile),
    each WG with its own ring of stages/2 slots; the memory WG fills them in item order, so one
    WG's epilogue runs while the other WG's wgmmas keep the tensor cores busy.
    """
    rings = 2 if pingpong else 1
    per_ring = stages // rings
    if pingpong and (num_compute_wgs != 2 or stages % 2):
        raise ValueError(f"flat pipeline: ping-pong needs 2 compute WGs and an even number of "
                         f"stages, got {num_compute_wgs=} {stages=}")
    if delay_release not in (0, 1) or per_ring < 1 + delay_release:
        raise ValueError(f"flat pipeline: delay_release in (0, 1) and more slots per ring than "
                         f"delay_release, got {delay_release=} {stages=} {pingpong=}")
    sm = lax.axis_index(sm_axis)
    sms = lax.axis_size(sm_axis)
    mine = lax.div(jnp.maximum(num_items - sm + sms - 1, 0), sms)  # items of this SM

    def items(first, stride, per_item, carry0):
        """fori over this SM's items first, first+stride, ... with the next one's info
        prefetched (a dependent table load at each item's start would stall the warpgroup)."""
        count = lax.div(jnp.maximum(mine - first + stride - 1, 0), stride)

        def body(j, carry):
            c, info = carry
            i = first + j * stride
            nxt = fetch(sm + (i + stride) * sms)
            return per_item(i, info, c), nxt
        c, _ = lax.fori_loop(0, count, body, (carry0, fetch(sm + first * sms)))
        return c

    def slot_of(ring, t):
        return ring * per_ring + lax.rem(t, per_ring)

    def memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def per_item(i, info, ts):
            ring = lax.rem(i, rings) if pingpong else 0

            def step(kk, t):
                slot = slot_of(ring, t)

                @pl.when(t >= per_ring)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                load(info, kk, slot, loaded.at[slot])
                return t + 1
            if not pingpong:
                return (lax.fori_loop(0, steps_of(info), step, ts[0]),)
            t = lax.fori_loop(0, steps_of(info), step, jnp.where(ring == 0, ts[0], ts[1]))
            return jnp.where(ring == 0, t, ts[0]), jnp.where(ring == 0, ts[1], t)

        t_ends = items(0, 1, per_item, (jnp.int32(0),) * rings)

        # wait for the last releases, so no arrival is left pending when the kernel ends
        for ring, t_end in enumerate(t_ends):
            @pl.loop(jnp.maximum(t_end - per_ring, 0), t_end)
            def _(t):
                plgpu.barrier_wait(consumed.at[slot_of(ring, t)])

    def compute():
        plgpu.set_max_registers(compute_registers(num_compute_wgs), action="increase")
        wg = lax.axis_index(wg_axis)
        ring = wg if pingpong else 0

        def per_item(i, info, t):
            steps = steps_of(info)

            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, jnp.float32))
            def t_end(acc_ref):
                def step(kk, carry):
                    t, acc = carry
                    slot = slot_of(ring, t)
                    plgpu.barrier_wait(loaded.at[slot])
                    mma(info, kk, slot, acc)
                    plgpu.wgmma_wait(delay_release)
                    if delay_release:
                        @pl.when(kk > 0)
                        def _():
                            plgpu.barrier_arrive(consumed.at[slot_of(ring, t + per_ring - 1)])
                    else:
                        plgpu.barrier_arrive(consumed.at[slot])
                    return t + 1, acc

                t_last, acc = lax.fori_loop(0, steps, step, (t, acc_ref))
                if delay_release:
                    plgpu.wgmma_wait(0)

                    @pl.when(steps > 0)
                    def _():
                        plgpu.barrier_arrive(consumed.at[slot_of(ring, t_last + per_ring - 1)])
                epilogue(info, acc)
                return t_last

            return t_end

        if pingpong:
            items(wg, 2, per_item, jnp.int32(0))
        else:
            items(0, 1, per_item, jnp.int32(0))

    lax.cond(lax.axis_index(wg_axis) < num_compute_wgs, compute, memory)
