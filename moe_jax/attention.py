"""Causal grouped-query attention with rotary position embeddings, and the choice of its kernel.

`ModelConfig.attention_impl`: "cudnn" (cuDNN flash attention through `jax.nn.dot_product_attention`:
never materialises the [S, S] scores), "xla" (XLA's einsum + softmax: scores in HBM), or "auto" (the
default): cuDNN where it runs — an NVIDIA GPU of compute capability >= 8.0, bf16/fp16 activations,
head dims that are multiples of 8 up to 128 (256 on Hopper) — else XLA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moe_jax.config import ModelConfig
from moe_jax.layers import Norm, fan_in, param
from moe_jax.rope import apply_rope, rope_tables  # noqa: F401  (re-exported; they live in moe_jax.rope)
from ops.pallas_triton import backend_args
from ops.rope_kernel import rope, rope_qkv, takes_qkv

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _compute_capability(device) -> tuple[int, ...]:
    cc = getattr(device, "compute_capability", None)
    try:
        return tuple(int(x) for x in str(cc).split("."))
    except ValueError:
        return (0,)


def resolve_impl(impl: str, dtype, head_dims: tuple[int, ...], device=None) -> str:
    """The attention kernel `impl` ("auto" | "cudnn" | "xla") means for activations of `dtype` and
    these head dims on `device` (default: the first device)."""
    if impl != "auto":
        return impl
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return "xla"
    cc = _compute_capability(device)  # CUDA's "9.0"; other GPUs' do not parse: (0,)
    h_max = 256 if cc >= (9,) else 128
    ok = (cc >= (8,) and jnp.dtype(dtype) in CUDNN_DTYPES
          and all(h % 8 == 0 and h <= h_max for h in head_dims))
    return "cudnn" if ok else "xla"


class Attention(nnx.Module):
    """Causal grouped-query attention (optional q/k/v biases and q/k RMSNorm), RoPE on q and k. The input
    is x [B,S,D] or the three copies (for q, k, v) of a fan-out norm (`fanout`)."""

    fanout = 3  # consumers of the input: the q, k and v projections

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, kv, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq_DNH = param(rngs, (d, n, h), ("embed", "heads", None), std, pd)
        self.wk_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", None), std, pd)
        self.wv_DKH = param(rngs, (d, kv, h), ("embed", "kv_heads", None), std, pd)
        self.wo_NHD = param(rngs, (n, h, d), ("heads", None, "embed"), std, pd)
        self.dtype, self.impl, self.kernels = jnp.dtype(cfg.dtype), cfg.attention_impl, cfg.fused_kernels
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

    def qkv(self, x_BSD: jax.Array, cos_SH: jax.Array, sin_SH: jax.Array):
        """q [B,S,N,H], k and v [B,S,K,H] in the compute dtype, RoPE applied to q and k (the
        positions are those of `cos_SH`/`sin_SH`; a KV-cache decode passes its slice of them).
        Where the RoPE kernels run and the projections have no biases or norms, one merged projection
        [B,S,N+2K,H] feeds `ops.rope_kernel.rope_qkv` (no slice of q, k, v out of a merged GEMM, no
        concatenate of their gradients); else three projections and `rope` on q and k."""
        kernels = backend_args(self.kernels)
        n, kv, h = self.wq_DNH.shape[1], self.wk_DKH.shape[1], self.wq_DNH.shape[2]
        merged_shape = (*x_BSD.shape[:2], n + 2 * kv, h) if not isinstance(x_BSD, tuple) else None
        if (merged_shape and self.bq_NH is None and self.q_norm is None
                and takes_qkv(merged_shape, cos_SH.shape, kv, x=x_BSD, **kernels)):
            w = jnp.concatenate([w[...].astype(self.dtype) for w in (self.wq_DNH, self.wk_DKH, self.wv_DKH)],
                                axis=1)
            y = jnp.einsum("bsd,dch->bsch", x_BSD.astype(self.dtype), w)
            return rope_qkv(y, cos_SH, sin_SH, num_kv=kv, **kernels)
        xq, xk, xv = fan_in(x_BSD, self.fanout, lambda x: x.astype(self.dtype))
        q = rope(self._proj(xq, self.wq_DNH, self.bq_NH, self.q_norm), cos_SH, sin_SH, **kernels)
        k = rope(self._proj(xk, self.wk_DKH, self.bk_KH, self.k_norm), cos_SH, sin_SH, **kernels)
        return q, k, self._proj(xv, self.wv_DKH, self.bv_KH, None)

    def out(self, o_BSNH: jax.Array) -> jax.Array:
        """The output projection of attention values [B,S,N,H] -> [B,S,D]."""
        return jnp.einsum("bsnh,nhd->bsd", o_BSNH, self.wo_NHD[...].astype(self.dtype))

    def __call__(self, x_BSD: jax.Array, cos_SH: jax.Array, sin_SH: jax.Array) -> jax.Array:
        q, k, v = self.qkv(x_BSD, cos_SH, sin_SH)
        impl = resolve_impl(self.impl, q.dtype, (q.shape[-1], v.shape[-1]))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return self.out(checkpoint_name(o, "attn_out"))
