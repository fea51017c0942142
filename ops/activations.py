"""Gated activations (SwiGLU, GeGLU) of an fc1 output [..., 2, F] (gate first), with a backward that
writes d[..., 2, F] in one pass.

  gated(h_xnF, kind) = act(h[..., 0, :]) * h[..., 1, :]     act = silu ("swiglu") | gelu-tanh ("geglu")

Autodiff of the plain formula transposes the two slices of h into two zero-padded [..., 2, F]
cotangents and adds them: three full-size passes over the largest activation of an MoE layer
(measured on an H200, mixtral_small: 0.6 ms per layer). The custom VJP computes both halves of the
gradient from (dy, h) and writes them together. Computed in float32, returned in h's dtype.
Backends: "xla" (the custom VJP), "reference" (the formula, autodiff), "auto" (= "xla").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KINDS = ("swiglu", "geglu")
BACKENDS = ("auto", "xla", "reference")


def _act(g, kind):
    return jax.nn.silu(g) if kind == "swiglu" else jax.nn.gelu(g, approximate=True)


def reference_gated(h_xnF, kind: str):
    g, u = h_xnF[..., 0, :].astype(jnp.float32), h_xnF[..., 1, :].astype(jnp.float32)
    return (_act(g, kind) * u).astype(h_xnF.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gated(h_xnF, kind):
    return reference_gated(h_xnF, kind)


def _gated_fwd(h_xnF, kind):
    return _gated(h_xnF, kind), h_xnF


def _gated_bwd(kind, h_xnF, dy):
    g, u = h_xnF[..., 0, :].astype(jnp.float32), h_xnF[..., 1, :].astype(jnp.float32)
    a, da_dg = jax.jvp(lambda g: _act(g, kind), (g,), (jnp.ones_like(g),))
    dy = dy.astype(jnp.float32)
    return (jnp.stack([dy * u * da_dg, dy * a], axis=-2).astype(h_xnF.dtype),)


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated(h_xnF, kind: str, *, backend: str = "auto"):
    """act(gate) * up of h [..., 2, F]; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"gated: kind={kind!r} is invalid: one of {list(KINDS)}")
    if backend not in BACKENDS:
        raise ValueError(f"gated: backend={backend!r} is invalid: one of {list(BACKENDS)}")
    if h_xnF.ndim < 2 or h_xnF.shape[-2] != 2:
        raise ValueError(f"gated: h must be [..., 2, F] (gate, up), got {h_xnF.shape}")
    return reference_gated(h_xnF, kind) if backend == "reference" else _gated(h_xnF, kind)
