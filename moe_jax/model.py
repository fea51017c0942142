"""GPT: token embedding, pre-norm blocks of causal GQA attention (RoPE) and a dense MLP or MoE layer
(per `moe.layer_freq`), final norm, LM head (tied or untied)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.layers import MLP, Norm, param
from moe_jax.moe import MoELayer


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [S, H] for rotate-half RoPE (the Llama / Hugging Face convention)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BSNH: jax.Array, cos_SH: jax.Array, sin_SH: jax.Array) -> jax.Array:
    h = x_BSNH.shape[-1] // 2
    xf = x_BSNH.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    out = xf * cos_SH[None, :, None, :] + rot * sin_SH[None, :, None, :]
    return out.astype(x_BSNH.dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention through `jax.nn.dot_product_attention` (cuDNN flash on GPU)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, kv, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq_DNH = param(rngs, (d, n, h), ("embed", "heads", None), std, pd)
        self.wk_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", None), std, pd)
        self.wv_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", None), std, pd)
        self.wo_NHD = param(rngs, (n, h, d), ("heads", None, "embed"), std, pd)
        self.dtype, self.impl = jnp.dtype(cfg.dtype), cfg.attention_impl
        zeros = lambda *shape, axes: nnx.Param(jnp.zeros(shape, pd), logical_axes=axes)  # noqa: E731
        self.bq_NH = zeros(n, h, axes=("heads", None)) if cfg.attention_bias else None
        self.bk_KH = zeros(kv, h, axes=("kv_heads", None)) if cfg.attention_bias else None
        self.bv_KH = zeros(kv, h, axes=("kv_heads", None)) if cfg.attention_bias else None
        self.q_norm = Norm(cfg, h) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, h) if cfg.qk_norm else None

    def _proj(self, x, w, b, norm):
        y = jnp.einsum("bsd,dnh->bsnh", x, w[...].astype(self.dtype))
        if b is not None:
            y = y + b[...].astype(self.dtype)[None, None]
        return y if norm is None else norm(y)

    def __call__(self, x_BSD: jax.Array, cos_SH: jax.Array, sin_SH: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x_BSD.astype(dt)
        q = apply_rope(self._proj(x, self.wq_DNH, self.bq_NH, self.q_norm), cos_SH, sin_SH)
        k = apply_rope(self._proj(x, self.wk_DKH, self.bk_KH, self.k_norm), cos_SH, sin_SH)
        v = self._proj(x, self.wv_DKH, self.bv_KH, None)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        return jnp.einsum("bsnh,nhd->bsd", o, self.wo_NHD[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm transformer block; the feed-forward is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoELayer(cfg, rngs=rngs) if self.is_moe else MLP(cfg, cfg.ffn_hidden_size, rngs=rngs)

    def __call__(self, x_BSD, cos_SH, sin_SH, rng=None, layout=None):
        x = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SH, sin_SH)
        h = self.mlp_norm(x)
        if self.is_moe:
            y, aux = self.mlp(h, rng=rng, layout=layout)
        else:
            y, aux = self.mlp(h), None
        return x + y.astype(x.dtype), aux


class GPT(nnx.Module):
    """Decoder-only LM. `__call__(tokens[B,S], *, rng, layout) -> (logits[B,S,V], aux)`; `layout`
    shards the MoE layers across its MoE mesh (see `MoELayer`).

    aux: `losses` (each router loss summed over MoE layers), and per MoE layer (stacked, [L_moe, ...]):
    `tokens_per_expert`, `routed_counts`, `dropped`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                              cfg.param_dtype)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, cfg.d_model)
        self.head_DV = (None if cfg.tie_embeddings else
                        param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                              cfg.param_dtype))

    def __call__(self, tokens_BS: jax.Array, *, rng: jax.Array | None = None, layout=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed_VD[...], tokens_BS, axis=0).astype(dt)
        cos, sin = rope_tables(tokens_BS.shape[1], cfg.head_dim_, cfg.rope_theta)
        layer_aux = []
        for i, block in enumerate(self.blocks):
            r = None if rng is None else jax.random.fold_in(rng, i)
            call = _remat_call if cfg.remat else type(block).__call__
            x, aux = call(block, x, cos, sin, r, layout=layout)
            if aux is not None:
                layer_aux.append(aux)
        x = self.final_norm(x)
        head = self.embed_VD[...].T if self.head_DV is None else self.head_DV[...]
        logits = x @ head.astype(dt)
        return logits, collect_aux(layer_aux)


def _remat_call(block, *args, layout=None):
    """block(*args) with its activations recomputed in the backward pass: a pure jax.checkpoint
    over the block's state. A block's forward mutates no state, so none is written back (nnx.remat
    writes every Variable back, and raised TraceContextError on an ExpertBias traced outside it)."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, *a: nnx.merge(graphdef, state)(*a, layout=layout))(state, *args)


def collect_aux(layer_aux: list[dict]) -> dict:
    """Sum router losses over layers; stack per-layer routing statistics."""
    if not layer_aux:
        return {"losses": {}}
    losses: dict[str, jax.Array] = {}
    for a in layer_aux:
        for name, v in a["losses"].items():
            losses[name] = losses.get(name, 0.0) + v
    out = {"losses": losses}
    for key in ("tokens_per_expert", "routed_counts", "dropped"):
        out[key] = jnp.stack([a[key] for a in layer_aux])
    return out
