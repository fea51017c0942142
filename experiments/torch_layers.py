"""Building blocks of the PyTorch reference (experiments/torch_reference.py), with moe_jax's math:
parameter init, RMSNorm (fp32), rotate-half RoPE, SwiGLU, causal GQA attention (SDPA), dense MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Init:
    """Creates normal(0, std) parameters on one device and dtype (meta: shapes only)."""

    def __init__(self, device, dtype, std):
        self.device, self.dtype, self.std = device, dtype, std

    def __call__(self, *shape) -> nn.Parameter:
        if self.device == "meta":
            return nn.Parameter(torch.empty(shape, device="meta", dtype=self.dtype))
        w = torch.randn(shape, device=self.device, dtype=torch.float32) * self.std
        return nn.Parameter(w.to(self.dtype))

    def ones(self, n) -> nn.Parameter:
        return nn.Parameter(torch.ones(n, device=self.device, dtype=self.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, init: Init):
        super().__init__()
        self.scale, self.eps = init.ones(dim), eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale.float()
        return y.to(x.dtype)


def rope_tables(seq, head_dim, theta, device):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):  # x [B, S, N, H], rotate-half, in fp32
    h, xf = x.shape[-1] // 2, x.float()
    rot = torch.cat([-xf[..., h:], xf[..., :h]], dim=-1)
    return (xf * cos[:, None, :] + rot * sin[:, None, :]).to(x.dtype)


def swiglu(h):
    f = h.shape[-1] // 2
    return F.silu(h[..., :f]) * h[..., f:]


class Attention(nn.Module):
    def __init__(self, m, init: Init):
        super().__init__()
        d, self.n, self.kv = m["d_model"], m["num_heads"], m["num_kv_heads"]
        self.h = m["head_dim"] or d // self.n
        self.wq, self.wk, self.wv = init(d, self.n * self.h), init(d, self.kv * self.h), init(d, self.kv * self.h)
        self.wo = init(self.n * self.h, d)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = apply_rope((x @ self.wq).view(b, s, self.n, self.h), cos, sin).transpose(1, 2)
        k = apply_rope((x @ self.wk).view(b, s, self.kv, self.h), cos, sin).transpose(1, 2)
        v = (x @ self.wv).view(b, s, self.kv, self.h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.n)
        return o.transpose(1, 2).reshape(b, s, self.n * self.h) @ self.wo


class MLP(nn.Module):
    """Dense SwiGLU: w1 [D, 2F] (gate | up, as moe_jax's [D, 2, F]), w2 [F, D]."""

    def __init__(self, d, f, init: Init):
        super().__init__()
        self.w1, self.w2 = init(d, 2 * f), init(f, d)

    def forward(self, x):
        return swiglu(x @ self.w1) @ self.w2
