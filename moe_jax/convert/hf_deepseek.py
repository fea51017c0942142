"""DeepSeek-V2 / DeepSeek-V3 Hugging Face `config.json` <-> `ModelConfig` (MLA attention, fine-grained
experts with shared experts, group-limited routing, MTP modules).

Routers, as transformers runs them:
- V3 (`noaux_tc`): sigmoid scores, `e_score_correction_bias` (our router's expert bias) steers the choice,
  a group's score is the sum of its top-2 biased scores, weights normalised when `norm_topk_prob`, times
  `routed_scaling_factor`. Ours: sigmoid, expert bias, `router_group_score_topk=2`, weights normalised
  when k > 1 — so `norm_topk_prob == (k > 1)`.
- V2 (`greedy` / `group_limited_greedy`): softmax over all experts, top-k probabilities unnormalised,
  times `routed_scaling_factor`; a group's score is its best expert (ours: `router_group_score_topk=1`).
Layer i is MoE when i >= `first_k_dense_replace` (transformers ignores `moe_layer_freq`: only 1 is taken).
"""
from __future__ import annotations

from typing import Any

from moe_jax.config import MoEConfig, ModelConfig

DEEPSEEK = ("deepseek_v2", "deepseek_v3")
NAMES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
MLA_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"Hugging Face config field {field}={value!r} is not supported: {why}")


def _router(hf, mt: str, k: int, n_exp: int) -> dict:
    """MoEConfig router fields for a DeepSeek router (raises naming what has no equivalent)."""
    n_group, topk_group = hf.get("n_group"), hf.get("topk_group")
    method = hf.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy")
    scale = float(hf.get("routed_scaling_factor", 1.0))
    out: dict[str, Any] = dict(router_topk_scaling_factor=None if scale == 1.0 else scale)
    if mt == "deepseek_v3":
        if method != "noaux_tc":
            raise _bad("topk_method", method, "DeepSeek-V3 routes with 'noaux_tc' (transformers ignores the field)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise _bad("scoring_func", hf["scoring_func"], "DeepSeek-V3 scores with 'sigmoid'")
        norm = bool(hf.get("norm_topk_prob", True))
        if norm != (k > 1):
            raise _bad("norm_topk_prob", norm, f"our sigmoid router normalises the top-k weights exactly when "
                       f"num_experts_per_tok > 1 (got {k})")
        n_group, topk_group = n_group or 1, topk_group or 1
        if n_exp % n_group or n_exp // n_group < 2:
            raise _bad("n_group", n_group, f"must divide n_routed_experts ({n_exp}) into groups of >= 2")
        out.update(router_score_function="sigmoid", router_enable_expert_bias=True, group_score=2)
    else:
        if method not in ("greedy", "group_limited_greedy"):
            raise _bad("topk_method", method, "DeepSeek-V2 routes with 'greedy' or 'group_limited_greedy'")
        if hf.get("scoring_func", "softmax") != "softmax":
            raise _bad("scoring_func", hf["scoring_func"], "DeepSeek-V2 scores with 'softmax'")
        if hf.get("norm_topk_prob"):
            raise _bad("norm_topk_prob", True, "transformers' DeepSeek-V2 router never normalises")
        if method == "greedy":
            n_group = topk_group = None
        elif not n_group or not topk_group or n_exp % n_group:
            raise _bad("n_group", n_group, f"group_limited_greedy needs n_group dividing n_routed_experts "
                       f"({n_exp}) and topk_group set")
        out.update(router_score_function="softmax", router_pre_softmax=True, group_score=1)
    group_score = out.pop("group_score")
    if n_group is not None and topk_group < n_group:
        if k > topk_group * (n_exp // n_group):
            raise _bad("topk_group", topk_group, f"its {topk_group} groups of {n_exp // n_group} experts cannot "
                       f"hold num_experts_per_tok={k}")
        out.update(router_num_groups=n_group, router_group_topk=topk_group,
                   router_group_score_topk=group_score if group_score != k // topk_group or k % topk_group
                   else None)  # None: the default (k // group_topk) already means the same
    return out


def deepseek_fields(hf, act: str) -> dict:
    """ModelConfig keyword arguments for a DeepSeek-V2/V3 config mapping (model_type already checked)."""
    mt = hf["model_type"]
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) not in (None, heads):
        raise _bad("num_key_value_heads", hf["num_key_value_heads"], f"MLA needs it equal to num_attention_heads "
                   f"({heads})")
    if hf.get("attention_bias"):
        raise _bad("attention_bias", True, "MLA projection biases are not implemented")
    if hf.get("moe_layer_freq", 1) != 1:
        raise _bad("moe_layer_freq", hf["moe_layer_freq"], "only 1 (transformers ignores the field)")
    if float(hf.get("rms_norm_eps", MLA_NORM_EPS)) != MLA_NORM_EPS:
        raise _bad("rms_norm_eps", hf["rms_norm_eps"], f"MLA's latent norms use {MLA_NORM_EPS} in transformers; "
                   f"one norm eps for the model is implemented")
    if mt == "deepseek_v2" and hf.get("rope_interleave", True) is not True:
        raise _bad("rope_interleave", hf["rope_interleave"], "DeepSeek-V2 always uses interleaved RoPE")
    n_layers = hf["num_hidden_layers"]
    n_exp = hf.get("n_routed_experts")
    first_dense = hf.get("first_k_dense_replace") or 0
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
    moe = None
    if n_exp and first_dense < n_layers:
        k = hf["num_experts_per_tok"]
        ffn = hf["moe_intermediate_size"]
        shared = (hf.get("n_shared_experts") or 0) * ffn
        if not shared:
            raise _bad("n_shared_experts", hf.get("n_shared_experts"), "must be >= 1 (a DeepSeek MoE layer always "
                       "has shared experts here)")
        pattern = 1 if first_dense == 0 else tuple(int(i >= first_dense) for i in range(n_layers))
        seq_aux = hf.get("seq_aux", True)
        coeff = float(hf.get("aux_loss_alpha", 0.0) or 0.0)
        moe = MoEConfig(num_experts=n_exp, router_topk=k, ffn_hidden_size=ffn,
                        shared_expert_intermediate_size=shared, shared_expert_gate=False, layer_freq=pattern,
                        activation=act, aux_loss_coeff=coeff,
                        router_load_balancing_type=("none" if coeff == 0 else "seq_aux_loss" if seq_aux
                                                    else "aux_loss"),
                        **_router(hf, mt, k, n_exp))
    return dict(attention_type="mla", num_kv_heads=heads, q_lora_rank=hf.get("q_lora_rank") or None,
                kv_lora_rank=hf["kv_lora_rank"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                qk_nope_head_dim=hf["qk_nope_head_dim"], v_head_dim=hf["v_head_dim"],
                mtp_num_layers=int(mtp), moe=moe)


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"cannot export to Hugging Face: {field}={value!r} {why}")


def pick_deepseek(cfg: ModelConfig) -> str:
    """deepseek_v3 (sigmoid router, or dense) or deepseek_v2 (softmax router) for an MLA config."""
    m = cfg.moe
    if cfg.norm_eps != MLA_NORM_EPS:
        raise _unsupported("ModelConfig.norm_eps", cfg.norm_eps, f"(DeepSeek HF models need {MLA_NORM_EPS})")
    if m is None:
        return "deepseek_v3"
    checks = {"expert_capacity_factor": (m.expert_capacity_factor, None),
              "apply_probs_on_input": (m.apply_probs_on_input, False),
              "shared_expert_gate": (m.shared_expert_gate, False),
              "activation": (m.activation, cfg.activation)}
    for f, (v, want) in checks.items():
        if v != want:
            raise _unsupported(f"MoEConfig.{f}", v, f"has no DeepSeek HF equivalent (needs {want!r})")
    if not m.shared_expert_intermediate_size or m.shared_expert_intermediate_size % m.ffn_hidden_size:
        raise _unsupported("MoEConfig.shared_expert_intermediate_size", m.shared_expert_intermediate_size,
                           f"(DeepSeek HF models need n_shared_experts >= 1 experts of ffn_hidden_size "
                           f"{m.ffn_hidden_size})")
    pattern = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    if pattern != sorted(pattern) or not any(pattern):
        raise _unsupported("MoEConfig.layer_freq", m.layer_freq, "(DeepSeek HF models have dense layers first, "
                           "then MoE layers: first_k_dense_replace)")
    groups = m.router_num_groups
    if m.router_score_function == "sigmoid":
        if groups is not None and m.group_score_topk != 2:
            raise _unsupported("MoEConfig.router_group_score_topk", m.group_score_topk,
                               "(DeepSeek-V3 scores a group by its top-2 experts: needs 2, or None with "
                               "router_topk // router_group_topk == 2)")
        return "deepseek_v3"
    if m.router_score_function == "softmax":
        if not m.router_pre_softmax or m.router_enable_expert_bias:
            raise _unsupported("MoEConfig.router_pre_softmax", m.router_pre_softmax,
                               "(a softmax router exports as DeepSeek-V2: needs router_pre_softmax=True and no "
                               "expert bias)")
        if groups is not None and m.group_score_topk != 1:
            raise _unsupported("MoEConfig.router_group_score_topk", m.group_score_topk,
                               "(DeepSeek-V2 scores a group by its best expert: needs 1, or None with "
                               "router_group_topk == router_topk)")
        return "deepseek_v2"
    raise _unsupported("MoEConfig.router_score_function", m.router_score_function,
                       "has no DeepSeek HF equivalent (sigmoid: V3, softmax: V2)")


def deepseek_to_hf(cfg: ModelConfig, arch: str) -> dict:
    """The DeepSeek-specific config.json fields for `cfg` (the caller adds the shared ones)."""
    m = cfg.moe
    hf: dict[str, Any] = {
        "architectures": [NAMES[arch]], "model_type": arch, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_head_dim, "num_key_value_heads": cfg.num_heads, "rope_interleave": True,
        "num_nextn_predict_layers": cfg.mtp_num_layers, "moe_layer_freq": 1, "mlp_bias": False,
    }
    if m is None:  # a dense MLA model: every layer "first dense"
        hf.update(first_k_dense_replace=cfg.num_layers, n_routed_experts=2, num_experts_per_tok=1,
                  moe_intermediate_size=cfg.ffn_hidden_size, n_shared_experts=1, n_group=1, topk_group=1,
                  norm_topk_prob=False, routed_scaling_factor=1.0)
        if arch == "deepseek_v2":
            hf["topk_method"] = "greedy"
        else:
            hf.update(topk_method="noaux_tc", scoring_func="sigmoid")
        return hf
    first_dense = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    groups = m.router_num_groups
    hf.update(first_k_dense_replace=first_dense, n_routed_experts=m.num_experts,
              num_experts_per_tok=m.router_topk, moe_intermediate_size=m.ffn_hidden_size,
              n_shared_experts=m.shared_expert_intermediate_size // m.ffn_hidden_size,
              routed_scaling_factor=m.router_topk_scaling_factor or 1.0,
              n_group=groups or 1, topk_group=m.router_group_topk or 1,
              aux_loss_alpha=m.aux_loss_coeff if m.router_load_balancing_type != "none" else 0.0,
              seq_aux=m.router_load_balancing_type == "seq_aux_loss")
    if arch == "deepseek_v3":
        hf.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=m.router_topk > 1)
    else:
        hf.update(topk_method="group_limited_greedy" if groups else "greedy", scoring_func="softmax",
                  norm_topk_prob=False)
    return hf
