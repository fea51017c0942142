"""Rotary position embeddings: cos/sin tables (plain, linear-scaled, YaRN) and their application.

Convention: rotate-half (Llama / Hugging Face `rotate_half`): a head's rotary dims [r] are split in two
halves that rotate as pairs (i, i + r/2). DeepSeek's Hugging Face checkpoints rotate *interleaved* pairs
(2i, 2i+1) (`rope_interleave`); a converter permutes the rotary rows of their weights (even rows, then
odd rows) so that rotate-half here gives the same scores.

Scaling (`ModelConfig.rope_scaling`, a `RopeScalingConfig`; None = plain), numbers as transformers'
`ROPE_INIT_FUNCTIONS`: "linear" divides the inverse frequencies by `factor`; "yarn" blends interpolated
and extrapolated frequencies with a linear ramp between the correction dims of `beta_fast`/`beta_slow`
(truncated to integers) and multiplies cos/sin by the attention factor
`mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (or `mscale(factor)` when either is unset),
where mscale(s, m) = 0.1·m·ln(s) + 1 (1 for s <= 1). MLA also scales its softmax by
mscale(factor, mscale_all_dim)² (`softmax_scale`).

`apply_rope` is the plain formula (MLA and decoding use it); GQA attention goes through
`ops.rope_kernel.rope`, a Pallas kernel with this formula as its reference (`ModelConfig.fused_kernels`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig, RopeScalingConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_factor(dim: int, theta: float, scaling: RopeScalingConfig | None
                        ) -> tuple[jax.Array, float]:
    """Inverse frequencies [dim/2] (float32) and the factor cos/sin are multiplied by."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    s = scaling
    if s.mscale and s.mscale_all_dim:
        attn_factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, attn_factor


def rope_tables(seq_len: int, head_dim: int, theta: float,
                scaling: RopeScalingConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin [S, H] for rotate-half RoPE over `head_dim` rotary dims, positions 0..S-1."""
    inv_freq, factor = inv_freq_and_factor(head_dim, theta, scaling)
    ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang) * factor, jnp.sin(ang) * factor


def model_rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """The tables a model's attention takes: over `cfg.rope_dim` dims, with `cfg.rope_scaling`."""
    return rope_tables(seq_len, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)


def softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)² under YaRN with `mscale_all_dim`
    (DeepSeek's MLA; transformers' `yarn_apply_mscale`)."""
    scale = qk_head_dim ** -0.5
    s = cfg.rope_scaling
    if s is not None and s.type == "yarn" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def apply_rope(x_BSNH: jax.Array, cos_SH: jax.Array, sin_SH: jax.Array) -> jax.Array:
    """x rotated by position (rotate-half), computed in float32, returned in x's dtype."""
    h = x_BSNH.shape[-1] // 2
    xf = x_BSNH.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    out = xf * cos_SH[None, :, None, :] + rot * sin_SH[None, :, None, :]
    return out.astype(x_BSNH.dtype)
