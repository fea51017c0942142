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


def run(*, num_items, fetch, steps_of, load, mma, epilogue, acc_shape, stages, loaded, consumed,
        num_compute_wgs=2, delay_release=0, wg_axis="wg", sm_axis="sm"):
    """Runs the persistent pipeline; call inside the kernel body with all warpgroups.

    num_items: int32 scalar, total work items. fetch(lin) -> pytree of int32 scalars describing
    item lin (must accept lin >= num_items: clamp). steps_of(info) -> int32 steps (may be 0).
    load(info, kk, slot, barrier): memory WG, issues the copies of step kk into ring slot `slot`,
    completing on `barrier`. mma(info, kk, slot, acc_ref): compute WG, issues its wgmma(s).
    epilogue(info, acc_ref): compute WG, after the item's last step (acc_ref holds the sum; zeros
    for a 0-step item). loaded: Barrier(num_arrivals=copies per step, num_barriers=stages);
    consumed: Barrier(num_arrivals=num_compute_wgs, num_barriers=stages).
    delay_release=1 keeps two wgmma groups in flight per WG and releases step t-1 after step t
    is issued (the ring must then have at least 2 slots).
    """
    if delay_release not in (0, 1) or stages < 1 + delay_release:
        raise ValueError(f"flat pipeline: delay_release in (0, 1) and stages > delay_release, got "
                         f"{delay_release=} {stages=}")
    sm = lax.axis_index(sm_axis)
    sms = lax.axis_size(sm_axis)
    mine = lax.div(jnp.maximum(num_items - sm + sms - 1, 0), sms)  # items of this SM

    def items(per_item, t0):
        """fori over this SM's items with the step counter t and the next item's info prefetched
        (a dependent table load at each item's start would stall the warpgroup)."""
        def body(i, carry):
            t, info = carry
            nxt = fetch(sm + (i + 1) * sms)
            return per_item(info, t), nxt
        t, _ = lax.fori_loop(0, mine, body, (t0, fetch(sm)))
        return t

    def memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def per_item(info, t):
            def step(kk, t):
                slot = lax.rem(t, stages)

                @pl.when(t >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                load(info, kk, slot, loaded.at[slot])
                return t + 1
            return lax.fori_loop(0, steps_of(info), step, t)

        t_end = items(per_item, jnp.int32(0))

        # wait for the last releases, so no arrival is left pending when the kernel ends
        @pl.loop(jnp.maximum(t_end - stages, 0), t_end)
        def _(t):
            plgpu.barrier_wait(consumed.at[lax.rem(t, stages)])

    def compute():
        plgpu.set_max_registers(compute_registers(num_compute_wgs), action="increase")

        def per_item(info, t):
            steps = steps_of(info)

            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, jnp.float32))
            def t_end(acc_ref):
                def step(kk, carry):
                    t, acc = carry
                    slot = lax.rem(t, stages)
                    plgpu.barrier_wait(loaded.at[slot])
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

        items(per_item, jnp.int32(0))

    lax.cond(lax.axis_index(wg_axis) < num_compute_wgs, compute, memory)
