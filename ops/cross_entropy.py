"""Mean token cross-entropy of a linear LM head, without the [T, V] float32 logits in memory.

`linear_cross_entropy(x_TD, w_DV, targets_T)` = mean_t( logsumexp(x_t @ w) − (x_t @ w)[target_t] );
with `weights_T` (e.g. a 0/1 mask) the weighted mean Σ_t w_t·loss_t / Σ_t w_t.

The plain form materialises logits [T, V] (bf16 from the matmul, then float32 for the softmax; at
T=16384, V=32000 that is 1 GiB + 2 GiB, and the same again for their gradient). Here the tokens go
through in chunks of C rows (`jax.lax.scan`): each chunk's logits [C, V] are made, reduced to the loss,
and turned at once into the chunk's gradients — dx_c = softmax'·w^T and dw += x_c^T·softmax' — since
the loss is the end of the graph and its cotangent is a scalar (the backward pass only scales them).
The FLOPs are the plain form's (one logits matmul, two gradient matmuls); peak memory is one
chunk's logits. Backends: "chunked" (that), "reference" (plain, autodiff), "auto" (= "chunked").
Each chunk's softmax, loss and logit gradient is `ops.softmax_ce.softmax_cross_entropy_rows` (`kernels`:
its backend, as `ModelConfig.fused_kernels`; on one NVIDIA GPU a kernel that reads each row of the
float32 logits twice, where XLA's fusions take three passes).
Under a mesh with the vocabulary split over `tensor`, XLA partitions the chunk matmuls and the
logsumexp reduction (vocab-parallel) like any other op.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.pallas_triton import backend_args
from ops.softmax_ce import softmax_cross_entropy_rows

BACKENDS = ("auto", "chunked", "reference")
CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk


def reference_linear_cross_entropy(x_TD, w_DV, targets_T, weights_T=None):
    logits = jnp.dot(x_TD, w_DV, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_T[:, None], axis=-1)[:, 0]
    if weights_T is None:
        return jnp.mean(lse - gold)
    return jnp.sum(weights_T * (lse - gold)) / jnp.sum(weights_T)


def chunk_rows(t: int, v: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The largest divisor of t whose float32 logits [C, V] fit `chunk_bytes` (at least 1)."""
    target = max(1, chunk_bytes // (4 * v))
    return max(c for c in range(1, min(t, target) + 1) if t % c == 0) if target < t else t


def _chunks(x_TD, targets_T, weights_T, c):
    t = x_TD.shape[0]
    return x_TD.reshape(t // c, c, -1), targets_T.reshape(t // c, c), weights_T.reshape(t // c, c)


def _loss_and_grads(x_TD, w_DV, targets_T, weights_T, c, kernels):
    """(weighted sum of token losses, dx [T, D], dw [D, V] float32) — gradients of the sum."""
    xs, ts, ws = _chunks(x_TD, targets_T, weights_T, c)

    def body(dw, xtw):
        x, tg, wt = xtw
        logits = jnp.dot(x, w_DV, preferred_element_type=jnp.float32)          # [C, V]
        loss, dlogits = softmax_cross_entropy_rows(logits, tg, wt, x.dtype, **backend_args(kernels))
        dx = jnp.dot(dlogits, w_DV.T, preferred_element_type=jnp.float32).astype(x.dtype)
        dw = dw + jnp.dot(x.T, dlogits, preferred_element_type=jnp.float32)
        return dw, (jnp.sum(loss), dx)

    dw0 = jnp.zeros(w_DV.shape, jnp.float32)
    dw, (losses, dx) = jax.lax.scan(body, dw0, (xs, ts, ws))
    return jnp.sum(losses), dx.reshape(x_TD.shape), dw


def _loss_only(x_TD, w_DV, targets_T, weights_T, c):
    xs, ts, ws = _chunks(x_TD, targets_T, weights_T, c)

    def body(total, xtw):
        x, tg, wt = xtw
        logits = jnp.dot(x, w_DV, preferred_element_type=jnp.float32)
        gold = jnp.take_along_axis(logits, tg[:, None], axis=-1)[:, 0]
        return total + jnp.sum(wt * (jax.nn.logsumexp(logits, axis=-1) - gold)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ts, ws))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(x_TD, w_DV, targets_T, weights_T, c, kernels):
    return _loss_only(x_TD, w_DV, targets_T, weights_T, c) / jnp.sum(weights_T)


def _chunked_fwd(x_TD, w_DV, targets_T, weights_T, c, kernels):
    total, dx, dw = _loss_and_grads(x_TD, w_DV, targets_T, weights_T, c, kernels)
    den = jnp.sum(weights_T)
    return total / den, (dx, dw.astype(w_DV.dtype), den)


def _chunked_bwd(c, kernels, res, g):
    dx, dw, den = res
    scale = g / den
    return (dx * scale.astype(dx.dtype)).astype(dx.dtype), (dw * scale.astype(dw.dtype)), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def linear_cross_entropy(x_TD, w_DV, targets_T, weights_T=None, *, backend: str = "auto",
                         chunk: int | None = None, kernels: str = "auto") -> jax.Array:
    """Mean over T of the cross-entropy of logits x_TD @ w_DV against targets_T (float32 scalar);
    with `weights_T` [T] (not differentiated; e.g. a 0/1 mask) the weighted mean. `chunk`: rows per
    chunk (must divide T; default from `CHUNK_BYTES`). `kernels` (`ModelConfig.fused_kernels`: auto,
    pallas, reference, interpret): the backend of each chunk's softmax and gradient (ops.softmax_ce)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend={backend!r} is invalid: one of {list(BACKENDS)}")
    if x_TD.ndim != 2 or w_DV.ndim != 2 or targets_T.shape != x_TD.shape[:1]:
        raise ValueError(f"linear_cross_entropy: needs x [T, D], w [D, V], targets [T]; got "
                         f"{x_TD.shape}, {w_DV.shape}, {targets_T.shape}")
    if x_TD.shape[1] != w_DV.shape[0]:
        raise ValueError(f"linear_cross_entropy: x has D={x_TD.shape[1]} but w has {w_DV.shape[0]} rows")
    if weights_T is not None and weights_T.shape != targets_T.shape:
        raise ValueError(f"linear_cross_entropy: weights must be [T] like targets; got {weights_T.shape}")
    targets_T = targets_T.astype(jnp.int32)
    if backend == "reference":
        return reference_linear_cross_entropy(x_TD, w_DV, targets_T, weights_T)
    c = chunk or chunk_rows(x_TD.shape[0], w_DV.shape[1])
    if x_TD.shape[0] % c:
        raise ValueError(f"linear_cross_entropy: chunk={c} must divide T={x_TD.shape[0]}")
    weights_T = (jnp.ones(targets_T.shape, jnp.float32) if weights_T is None
                 else jax.lax.stop_gradient(weights_T.astype(jnp.float32)))
    return _chunked(x_TD, w_DV, targets_T, weights_T, c, kernels)
