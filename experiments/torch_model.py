"""The PyTorch reference model (experiments/torch_reference.py): moe_jax's routing (routing.py), MoE
layer (moe.py), blocks and GPT (model.py) with DeepSeek's MLA and MTP (torch_mla.py), and the parameter
and FLOP counts of moe_jax.metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_layers import MLP, Attention, Init, RMSNorm, rope_tables, swiglu
from torch_mla import MTP, MLAttention


def is_moe_layer(e: dict | None, i: int) -> bool:
    """Megatron's --moe-layer-freq: a 0/1 pattern per layer, or every n-th layer."""
    lf = e["layer_freq"] if e else None
    return e is not None and (bool(lf[i]) if isinstance(lf, (list, tuple)) else i % lf == 0)


def group_limited_topk(sel, k, groups, group_topk, score_topk=None):
    t, e = sel.shape
    group_score = sel.view(t, groups, e // groups).topk(score_topk or k // group_topk, dim=-1).values.sum(-1)
    keep = torch.zeros(t, groups, dtype=torch.bool, device=sel.device)
    keep.scatter_(1, group_score.topk(group_topk, dim=-1).indices, True)
    keep = keep[:, :, None].expand(t, groups, e // groups).reshape(t, e)
    return sel.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices


def route(logits, c, bias, seq_len):
    """moe_jax.routing.route, dropless: (weights [T,k] fp32, experts [T,k], loss, counts [E])."""
    t, n_exp = logits.shape
    k, fn, coeff = c["router_topk"], c["router_score_function"], c["aux_loss_coeff"]
    loss = logits.new_zeros(())
    if c["z_loss_coeff"]:
        loss = loss + c["z_loss_coeff"] * torch.logsumexp(logits, -1).square().mean()
    scores = logits if fn == "softmax" else (logits.sigmoid() if fn == "sigmoid" else F.softplus(logits).sqrt())
    sel = scores.detach() + (0.0 if bias is None else bias)
    with torch.no_grad():
        experts = (group_limited_topk(sel, k, c["router_num_groups"], c["router_group_topk"],
                                      c.get("router_group_score_topk"))
                   if c["router_num_groups"] else sel.topk(k, dim=-1).indices)
    weights = scores.gather(1, experts)
    if fn == "softmax":
        weights = weights.softmax(-1)
    elif k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if c["router_topk_scaling_factor"]:
        weights = weights * c["router_topk_scaling_factor"]
    ones = torch.ones(experts.numel(), device=logits.device, dtype=torch.float32)
    counts = torch.zeros(n_exp, device=logits.device).scatter_add_(0, experts.reshape(-1), ones)
    lb = c["router_load_balancing_type"]
    if lb != "none":
        p = logits.softmax(-1) if fn == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        if lb == "seq_aux_loss":  # per sequence, averaged (tokens are [B, S] row-major)
            b = t // seq_len
            cnt = torch.zeros(b, n_exp, device=logits.device).scatter_add_(
                1, experts.reshape(b, seq_len * k), ones.view(b, -1))
            f_be = cnt / cnt.sum(-1, keepdim=True)
            loss = loss + coeff * n_exp * (f_be * p.view(b, seq_len, n_exp).mean(1)).sum(-1).mean()
        else:  # aux_loss (global_aux_loss is the same on one device)
            loss = loss + coeff * n_exp * (counts / counts.sum() * p.mean(0)).sum()
    return weights, experts, loss, counts


class MoE(nn.Module):
    """Router (fp32) → sort rows by expert → two grouped GEMMs → weighted sum over k (+ shared expert)."""

    def __init__(self, m, c, init: Init, grouped: bool):
        super().__init__()
        d, n_exp, f = m["d_model"], c["num_experts"], c["ffn_hidden_size"]
        self.c, self.grouped = c, grouped
        self.router = init(d, n_exp)
        self.register_buffer("expert_bias", torch.zeros(n_exp, device=init.device)
                             if c["router_enable_expert_bias"] else None)
        self.w1_exp, self.w2_exp = init(n_exp, d, 2 * f), init(n_exp, f, d)
        s = c["shared_expert_intermediate_size"]
        self.shared = MLP(d, s, init) if s else None
        self.shared_gate = init(d) if s and c["shared_expert_gate"] else None

    def experts(self, x, counts):
        if self.grouped:  # bf16 CUTLASS grouped GEMM; offs = end row of each expert's group
            offs, bf = counts.cumsum(0).to(torch.int32), torch.bfloat16
            h = torch._grouped_mm(x.to(bf), self.w1_exp.to(bf), offs=offs)
            return torch._grouped_mm(swiglu(h), self.w2_exp.to(bf), offs=offs)
        parts = torch.split(x, [int(n) for n in counts.tolist()])
        return torch.cat([swiglu(xe @ self.w1_exp[i]) @ self.w2_exp[i] for i, xe in enumerate(parts)])

    def forward(self, x):
        b, s, d = x.shape
        x = x.reshape(b * s, d)
        k = self.c["router_topk"]
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ self.router.float()
            weights, experts, loss, counts = route(logits, self.c, self.expert_bias, s)
        order = experts.reshape(-1).argsort(stable=True)  # sorted row -> flat (token, slot)
        y = self.experts(x[order // k], counts)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        y = (y[inv].view(b * s, k, d).float() * weights[..., None]).sum(1).to(x.dtype)
        if self.shared is not None:
            ys = self.shared(x)
            if self.shared_gate is not None:
                ys = (ys.float() * torch.sigmoid(x.float() @ self.shared_gate.float())[:, None]).to(ys.dtype)
            y = y + ys
        return y.view(b, s, d), loss, counts.detach()


class Block(nn.Module):
    def __init__(self, m, c, moe: bool, init: Init, grouped: bool):
        super().__init__()
        self.attn_norm = RMSNorm(m["d_model"], m["norm_eps"], init)
        if m["attention_type"] == "mla":
            self.attn = MLAttention(m, init)
        else:
            self.attn = Attention(m, init)
        self.mlp_norm = RMSNorm(m["d_model"], m["norm_eps"], init)
        self.mlp = MoE(m, c, init, grouped) if moe else MLP(m["d_model"], m["ffn_hidden_size"], init)

    def forward(self, x, cos, sin):  # -> (x, router loss, routed counts); None, None for a dense layer
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y = self.mlp(self.mlp_norm(x))
        return (x + y[0], *y[1:]) if isinstance(y, tuple) else (x + y, None, None)


class GPT(nn.Module):
    """forward(inputs, targets) -> (loss, CE, routed counts [L_moe + D_moe, E]): loss = CE + every
    router loss (the MTP blocks' included) + mtp_loss_scaling_factor · MTP loss, as moe_jax.train's;
    counts: the MoE layers' rows in order, then the MTP blocks' when MoE (the rows of `moe_layers()`)."""

    def __init__(self, m, c, init: Init, compute_dtype, grouped: bool):
        super().__init__()
        self.m, self.cdt = m, compute_dtype
        self.embed = init(m["vocab_size"], m["d_model"])
        self.blocks = nn.ModuleList(Block(m, c, is_moe_layer(c, i), init, grouped)
                                    for i in range(m["num_layers"]))
        self.final_norm = RMSNorm(m["d_model"], m["norm_eps"], init)
        self.head = None if m["tie_embeddings"] else init(m["d_model"], m["vocab_size"])
        self.mtp = None
        if m["mtp_num_layers"]:  # DeepSeek-V3: the MTP block is MoE when the last layer is
            last_moe = is_moe_layer(c, m["num_layers"] - 1)
            self.mtp = MTP(m, [Block(m, c, last_moe, init, grouped) for _ in range(m["mtp_num_layers"])], init)

    def moe_layers(self) -> list:
        """The MoE layers in the order of forward's routed counts (the MTP blocks' last)."""
        blocks = list(self.blocks) + ([mod.block for mod in self.mtp.layers] if self.mtp is not None else [])
        return [blk.mlp for blk in blocks if isinstance(blk.mlp, MoE)]

    def trunk(self, inputs):
        """(last layer output [B,S,D] before the final norm, router losses summed, routed counts list,
        RoPE tables (cos, sin))."""
        m = self.m
        x = F.embedding(inputs, self.embed).to(self.cdt)
        rope_dim = m["qk_rope_head_dim"] if m["attention_type"] == "mla" else (
            m["head_dim"] or m["d_model"] // m["num_heads"])
        cos, sin = rope_tables(inputs.shape[1], rope_dim, m["rope_theta"], inputs.device)
        aux, counts = x.new_zeros((), dtype=torch.float32), []
        for blk in self.blocks:
            x, loss, cnt = blk(x, cos, sin)
            if loss is not None:
                aux, counts = aux + loss, counts + [cnt]
        return x, aux, counts, (cos, sin)

    def head_weight(self):
        return self.embed.t() if self.head is None else self.head

    def forward(self, inputs, targets):
        x, aux, counts, rope = self.trunk(inputs)
        logits = self.final_norm(x) @ self.head_weight()
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce + aux
        if self.mtp is not None:
            mtp, mtp_aux, mtp_counts = self.mtp(x, targets, self.embed, self.head_weight(), *rope)
            loss, counts = loss + self.m["mtp_loss_scaling_factor"] * mtp + mtp_aux, counts + mtp_counts
        return loss, ce, torch.stack(counts) if counts else None


def param_counts(model: GPT, c: dict | None) -> dict:
    """moe_jax.metrics.param_counts: total; active = routed experts × top-k/E, input embedding excluded."""
    frac = c["router_topk"] / c["num_experts"] if c else 1.0
    total = active = 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        if name == "embed" and not model.m["tie_embeddings"]:
            continue
        active += p.numel() * (frac if name.endswith(("w1_exp", "w2_exp")) else 1.0)
    return {"total": int(total), "active": int(active), "embedding": model.m["vocab_size"] * model.m["d_model"]}


def flops_per_token(m: dict, active: int, seq: int) -> float:
    """moe_jax.metrics.flops_per_token: 6·N_active + 3·(L + D)·S·N·(H_qk + H_v) + 6·D·d_model·V, with D
    MTP modules, H_qk = H_v = head_dim for GQA, qk_nope + qk_rope and v_head_dim for MLA (v's zero
    padding in the kernel not counted)."""
    if m["attention_type"] == "mla":
        h_qk, h_v = m["qk_nope_head_dim"] + m["qk_rope_head_dim"], m["v_head_dim"]
    else:
        h_qk = h_v = m["head_dim"] or m["d_model"] // m["num_heads"]
    d = m["mtp_num_layers"]
    attn = 3.0 * (m["num_layers"] + d) * seq * m["num_heads"] * (h_qk + h_v)
    return 6.0 * active + attn + 6.0 * d * m["d_model"] * m["vocab_size"]


def build_model(m, c, device="meta", param_dtype=torch.float32, compute_dtype=torch.float32, grouped=False):
    return GPT(m, c, Init(device, param_dtype, m["init_std"]), compute_dtype, grouped)
