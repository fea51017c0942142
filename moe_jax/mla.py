"""Multi-head latent attention (MLA, DeepSeek-V2/V3), causal, with decoupled RoPE.

Field meanings as Hugging Face's `DeepseekV3Attention` and Megatron's MLA:

    q      = x·wq (q_lora_rank None)  or  norm(x·wq_a)·wq_b          [B,S,N,Z+Y]: per head (nope, rope)
    c_kv   = norm(x·wkv_a)                                           [B,S,C]  the compressed latent
    k_rope = RoPE(x·wk_rope)                                         [B,S,Y]  one rotary key for every head
    k      = (c_kv·wk_b, k_rope)   v = c_kv·wv_b                     [B,S,N,Z+Y], [B,S,N,U]
    out    = softmax(q·k^T·scale + causal)·v ·wo                      scale: `rope.softmax_scale`

RoPE is rotate-half on the Y rotary dims (`moe_jax.rope`: a converter from DeepSeek's interleaved
checkpoints permutes the rotary rows of wq/wq_b and wk_rope). HF's `kv_a_proj_with_mqa` is
(wkv_a, wk_rope) stacked; its `kv_b_proj` is (wk_b, wv_b) per head.

Kernel: `jax.nn.dot_product_attention` (cuDNN flash where `attention.resolve_impl` allows, XLA elsewhere).
Its shape checks take one head dim for q, k and v (cuDNN >= 9.10 itself runs q/k != v dims on Hopper,
but only JAX's private cuDNN module exposes that), so v is zero-padded to the q/k head dim Z+Y and the
output's padding sliced off: DeepSeek's 192/128 dims cost p·v FLOPs for 192 (if v_head_dim were
larger, q and k are zero-padded instead: zeros add nothing to the scores). The training path expands
the latent to per-head keys and values (no weight absorption; that is an inference optimisation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moe_jax.attention import resolve_impl
from moe_jax.config import ModelConfig
from moe_jax.layers import Norm, param
from moe_jax.rope import apply_rope, softmax_scale


def _pad_last(x: jax.Array, to: int) -> jax.Array:
    extra = to - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class MLAttention(nnx.Module):
    """Causal multi-head latent attention; `__call__(x[B,S,D], cos[S,Y], sin[S,Y]) -> [B,S,D]` (the
    signature of `attention.Attention`, with tables over the qk_rope_head_dim rotary dims)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, std, pd = cfg.d_model, cfg.num_heads, cfg.init_std, cfg.param_dtype
        z, y, u, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.nope, self.scale = z, softmax_scale(cfg, z + y)
        if cfg.q_lora_rank is None:
            self.wq_DNH = param(rngs, (d, n, z + y), ("embed", "heads", None), std, pd)
            self.wq_a_DQ = self.q_norm = self.wq_b_QNH = None
        else:
            q = cfg.q_lora_rank
            self.wq_DNH = None
            self.wq_a_DQ = param(rngs, (d, q), ("embed", "q_lora"), std, pd)
            self.q_norm = Norm(cfg, q)
            self.wq_b_QNH = param(rngs, (q, n, z + y), ("q_lora", "heads", None), std, pd)
        self.wkv_a_DC = param(rngs, (d, c), ("embed", "kv_lora"), std, pd)
        self.kv_norm = Norm(cfg, c)
        self.wk_rope_DY = param(rngs, (d, y), ("embed", None), std, pd)
        self.wk_b_CNZ = param(rngs, (c, n, z), ("kv_lora", "heads", None), std, pd)
        self.wv_b_CNU = param(rngs, (c, n, u), ("kv_lora", "heads", None), std, pd)
        self.wo_NUD = param(rngs, (n, u, d), ("heads", None, "embed"), std, pd)
        self.dtype, self.impl = jnp.dtype(cfg.dtype), cfg.attention_impl

    def _w(self, p) -> jax.Array:
        return p[...].astype(self.dtype)

    def qkv(self, x_BSD: jax.Array, cos_SY: jax.Array, sin_SY: jax.Array):
        """q, k [B,S,N,Z+Y] (RoPE applied to the last Y dims) and v [B,S,N,U]."""
        x = x_BSD.astype(self.dtype)
        if self.wq_DNH is not None:
            q = jnp.einsum("bsd,dnh->bsnh", x, self._w(self.wq_DNH))
        else:
            q_lat = self.q_norm(x @ self._w(self.wq_a_DQ))
            q = jnp.einsum("bsq,qnh->bsnh", q_lat, self._w(self.wq_b_QNH))
        q = jnp.concatenate([q[..., :self.nope], apply_rope(q[..., self.nope:], cos_SY, sin_SY)], axis=-1)
        c_kv = self.kv_norm(x @ self._w(self.wkv_a_DC))
        k_rope = apply_rope((x @ self._w(self.wk_rope_DY))[:, :, None, :], cos_SY, sin_SY)
        k_nope = jnp.einsum("bsc,cnz->bsnz", c_kv, self._w(self.wk_b_CNZ))
        k_rope = jnp.broadcast_to(k_rope, k_nope.shape[:3] + k_rope.shape[3:])
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        v = jnp.einsum("bsc,cnu->bsnu", c_kv, self._w(self.wv_b_CNU))
        return q, k, v

    def __call__(self, x_BSD: jax.Array, cos_SY: jax.Array, sin_SY: jax.Array) -> jax.Array:
        q, k, v = self.qkv(x_BSD, cos_SY, sin_SY)
        u, h = v.shape[-1], max(q.shape[-1], v.shape[-1])
        impl = resolve_impl(self.impl, q.dtype, (h,))
        o = jax.nn.dot_product_attention(_pad_last(q, h), _pad_last(k, h), _pad_last(v, h),
                                         scale=self.scale, is_causal=True, implementation=impl)
        return self.out(checkpoint_name(o[..., :u], "attn_out"))

    def out(self, o_BSNU: jax.Array) -> jax.Array:
        """The output projection of the heads' attention outputs [B,S,N,U] -> [B,S,D]."""
        return jnp.einsum("bsnu,nud->bsd", o_BSNU.astype(self.dtype), self._w(self.wo_NUD))
