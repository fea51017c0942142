"""The MoE layer: route → dispatch → experts → combine (+ shared experts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, ep_dispatch, parallel
from moe_jax.config import ModelConfig, capacity
from moe_jax.experts import GroupedExperts
from moe_jax.layers import MLP, param
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


class MoELayer(nnx.Module):
    """Mixture-of-Experts feed-forward. `__call__(x[B,S,D]) -> (y[B,S,D], aux)`.

    `aux` holds `losses` (scaled router losses), `tokens_per_expert` [E] (kept),
    `routed_counts` [E] (before dropping) and `dropped`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, experts_cls=GroupedExperts):
        self.cfg = cfg.moe
        self.dtype = jnp.dtype(cfg.dtype)
        self.router = TopKRouter(cfg, rngs=rngs)
        self.experts = experts_cls(cfg, rngs=rngs)
        self.shared = SharedExperts(cfg, rngs=rngs) if cfg.moe.shared_expert_intermediate_size else None

    def __call__(self, x_BSD: jax.Array, *, rng: jax.Array | None = None):
        b, s, d = x_BSD.shape
        x_BSD = parallel.pin_batch(x_BSD)  # no-op without a mesh
        x_TD = x_BSD.reshape(b * s, d).astype(self.dtype)
        routing = self.router(x_TD, seq_len=s, rng=rng)
        y_TD, ep_dropped = self.routed_experts(x_TD, routing)  # dispatch → experts → combine

        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        aux = {"losses": routing.losses, "tokens_per_expert": routing.tokens_per_expert,
               "routed_counts": routing.routed_counts, "dropped": routing.dropped + ep_dropped}
        return parallel.pin_batch(y_TD.reshape(b, s, d)), aux

    def routed_experts(self, x_TD: jax.Array, routing) -> tuple[jax.Array, jax.Array]:
        """Weighted sum of the chosen experts' outputs per token, and the assignments dropped on the
        way (beyond the router's own): a local permute on one device, else the EP dispatcher
        (`token_dispatcher_type`) over the `expert` mesh axis."""
        layout = parallel.current_layout()
        if layout is not None and layout.num_devices > 1:
            return ep_dispatch.moe_ffn(x_TD, routing, *self.experts.weights(), layout, self.cfg)
        cap = capacity(x_TD.shape[0], self.cfg) if self.cfg.pad_expert_input_to_capacity else None
        x_ND, perm = dispatch.permute(x_TD, routing, capacity=cap)
        if self.cfg.apply_probs_on_input:
            x_ND = (x_ND * dispatch.sorted_weights(routing, perm)[:, None]).astype(self.dtype)
        y_ND = self.experts(x_ND, perm.group_sizes)
        y_TD = dispatch.unpermute(y_ND, perm, routing, apply_weights=not self.cfg.apply_probs_on_input)
        return y_TD, jnp.zeros((), jnp.int32)
