"""The MoE layer: route → dispatch → experts → combine (+ shared experts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import ep, parallel
from moe_jax.config import ModelConfig, capacity
from moe_jax.dispatch import LocalDispatcher
from moe_jax.experts import GroupedExperts
from moe_jax.layers import MLP, fan_in, param
from moe_jax.router import TopKRouter


class SharedExperts(nnx.Module):
    """Always-on experts (one MLP of `shared_expert_intermediate_size`), optionally sigmoid-gated."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.mlp = MLP(cfg, m.shared_expert_intermediate_size, rngs=rngs, activation=m.activation)
        self.gate_D = (param(rngs, (cfg.d_model,), ("embed",), cfg.init_std, cfg.param_dtype)
                       if m.shared_expert_gate else None)

    def __call__(self, x_TD: jax.Array) -> jax.Array:
        y = self.mlp(x_TD)
        if self.gate_D is not None:
            g = jax.nn.sigmoid(x_TD.astype(jnp.float32) @ self.gate_D[...].astype(jnp.float32))
            y = (y.astype(jnp.float32) * g[:, None]).astype(y.dtype)
        return y


def routed(dispatcher, x_TD: jax.Array, assignment, experts) -> tuple[jax.Array, jax.Array]:
    """dispatch → experts → combine: each token's gate-weighted sum of its experts' outputs, and the
    assignments the dispatcher dropped. Runs where the rows are: on one device, or on every device
    (and chunk) of the MoE mesh under expert parallelism."""
    if getattr(dispatcher, "recompute_rows", False):  # the rows made inside fc1 and again in its backward
        make, args, group_sizes, handle = dispatcher.dispatch_remade(x_TD, assignment)
        y_RD = experts.on_remade_rows(make, args, group_sizes)
    else:
        rows_RD, group_sizes, handle = dispatcher.dispatch(x_TD, assignment)
        y_RD = experts(rows_RD, group_sizes)
    return dispatcher.combine(y_RD, handle), handle.dropped


class MoELayer(nnx.Module):
    """Mixture-of-Experts feed-forward. `__call__(x[B,S,D], *, rng, layout) -> (y[B,S,D], aux)`; x may also be
    the `fanout` copies of a fan-out norm (router, dispatch, shared experts: `layers.fan_in`).

    `layout` (a `parallel.Layout`) runs the routed experts across its MoE mesh (`moe_jax.ep`); without
    one the layer runs on one device (and refuses an active multi-device mesh rather than ignore it).
    `aux` holds `losses` (scaled router losses), `tokens_per_expert` [E] (kept), `routed_counts` [E]
    (before dropping) and `dropped`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, experts_cls=GroupedExperts):
        self.cfg = cfg.moe
        self.dtype, self.kernels = jnp.dtype(cfg.dtype), cfg.fused_kernels
        self.router = TopKRouter(cfg, rngs=rngs)
        self.experts = experts_cls(cfg, rngs=rngs)
        self.shared = SharedExperts(cfg, rngs=rngs) if cfg.moe.shared_expert_intermediate_size else None
        self.fanout = 2 if self.shared is None else 3  # the input's consumers: router, dispatch (, shared)

    def __call__(self, x_BSD: jax.Array, *, rng: jax.Array | None = None,
                 layout: parallel.Layout | None = None):
        b, s, d = (x_BSD[0] if isinstance(x_BSD, tuple) else x_BSD).shape
        x_router, x_TD, *x_shared = fan_in(
            x_BSD, self.fanout, lambda x: parallel.pin_batch(x, layout).reshape(b * s, d).astype(self.dtype))
        routing = self.router(x_router, seq_len=s, rng=rng)
        if layout is not None and layout.num_devices > 1:
            y_TD, dropped = ep.run(routed, x_TD, routing.assignment, self.experts, self.cfg, layout)
        else:
            parallel.check_no_active_mesh("MoELayer")
            y_TD, dropped = routed(self.local_dispatcher(b * s), x_TD, routing.assignment, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_shared[0])
        aux = {"losses": routing.losses, "tokens_per_expert": routing.tokens_per_expert,
               "routed_counts": routing.routed_counts, "dropped": routing.dropped + dropped}
        return parallel.pin_batch(y_TD.reshape(b, s, d), layout), aux

    def local_dispatcher(self, tokens: int) -> LocalDispatcher:
        """The single-device dispatcher: a sort by expert, padded to capacity when asked."""
        cap = capacity(tokens, self.cfg) if self.cfg.pad_expert_input_to_capacity else None
        return LocalDispatcher(capacity=cap, probs_on_input=self.cfg.apply_probs_on_input, kernels=self.kernels,
                               recompute_rows=self.cfg.recompute_rows in (True, "auto"))
