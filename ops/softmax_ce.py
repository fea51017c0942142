"""Softmax cross-entropy of a block of float32 logits and its gradient, in one kernel over each row.

  loss_C, dlogits_CV = softmax_cross_entropy_rows(logits_CV, targets_C, weights_C, grad_dtype)
  loss_c    = w_c · (logsumexp(logits_c) − logits_c[target_c])
  dlogits_c = w_c · (softmax(logits_c) − onehot(target_c))          (in grad_dtype)

This is the inner step of `ops.cross_entropy`'s chunked LM-head loss, which makes each chunk's gradient in
its forward pass. XLA runs it as three passes over the chunk's float32 logits (the max, the sum of
exponentials, then the gradient): three reads and one write. The kernel reads each row in column blocks
twice — an online max/sum of exponentials (and the target's logit), then the gradient; the first read asks
L2 to keep each block for the second (how much it keeps was not measured). GPU time for [2048, 32000] (H100,
2026-12-06, `bench_ops.py --tune-ce`): 0.18 ms at the default launch (one row a program in 8192-column
blocks, 16 warps; ahead of persistent grids of 1-4 programs per SM and of one whole-row block) against
0.30 ms for XLA's passes; in the mixtral_small step 1.54 ms per step against 2.45 ms for XLA's passes in stop 38's
H100 profile (experiments/NOTES_speed.md).
Any width V (the last block is masked), any rows; `backend="auto"` takes the kernel on one NVIDIA GPU
(ops.pallas_triton.resolve), the plain formula elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops.pallas_triton import compiler_params, resolve


@dataclasses.dataclass(frozen=True)
class Launch:
    """Columns per block (a power of two; a block as wide as the row reads it once), programs in the grid
    (the largest divisor of the rows at most this; fewer programs loop over more rows each), warps per
    program. bench_ops.py --tune-ce sweeps them (the module docstring has its pick)."""
    block: int = 8192
    programs: int = 2048
    warps: int = 16


LAUNCH = Launch()


def reference_softmax_cross_entropy_rows(logits_CV, targets_C, weights_C, grad_dtype):
    """The formula in plain JAX (float32 math): (loss [C] float32, dlogits [C, V] grad_dtype)."""
    logits = logits_CV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_C[:, None], axis=-1)[:, 0]
    p = jnp.exp(logits - lse[:, None])
    onehot = jax.nn.one_hot(targets_C, logits.shape[1], dtype=p.dtype)
    return weights_C * (lse - gold), ((p - onehot) * weights_C[:, None]).astype(grad_dtype)


def _kernel(l_ref, t_ref, w_ref, d_ref, loss_ref, *, v, block, rows_per):
    first = pl.program_id(0) * rows_per
    nb = pl.cdiv(v, block)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (block,), 0)

    def row(i, carry):
        r = first + i
        t, wt = t_ref[r], w_ref[r]

        def load(j, keep):  # the first read asks L2 to keep the block for the second
            cols = j * block + lanes
            x = pltriton.load(l_ref.at[r, pl.ds(j * block, block)], mask=cols < v, other=-jnp.inf,
                              eviction_policy="evict_last" if keep else "evict_first")
            return cols, x.astype(jnp.float32)

        def stats(cols, x, m, s, gold):  # running max, sum of exp(x - max), the target's logit
            m2 = jnp.maximum(m, jnp.max(x))
            s = s * jnp.exp(m - m2) + jnp.sum(jnp.exp(x - m2))
            return m2, s, gold + jnp.sum(jnp.where(cols == t, x, 0.0))

        def grads(j, cols, x, lse):
            d = (jnp.exp(x - lse) - jnp.where(cols == t, 1.0, 0.0)) * wt
            pltriton.store(d_ref.at[r, pl.ds(j * block, block)], d.astype(d_ref.dtype), mask=cols < v)

        zero = jnp.zeros((), jnp.float32)
        if nb == 1:  # the whole row in one block: one read
            cols, x = load(0, False)
            m, s, gold = stats(cols, x, zero - jnp.inf, zero, zero)
        else:
            m, s, gold = jax.lax.fori_loop(0, nb, lambda j, c: stats(*load(j, True), *c),
                                           (zero - jnp.inf, zero, zero))
        lse = m + jnp.log(s)
        loss_ref[r] = wt * (lse - gold)
        if nb == 1:
            grads(0, cols, x, lse)
        else:
            jax.lax.fori_loop(0, nb, lambda j, c: (grads(j, *load(j, False), lse), c)[1], 0)
        return carry

    jax.lax.fori_loop(0, rows_per, row, 0)


def _programs(rows: int, most: int) -> int:
    """The largest divisor of `rows` that is at most `most` (at least 1)."""
    return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)


def _call(logits, targets, weights, grad_dtype, interpret, launch: Launch):
    c, v = logits.shape
    block = min(launch.block, pl.next_power_of_2(v))
    progs = _programs(c, launch.programs)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, v=v, block=block, rows_per=c // progs), grid=(progs,),
        in_specs=[whole((c, v)), whole((c,)), whole((c,))],
        out_specs=[whole((c, v)), whole((c,))],
        out_shape=[jax.ShapeDtypeStruct((c, v), grad_dtype), jax.ShapeDtypeStruct((c,), jnp.float32)],
        compiler_params=compiler_params(num_warps=launch.warps, interpret=interpret),
        interpret=interpret, name="softmax_ce_rows",
    )(logits, targets, weights)


def softmax_cross_entropy_rows(logits_CV, targets_C, weights_C, grad_dtype, *, backend: str = "auto",
                               interpret: bool = False):
    """(loss [C] float32, dlogits [C, V] in grad_dtype) of logits [C, V] (float32) against targets [C]
    (int) with weights [C] (float32): see the module docstring. Backends: "pallas" (the kernel),
    "reference" (plain JAX), "auto" (the kernel on one NVIDIA GPU)."""
    if logits_CV.ndim != 2 or targets_C.shape != logits_CV.shape[:1] or weights_C.shape != targets_C.shape:
        raise ValueError(f"softmax_cross_entropy_rows: needs logits [C, V], targets [C], weights [C]; got "
                         f"{logits_CV.shape}, {targets_C.shape}, {weights_C.shape}")
    targets_C, weights_C = targets_C.astype(jnp.int32), weights_C.astype(jnp.float32)
    if resolve("softmax_cross_entropy_rows", backend, True, "", interpret, logits_CV) == "reference":
        return reference_softmax_cross_entropy_rows(logits_CV, targets_C, weights_C, grad_dtype)
    dlogits, loss = _call(logits_CV, targets_C, weights_C, jnp.dtype(grad_dtype), bool(interpret), LAUNCH)
    return loss, dlogits
