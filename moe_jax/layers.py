"""Small building blocks shared by the dense and MoE parts: parameters, norms, activations, MLP."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from ops.gated_act import swiglu
from ops.pallas_triton import backend_args
from ops.rms_norm import rms_norm

GATED = ("swiglu", "geglu")


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    """A normal(0, std) parameter tagged with logical axis names (mapped to mesh axes in parallel.py)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)),
                     logical_axes=tuple(axes))


def n_in(activation: str) -> int:
    """Number of fc1 projections: 2 (gate, up) for gated activations, else 1."""
    return 2 if activation in GATED else 1


def activate(h_xnF: jax.Array, activation: str, kernels: str = "reference") -> jax.Array:
    """Apply the activation to fc1 output shaped [..., n_in, F] (gate first for gated units).
    `kernels` (ModelConfig.fused_kernels) picks SwiGLU's backend (ops.gated_act: a Pallas backward)."""
    if activation == "swiglu":
        if kernels == "reference":
            return jax.nn.silu(h_xnF[..., 0, :]) * h_xnF[..., 1, :]
        f = h_xnF.shape[-1]
        return swiglu(h_xnF.reshape(-1, 2, f), **backend_args(kernels)).reshape(h_xnF.shape[:-2] + (f,))
    if activation == "geglu":
        return jax.nn.gelu(h_xnF[..., 0, :], approximate=True) * h_xnF[..., 1, :]
    if activation == "gelu":
        return jax.nn.gelu(h_xnF[..., 0, :], approximate=True)
    if activation == "squared_relu":
        return jnp.square(jax.nn.relu(h_xnF[..., 0, :]))
    raise ValueError(f"unknown activation {activation!r}")


def fan_in(x, n: int, prep=lambda a: a) -> tuple:
    """A module's n inputs, one per consumer, each through `prep`: x itself n times (prepared once), or
    the n copies a fan-out norm made (`Norm(..)(x, fanout=n)`), so that each consumer's gradient reaches
    the norm apart."""
    if isinstance(x, tuple):
        if len(x) != n:
            raise ValueError(f"expected one input or a fan-out of {n} copies, got {len(x)}")
        return tuple(prep(a) for a in x)
    return (prep(x),) * n


class Norm(nnx.Module):
    """RMSNorm or LayerNorm (cfg.norm) over the last axis, computed in float32. RMSNorm goes through
    ops.rms_norm (Pallas kernels on NVIDIA GPUs per cfg.fused_kernels); LayerNorm is plain JAX."""

    def __init__(self, cfg: ModelConfig, dim: int):
        self.kind, self.eps, self.kernels = cfg.norm, cfg.norm_eps, cfg.fused_kernels
        self.fused_fanout = cfg.norm_fanout
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), logical_axes=("norm",))
        if cfg.norm == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), cfg.param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array, fanout: int = 1):
        """The norm of x. With cfg.norm_fanout and fanout=n > 1 (the consumers of the output), an RMSNorm
        returns a tuple of n copies and its backward kernel sums their gradients (ops.rms_norm); else the
        one array, which the consumers share (`fan_in`)."""
        if self.kind == "rmsnorm" and fanout > 1 and self.fused_fanout:
            return rms_norm(x, self.scale[...], self.eps, fanout=fanout, **backend_args(self.kernels))
        return self._norm(x)

    def _norm(self, x: jax.Array) -> jax.Array:
        if self.kind == "rmsnorm":
            return rms_norm(x, self.scale[...], self.eps, **backend_args(self.kernels))
        xf = x.astype(jnp.float32)
        xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        lead = (1,) * (x.ndim - 1)
        y = y * self.scale[...].astype(jnp.float32).reshape(lead + (-1,))
        return (y + self.bias[...].astype(jnp.float32).reshape(lead + (-1,))).astype(x.dtype)


class MLP(nnx.Module):
    """Dense feed-forward: fc1 [D, n_in, F] → activation → fc2 [F, D]."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs, activation: str | None = None,
                 axes=("embed", "mlp")):
        self.activation, self.kernels = activation or cfg.activation, cfg.fused_kernels
        self.dtype = jnp.dtype(cfg.dtype)
        d, f = cfg.d_model, hidden
        self.w1_DnF = param(rngs, (d, n_in(self.activation), f), (axes[0], None, axes[1]),
                            cfg.init_std, cfg.param_dtype)
        self.w2_FD = param(rngs, (f, d), (axes[1], axes[0]), cfg.init_std, cfg.param_dtype)

    def __call__(self, x_xD: jax.Array) -> jax.Array:
        x = x_xD.astype(self.dtype)
        h = jnp.einsum("...d,dnf->...nf", x, self.w1_DnF[...].astype(self.dtype))
        return activate(h, self.activation, self.kernels) @ self.w2_FD[...].astype(self.dtype)
