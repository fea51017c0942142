"""DeepSeek-V3's attention (MLA) and multi-token prediction (MTP) for the PyTorch reference
(experiments/torch_reference.py), with the math of moe_jax/mla.py and moe_jax/mtp.py.

MLA (N heads; Z = qk_nope_head_dim, Y = qk_rope_head_dim, U = v_head_dim, Q/C = the q/kv latent ranks):

    q      = x·wq  (q_lora_rank None)  or  q_norm(x·wq_a)·wq_b        [B,S,N,Z+Y]: per head (nope, rope)
    c_kv   = kv_norm(x·wkv_a)                                         [B,S,C]
    k_rope = RoPE(x·wk_rope)                                          [B,S,1,Y]  shared by every head
    k      = (c_kv·wk_b, k_rope)    v = c_kv·wv_b                     [B,S,N,Z+Y], [B,S,N,U]
    out    = softmax(q·kᵀ/√(Z+Y) + causal)·v · wo

Weights are 2-D, moe_jax's reshaped: wq [D, N·(Z+Y)] or wq_a [D, Q] and wq_b [Q, N·(Z+Y)], wkv_a [D, C],
wk_rope [D, Y], wk_b [C, N·Z], wv_b [C, N·U], wo [N·U, D]. RoPE is rotate-half over the Y rotary dims.

MTP module k (1..D) predicts token i+k+1 at position i from the previous hidden state h (k = 1: the
main model's last layer output, before its final norm) and the embedding of token i+k:

    h_k    = Block( [enorm(embed(t_{i+k})) ; hnorm(h_{k-1})] · eh_proj )      eh_proj [2D, D]
    loss_k = CE( final_norm_k(h_k) · head, t_{i+k+1} ) over positions i < S-k

eh_proj's rows [0:D] act on the embedding, [D:2D] on the hidden state (moe_jax's eh_proj_nDD [2, D, D]
flattened). The block is a torch_reference Block (MoE when the main model's last layer is); embedding
and LM head are the main model's. The training loss adds mtp_loss_scaling_factor · mean_k loss_k, and
the blocks' router losses unscaled (moe_jax.train).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_layers import Init, RMSNorm, apply_rope


class MLAttention(nn.Module):
    """Causal multi-head latent attention: forward(x [B,S,D], cos [S,Y], sin [S,Y]) -> [B,S,D].

    SDPA: torch's flash kernel needs one head dim for q, k and v (its check_head_dim_size_flash), so v
    is zero-padded to the q/k dim Z+Y (DeepSeek: 128 -> 192) and the output's padding sliced off, as
    moe_jax's MLA does for cuDNN (if U were the larger, q and k are padded instead: zeros add nothing
    to the scores). The scale is passed explicitly: 1/√(Z+Y), whatever the padded dim."""

    def __init__(self, m, init: Init):
        super().__init__()
        d, self.n, eps = m["d_model"], m["num_heads"], m["norm_eps"]
        self.z, self.y, self.u = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        c, qr, qk = m["kv_lora_rank"], m["q_lora_rank"], self.z + self.y
        self.scale = qk ** -0.5  # moe_jax.rope.softmax_scale without rope_scaling (refused here)
        if qr is None:
            self.wq, self.wq_a, self.q_norm, self.wq_b = init(d, self.n * qk), None, None, None
        else:
            self.wq, self.wq_a, self.q_norm = None, init(d, qr), RMSNorm(qr, eps, init)
            self.wq_b = init(qr, self.n * qk)
        self.wkv_a, self.kv_norm, self.wk_rope = init(d, c), RMSNorm(c, eps, init), init(d, self.y)
        self.wk_b, self.wv_b = init(c, self.n * self.z), init(c, self.n * self.u)
        self.wo = init(self.n * self.u, d)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        n, z, y, u = self.n, self.z, self.y, self.u
        q = x @ self.wq if self.wq is not None else self.q_norm(x @ self.wq_a) @ self.wq_b
        q = q.view(b, s, n, z + y)
        q = torch.cat([q[..., :z], apply_rope(q[..., z:], cos, sin)], dim=-1)
        c_kv = self.kv_norm(x @ self.wkv_a)
        k_rope = apply_rope((x @ self.wk_rope).view(b, s, 1, y), cos, sin).expand(b, s, n, y)
        k = torch.cat([(c_kv @ self.wk_b).view(b, s, n, z), k_rope], dim=-1)
        v = (c_kv @ self.wv_b).view(b, s, n, u)
        h = max(z + y, u)
        q, k, v = (F.pad(t, (0, h - t.shape[-1])).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)[..., :u]
        return o.transpose(1, 2).reshape(b, s, n * u) @ self.wo


class MTPModule(nn.Module):
    """forward(h [B,S,D], e [B,S,D], cos, sin) -> (h_next, final_norm(h_next), router loss, counts);
    e: the embedding of the shifted tokens; loss and counts None when the block is dense."""

    def __init__(self, m, block: nn.Module, init: Init):
        super().__init__()
        d, eps = m["d_model"], m["norm_eps"]
        self.enorm, self.hnorm, self.final_norm = (RMSNorm(d, eps, init) for _ in range(3))
        self.eh_proj = init(2 * d, d)
        self.block = block

    def forward(self, h, e, cos, sin):
        x = torch.cat([self.enorm(e), self.hnorm(h)], dim=-1) @ self.eh_proj
        x, loss, counts = self.block(x, cos, sin)
        return x, self.final_norm(x), loss, counts


class MTP(nn.Module):
    """The D MTP modules around `blocks` (moe_jax.mtp.mtp_loss): forward(h, targets, embed, head, cos,
    sin) -> (mean over the modules of their masked CE, not yet scaled; their router losses summed (fp32
    scalar); their routed counts, a list of [E] per MoE block). `h`: the main model's last layer output
    (before its final norm); `targets`: the main model's [B,S]; `embed`, `head`: the main model's."""

    def __init__(self, m, blocks, init: Init):
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(m, blk, init) for blk in blocks)

    def forward(self, h, targets, embed, head, cos, sin):
        s = targets.shape[1]
        losses, router, counts = [], h.new_zeros((), dtype=torch.float32), []
        for k, module in enumerate(self.layers, start=1):
            e = F.embedding(targets.roll(1 - k, dims=1), embed).to(h.dtype)  # t_{i+k} = targets[i+k-1]
            h, normed, loss, cnt = module(h, e, cos, sin)
            # labels t_{i+k+1} = targets[i+k]; the last k positions (labels wrapped around) are masked out
            logits = normed[:, :s - k] @ head
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          targets[:, k:].reshape(-1)))
            if loss is not None:
                router, counts = router + loss, counts + [cnt]
        return torch.stack(losses).mean(), router, counts
