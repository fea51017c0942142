"""Multi-token prediction (DeepSeek-V3; Megatron `--mtp-num-layers`): `ModelConfig.mtp_num_layers` = D
sequential modules after the main model; module k (1..D) predicts token i+k+1 at position i.

From the previous hidden state h^{k-1} [B,S,D] (k = 1: the main model's last layer output, before its
final norm) and the embedding of token i+k (the main model's embedding):

    h^k    = Block( [enorm(embed(t_{i+k})); hnorm(h^{k-1}_i)] · eh_proj )   eh_proj [2D → D], one block
    loss_k = CE( final_norm_k(h^k_i) · head, t_{i+k+1} )   over positions i < S-k (the last k masked)

The block is a `model.Block` (MoE when the model's last layer is, as in DeepSeek-V3); the LM head is
the main model's; each module has its own final norm (DeepSeek's `shared_head.norm`). `eh_proj_nDD`
[2, D, D] holds the embedding's rows ([0]) and the hidden state's ([1]): Hugging Face's
`eh_proj.weight` [D, 2D] is their concatenation, transposed. The training loss adds
mtp_loss_scaling_factor · mean_k loss_k (`mtp_loss`); `GPT.__call__` (inference) does not run them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import ops

from moe_jax.config import ModelConfig
from moe_jax.layers import Norm, param
from moe_jax.rope import model_rope_tables


class MTPModule(nnx.Module):
    """One MTP module around `block` (a `model.Block`): `__call__(h[B,S,D], e[B,S,D], cos, sin, rng,
    layout) -> (h_next[B,S,D], normed[B,S,D], block aux)`; e is the embedding of the shifted tokens."""

    def __init__(self, cfg: ModelConfig, block: nnx.Module, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.enorm, self.hnorm, self.final_norm = Norm(cfg, d), Norm(cfg, d), Norm(cfg, d)
        self.eh_proj_nDD = param(rngs, (2, d, d), (None, "embed", None), cfg.init_std, cfg.param_dtype)
        self.block = block
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, h_BSD, e_BSD, cos, sin, rng=None, layout=None):
        w = self.eh_proj_nDD[...].astype(self.dtype)
        x = self.enorm(e_BSD.astype(self.dtype)) @ w[0] + self.hnorm(h_BSD.astype(self.dtype)) @ w[1]
        x, aux = self.block(x, cos, sin, rng, layout=layout)
        return x, self.final_norm(x), aux


def shifted_targets(targets_BS: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Module k's labels t_{i+k+1} = targets[i+k] (rolled left by k) and its mask [B,S] (0 on the last k
    positions, whose labels wrap around)."""
    s = targets_BS.shape[1]
    mask = (jnp.arange(s) < s - k).astype(jnp.float32)
    return jnp.roll(targets_BS, -k, axis=1), jnp.broadcast_to(mask[None, :], targets_BS.shape)


def mtp_loss(model, h_BSD: jax.Array, targets_BS: jax.Array, *, rng: jax.Array | None = None,
             layout=None, remat=None) -> tuple[jax.Array, dict]:
    """Mean over the model's MTP modules of their masked cross-entropies (not yet scaled by
    `mtp_loss_scaling_factor`), and aux: `losses` (the modules' router losses, summed) and, when the
    blocks are MoE, `routed_counts` / `tokens_per_expert` [D, E]. `h_BSD`: the main model's last layer
    output (before its final norm); `targets_BS`: the main model's targets (inputs shifted by one).
    `remat`: None, or a wrapper of each module's call (`jax.checkpoint` with the model's policy)."""
    cfg = model.cfg
    cos, sin = model_rope_tables(cfg, h_BSD.shape[1])
    head, embed = model.head(), model.embed_VD[...]
    losses, router_losses, counts, kept = [], {}, [], []
    h = h_BSD
    for k, module in enumerate(model.mtp, start=1):
        e = jnp.take(embed, jnp.roll(targets_BS, 1 - k, axis=1), axis=0)  # t_{i+k} = targets[i+k-1]
        r = None if rng is None else jax.random.fold_in(rng, cfg.num_layers + k)
        graphdef, state = nnx.split(module)

        def call(state, h, e, r, graphdef=graphdef):
            return nnx.merge(graphdef, state)(h, e, cos, sin, r, layout)

        h, normed, aux = (call if remat is None else remat(call))(state, h, e, r)
        labels, mask = shifted_targets(targets_BS, k)
        losses.append(ops.linear_cross_entropy(normed.reshape(-1, normed.shape[-1]), head,
                                               labels.reshape(-1), mask.reshape(-1), kernels=cfg.fused_kernels))
        if aux is not None:
            for name, v in aux["losses"].items():
                router_losses[name] = router_losses.get(name, 0.0) + jnp.sum(v)
            counts.append(aux["routed_counts"])
            kept.append(aux["tokens_per_expert"])
    out = {"losses": router_losses}
    if counts:
        out.update(routed_counts=jnp.stack(counts), tokens_per_expert=jnp.stack(kept))
    return jnp.mean(jnp.stack(losses)), out
