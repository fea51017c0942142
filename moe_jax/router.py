"""NNX TopKRouter: the router weight (and optional expert-bias state) around `routing.route`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.routing import Routing, route, router_dtype, update_expert_bias


class ExpertBias(nnx.Variable):
    """Per-expert selection bias for aux-loss-free balancing; state, not a trained Param."""


class TopKRouter(nnx.Module):
    """x[T,D] -> Routing over cfg.moe.num_experts experts (router math in the router dtype)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.moe is None:
            raise ValueError("ModelConfig.moe=None is invalid for TopKRouter: needs a MoEConfig")
        self.cfg = cfg.moe
        E = cfg.moe.num_experts
        init = jax.nn.initializers.normal(cfg.init_std)
        self.w_DE = nnx.Param(init(rngs.params(), (cfg.d_model, E), jnp.dtype(cfg.param_dtype)),
                              logical_axes=("embed", None))
        self.expert_bias = (ExpertBias(jnp.zeros((E,), jnp.float32))
                            if cfg.moe.router_enable_expert_bias else None)

    def logits(self, x_TD: jax.Array, rng=None) -> jax.Array:
        """Router logits [T,E] in the router dtype, with input jitter when `rng` is given."""
        dtype = router_dtype(self.cfg)
        x_TD = x_TD.astype(dtype)
        eps = self.cfg.input_jitter_eps
        if eps is not None and rng is not None:
            x_TD = x_TD * jax.random.uniform(rng, x_TD.shape, dtype, 1.0 - eps, 1.0 + eps)
        return jnp.dot(x_TD, self.w_DE[...].astype(dtype))

    def __call__(self, x_TD: jax.Array, *, seq_len=None, rng=None, axis_names=()) -> Routing:
        """Route tokens. `rng` enables input jitter and seeds router_force_load_balancing;
        `seq_len` is for seq_aux_loss, `axis_names` (shard_map data axes) for global_aux_loss."""
        jitter_key = force_key = None
        if rng is not None:
            jitter_key, force_key = jax.random.split(rng)
        bias = None if self.expert_bias is None else self.expert_bias[...]
        return route(self.logits(x_TD, jitter_key), self.cfg, expert_bias=bias, rng=force_key,
                     seq_len=seq_len, axis_names=axis_names)

    def update_bias(self, tokens_per_expert_E: jax.Array) -> None:
        """One aux-loss-free bias step from (e.g. step-summed) routed counts; no-op without bias."""
        if self.expert_bias is not None:
            self.expert_bias[...] = update_expert_bias(self.expert_bias[...], tokens_per_expert_E,
                                                       self.cfg.router_bias_update_rate)
