"""Hugging Face tensor names <-> our parameter paths and layouts (`tensor_map`, `mtp_tensor_map`).

HF `nn.Linear` weights are [out, in]; ours are [in, ...out] with heads split out (`wq_DNH`), gate/up
stacked as `w1_DnF[:, 0] = gate, [:, 1] = up`. GQA RoPE is rotate-half on both sides: q/k need no
permutation. DeepSeek (MLA) checkpoints rotate interleaved pairs (`rope_interleave`): the rotary rows of
`q_proj`/`q_b_proj` (per head, after the qk_nope rows) and of `kv_a_proj_with_mqa` (after the kv_lora
rows) are permuted to even-then-odd order on load, and back on save (`moe_jax.rope`, `moe_jax.mla`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.convert.hf_deepseek import DEEPSEEK

# ---------------------------------------------------------------------------------------------
# tensors: HF name -> (our path, to_ours, to_hf)

def _lin(shape_ours):
    """HF Linear [out, in] <-> ours [in, *out_split] (e.g. q_proj [N*H, D] <-> wq_DNH [D, N, H])."""
    return (lambda w: w.T.reshape(shape_ours), lambda w: w.reshape(w.shape[0], -1).T)


def _lin_in_split(shape_ours):
    """HF Linear [out, in] <-> ours [*in_split, out] (o_proj [D, N*H] <-> wo_NHD [N, H, D])."""
    return (lambda w: w.T.reshape(shape_ours), lambda w: w.reshape(-1, w.shape[-1]).T)


def _same(shape):
    return (lambda w: w.reshape(shape), lambda w: w)


def _flat(shape):
    """HF bias [N*H] <-> ours [N, H]."""
    return (lambda w: w.reshape(shape), lambda w: w.reshape(-1))


def _mlp_names(hf_prefix: str, arch: str, expert: int | None = None) -> dict:
    """Our (gate, up, down) slots -> HF names for one MLP."""
    if arch == "mixtral" and expert is not None:
        g, u, d = "w1", "w3", "w2"
    else:
        g, u, d = "gate_proj", "up_proj", "down_proj"
    return {"gate": f"{hf_prefix}.{g}.weight", "up": f"{hf_prefix}.{u}.weight", "down": f"{hf_prefix}.{d}.weight"}


def _deinterleave(y: int) -> np.ndarray:
    """Rotary rows (x0, x1, x2, ...) interleaved -> (x0, x2, ..., x1, x3, ...) rotate-half order."""
    return np.concatenate([np.arange(0, y, 2), np.arange(1, y, 2)])


def _rope_rows(w, lead: int, y: int, inverse: bool):
    """Permute the last `y` of each group of `lead + y` entries on w's last axis (a rope part)."""
    perm = _deinterleave(y)
    perm = np.argsort(perm) if inverse else perm
    idx = np.concatenate([np.arange(lead), lead + perm])
    return w[..., idx]


def _mla_entries(cfg: ModelConfig, a: str, b: tuple, interleave: bool) -> list:
    """HF DeepSeek MLA tensors <-> `mla.MLAttention` (q/k rope rows de-interleaved when `interleave`)."""
    d, n = cfg.d_model, cfg.num_heads
    z, y, u, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    perm = (lambda w, lead: _rope_rows(w, lead, y, False)) if interleave else (lambda w, lead: w)
    unperm = (lambda w, lead: _rope_rows(w, lead, y, True)) if interleave else (lambda w, lead: w)
    at = b + ("attn",)

    def q_conv(rows_in: int):  # HF [N*(Z+Y), in] <-> ours [in, N, Z+Y]
        return (lambda w: perm(w.T.reshape(rows_in, n, z + y), z),
                lambda w: unperm(w, z).reshape(rows_in, -1).T)

    out = []
    if cfg.q_lora_rank is None:
        out.append((f"{a}.q_proj.weight", at + ("wq_DNH",), q_conv(d)))
    else:
        q = cfg.q_lora_rank
        out += [(f"{a}.q_a_proj.weight", at + ("wq_a_DQ",), (lambda w: w.T, lambda w: w.T)),
                (f"{a}.q_a_layernorm.weight", at + ("q_norm", "scale"), _same((q,))),
                (f"{a}.q_b_proj.weight", at + ("wq_b_QNH",), q_conv(q))]
    kv_a = (lambda w: (w[:c].T, perm(w[c:].T, 0)),
            lambda w_dc, w_dy: jnp.concatenate([w_dc.T, unperm(w_dy, 0).T], axis=0))
    kv_b = (lambda w: (w.reshape(n, z + u, c)[:, :z].transpose(2, 0, 1),
                       w.reshape(n, z + u, c)[:, z:].transpose(2, 0, 1)),
            lambda wk, wv: jnp.concatenate([wk, wv], axis=2).transpose(1, 2, 0).reshape(n * (z + u), c))
    out += [(f"{a}.kv_a_proj_with_mqa.weight", (at + ("wkv_a_DC",), at + ("wk_rope_DY",)), ("multi",) + kv_a),
            (f"{a}.kv_a_layernorm.weight", at + ("kv_norm", "scale"), _same((c,))),
            (f"{a}.kv_b_proj.weight", (at + ("wk_b_CNZ",), at + ("wv_b_CNU",)), ("multi",) + kv_b),
            (f"{a}.o_proj.weight", at + ("wo_NUD",), _lin_in_split((n, u, d)))]
    return out


def _gqa_entries(cfg: ModelConfig, a: str, b: tuple) -> list:
    d, n, kv, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_
    out = [(f"{a}.q_proj.weight", b + ("attn", "wq_DNH"), _lin((d, n, h))),
           (f"{a}.k_proj.weight", b + ("attn", "wk_DKH"), _lin((d, kv, h))),
           (f"{a}.v_proj.weight", b + ("attn", "wv_DKH"), _lin((d, kv, h))),
           (f"{a}.o_proj.weight", b + ("attn", "wo_NHD"), _lin_in_split((n, h, d)))]
    if cfg.attention_bias:
        out += [(f"{a}.q_proj.bias", b + ("attn", "bq_NH"), _flat((n, h))),
                (f"{a}.k_proj.bias", b + ("attn", "bk_KH"), _flat((kv, h))),
                (f"{a}.v_proj.bias", b + ("attn", "bv_KH"), _flat((kv, h)))]
    if cfg.qk_norm:
        out += [(f"{a}.q_norm.weight", b + ("attn", "q_norm", "scale"), _same((h,))),
                (f"{a}.k_norm.weight", b + ("attn", "k_norm", "scale"), _same((h,)))]
    return out


def block_entries(cfg: ModelConfig, arch: str, p: str, b: tuple, is_moe: bool, interleave: bool) -> list:
    """The tensors of one decoder block: HF prefix `p` (e.g. `model.layers.3`), our path `b`."""
    d, a = cfg.d_model, f"{p}.self_attn"
    out = [(f"{p}.input_layernorm.weight", b + ("attn_norm", "scale"), _same((d,))),
           (f"{p}.post_attention_layernorm.weight", b + ("mlp_norm", "scale"), _same((d,)))]
    out += _mla_entries(cfg, a, b, interleave) if cfg.attention_type == "mla" else _gqa_entries(cfg, a, b)
    if not is_moe:
        return out + [(_mlp_names(f"{p}.mlp", arch), b + ("mlp",), "mlp")]
    m = cfg.moe
    moe_p = f"{p}.block_sparse_moe" if arch == "mixtral" else f"{p}.mlp"
    out.append((f"{moe_p}.gate.weight", b + ("mlp", "router", "w_DE"), (lambda w: w.T, lambda w: w.T)))
    out.append(([_mlp_names(f"{moe_p}.experts.{e}", arch, e) for e in range(m.num_experts)],
                b + ("mlp", "experts"), "experts"))
    if arch in DEEPSEEK:
        out.append((_mlp_names(f"{moe_p}.shared_experts", arch), b + ("mlp", "shared", "mlp"), "mlp"))
        if arch == "deepseek_v3":
            out.append((f"{moe_p}.gate.e_score_correction_bias", b + ("mlp", "router", "expert_bias"), "bias"))
    elif m.shared_expert_intermediate_size:
        out.append((_mlp_names(f"{moe_p}.shared_expert", arch), b + ("mlp", "shared", "mlp"), "mlp"))
        out.append((f"{moe_p}.shared_expert_gate.weight", b + ("mlp", "shared", "gate_D"),
                    (lambda w: w.reshape(-1), lambda w: w.reshape(1, -1))))
    return out


def tensor_map(cfg: ModelConfig, arch: str, *, rope_interleave: bool = True) -> list[tuple[str, tuple, Any]]:
    """[(hf_name, our path tuple, (to_ours, to_hf) or a special tag)] for every tensor of the main model
    (MTP modules: `mtp_tensor_map`). `rope_interleave`: DeepSeek's q/k rope rows are interleaved."""
    d = cfg.d_model
    out = [("model.embed_tokens.weight", ("embed_VD",), _same((cfg.vocab_size, d))),
           ("model.norm.weight", ("final_norm", "scale"), _same((d,)))]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("head_DV",), (lambda w: w.T, lambda w: w.T)))
    for i in range(cfg.num_layers):
        out += block_entries(cfg, arch, f"model.layers.{i}", ("blocks", i), cfg.is_moe_layer(i), rope_interleave)
    return out


def mtp_tensor_map(cfg: ModelConfig, arch: str, *, rope_interleave: bool = True) -> list:
    """DeepSeek's MTP modules, stored after the last layer (`model.layers.{num_layers + k}`) <->
    `model.mtp[k]` (`moe_jax.mtp.MTPModule`). Their `embed_tokens` / `shared_head.head` are copies of the
    main model's (tag ("copy", main tensor name)): checked equal on load, written on save."""
    d, out = cfg.d_model, []
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    eh = (lambda w: jnp.stack([w[:, :d].T, w[:, d:].T]), lambda w: jnp.concatenate([w[0].T, w[1].T], axis=1))
    for k in range(cfg.mtp_num_layers):
        p, b = f"model.layers.{cfg.num_layers + k}", ("mtp", k)
        out += [(f"{p}.enorm.weight", b + ("enorm", "scale"), _same((d,))),
                (f"{p}.hnorm.weight", b + ("hnorm", "scale"), _same((d,))),
                (f"{p}.eh_proj.weight", b + ("eh_proj_nDD",), eh),
                (f"{p}.shared_head.norm.weight", b + ("final_norm", "scale"), _same((d,))),
                (f"{p}.embed_tokens.weight", None, ("copy", "model.embed_tokens.weight")),
                (f"{p}.shared_head.head.weight", None, ("copy", head))]
        out += block_entries(cfg, arch, p, b + ("block",), cfg.is_moe_layer(cfg.num_layers - 1), rope_interleave)
    return out
