"""Hugging Face `config.json` <-> `ModelConfig` for Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE, Qwen3-MoE
and DeepSeek-V2/V3 (`hf_deepseek.py`), RoPE default/linear/YaRN; fields we cannot represent exactly fail with
a ValueError naming them."""
from __future__ import annotations

from typing import Any

from moe_jax.config import MoEConfig, ModelConfig, RopeScalingConfig
from moe_jax.convert.hf_deepseek import DEEPSEEK, deepseek_fields, deepseek_to_hf, pick_deepseek
from moe_jax.convert.hf_deepseek import NAMES as DEEPSEEK_NAMES

DENSE = ("llama", "mistral", "qwen2", "qwen3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED = DENSE + MOE + DEEPSEEK
ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"Hugging Face config field {field}={value!r} is not supported: {why}")


class _Fields(dict):
    """A config.json mapping whose missing required fields raise a ValueError naming them."""

    def __missing__(self, key):
        raise ValueError(f"Hugging Face config lacks the required field {key!r}")


YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "truncate", "attention_factor") + YARN_KEYS


def _rope_scaling(name: str, params: dict, hf) -> dict | None:
    """RopeScalingConfig fields for one rope_parameters mapping, read as transformers reads them."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn", "linear"):
        raise _bad(f"{name}.rope_type", kind, "supported: 'default', 'yarn', 'linear'")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _bad(f"{name}.partial_rotary_factor", params["partial_rotary_factor"], "must be 1.0")
    if kind == "default":
        return None
    unknown = sorted(set(params) - set(ROPE_KEYS))
    if unknown:
        raise _bad(f"{name}.{unknown[0]}", params[unknown[0]], f"not a {kind} RoPE field we implement")
    if params.get("attention_factor") is not None:
        raise _bad(f"{name}.attention_factor", params["attention_factor"], "an explicit attention factor is not "
                   "implemented (it follows from factor, mscale and mscale_all_dim)")
    if params.get("truncate", True) is not True:
        raise _bad(f"{name}.truncate", params["truncate"], "only the truncated YaRN correction range")
    orig = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    factor = params.get("factor")
    if kind == "linear":
        extra = [k for k in YARN_KEYS[1:] if params.get(k) is not None and k != "original_max_position_embeddings"]
        if extra:
            raise _bad(f"{name}.{extra[0]}", params[extra[0]], "linear RoPE scaling takes only 'factor'")
        if factor is None:
            raise ValueError(f"Hugging Face config lacks the required field '{name}.factor'")
        return dict(type="linear", factor=float(factor))
    if orig is None:
        raise ValueError(f"Hugging Face config lacks the required field '{name}.original_max_position_embeddings'")
    if factor is None:  # transformers: the ratio of the context lengths
        factor = hf.get("max_position_embeddings", 2048) / orig
    opt = {k: float(params[k]) if params.get(k) is not None else None for k in ("mscale", "mscale_all_dim")}
    return dict(type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1), **opt)


def rope_from_hf(hf) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, rope_scaling) read as transformers (5.x) reads them: a non-empty `rope_scaling` (the
    older name) takes precedence over `rope_parameters`; either may be nested per layer type (all alike);
    rope types 'default', 'yarn' and 'linear'."""
    name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rp = hf.get(name) or {}
    if not isinstance(rp, dict):
        raise _bad(name, rp, "must be a mapping")
    nested = [v for v in rp.values() if isinstance(v, dict)]
    thetas, scalings = set(), []
    for params in nested or [rp]:
        scalings.append(_rope_scaling(name, params, hf))
        thetas.add(float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if len(thetas) > 1:
        raise _bad(f"{name}.rope_theta", sorted(thetas), "one RoPE theta for every layer is implemented")
    if any(s != scalings[0] for s in scalings):
        raise _bad(name, rp, "one RoPE scaling for every layer is implemented")
    return thetas.pop(), None if scalings[0] is None else RopeScalingConfig(**scalings[0])


def rope_to_hf(cfg: ModelConfig) -> dict:
    """`rope_parameters` for config.json."""
    rs = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": "default" if rs is None else rs.type, "rope_theta": cfg.rope_theta}
    if rs is not None and rs.type == "linear":
        out["factor"] = rs.factor
    elif rs is not None:
        out.update(factor=rs.factor, original_max_position_embeddings=rs.original_max_position_embeddings,
                   beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
        out.update({k: getattr(rs, k) for k in ("mscale", "mscale_all_dim") if getattr(rs, k) is not None})
    return out


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ModelConfig:
    """ModelConfig for a Hugging Face config dict (raises ValueError naming any unsupported, missing or
    invalid field)."""
    if not isinstance(hf, dict):
        raise ValueError(f"a Hugging Face config must be a JSON object, got a {type(hf).__name__}")
    hf = _Fields(hf)
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts_per_tok"):
        v = hf.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise _bad(f, v, "must be a positive integer")
    try:
        return _config_from_hf(hf, dtype)
    except ValueError as e:
        if str(e).startswith("Hugging Face config"):
            raise
        raise ValueError(f"Hugging Face config: {e}") from None  # e.g. ModelConfig's own checks


def _config_from_hf(hf: _Fields, dtype: str) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise _bad("model_type", mt, f"supported: {list(SUPPORTED)}")
    act = hf.get("hidden_act", "silu")
    if act not in ACTS:
        raise _bad("hidden_act", act, f"supported: {sorted(ACTS)}")
    if hf.get("quantization_config"):
        q = hf["quantization_config"]
        raise _bad("quantization_config", q.get("quant_method", q) if isinstance(q, dict) else q,
                   "quantized weights (e.g. fp8 with weight_scale_inv) are not read: dequantize the checkpoint first")
    for f in ("mlp_bias",):
        if hf.get(f):
            raise _bad(f, hf[f], "MLP biases are not implemented")
    if mt in ("llama", "mistral", "mixtral", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
        raise _bad("attention_bias", True, f"{mt} puts a bias on o_proj too, which is not implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _bad("partial_rotary_factor", hf["partial_rotary_factor"], "must be 1.0")
    n_layers, max_len = hf["num_hidden_layers"], hf.get("max_position_embeddings", 2048)
    sw = hf.get("sliding_window")
    uses_sw = hf.get("use_sliding_window", mt in ("mistral", "mixtral"))
    if uses_sw and sw and sw < max_len:
        raise _bad("sliding_window", sw, f"sliding-window attention is not implemented (it binds below "
                   f"max_position_embeddings={max_len})")
    lt = hf.get("layer_types")
    if lt and any(t != "full_attention" for t in lt) and uses_sw:
        raise _bad("layer_types", sorted(set(lt)), "only 'full_attention' layers are implemented")

    moe = None
    if mt in MOE:
        n_exp = hf.get("num_local_experts", hf.get("num_experts"))
        if mt == "mixtral":
            pattern, ffn, pre_softmax, shared = 1, hf["intermediate_size"], False, None
        else:
            step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
            pattern = tuple(int(i not in only and n_exp > 0 and (i + 1) % step == 0)
                            for i in range(n_layers))
            pattern = 1 if all(pattern) else pattern
            ffn, pre_softmax = hf["moe_intermediate_size"], not hf.get("norm_topk_prob", False)
            shared = hf.get("shared_expert_intermediate_size") if mt == "qwen2_moe" else None
        k = hf["num_experts_per_tok"]
        jitter = hf.get("router_jitter_noise") or None
        moe = MoEConfig(num_experts=n_exp, router_topk=k, ffn_hidden_size=ffn,
                        router_score_function="softmax", router_pre_softmax=pre_softmax,
                        router_load_balancing_type="aux_loss",
                        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
                        input_jitter_eps=jitter, shared_expert_intermediate_size=shared or None,
                        shared_expert_gate=bool(shared), layer_freq=pattern, activation=ACTS[act])
    heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    if mt in DEEPSEEK:
        arch = deepseek_fields(hf, ACTS[act])
    else:
        arch = dict(num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or None,
                    attention_bias=(mt == "qwen2") or (mt == "qwen2_moe" and hf.get("qkv_bias", True)),
                    qk_norm=mt in ("qwen3", "qwen3_moe"), moe=moe)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n_layers, num_heads=heads,
        ffn_hidden_size=hf["intermediate_size"], max_seq_len=max_len, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        activation=ACTS[act], tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
        param_dtype=dtype, **arch)


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"cannot export to Hugging Face: {field}={value!r} {why}")


def pick_arch(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that represents `cfg` exactly."""
    if cfg.norm != "rmsnorm":
        raise _unsupported("ModelConfig.norm", cfg.norm, "(HF Llama-family models use RMSNorm)")
    if cfg.activation not in ("swiglu", "geglu"):
        raise _unsupported("ModelConfig.activation", cfg.activation, "(must be swiglu or geglu)")
    if cfg.attention_type == "mla":
        return pick_deepseek(cfg)
    if cfg.mtp_num_layers:
        raise _unsupported("ModelConfig.mtp_num_layers", cfg.mtp_num_layers, "with GQA attention has no HF "
                           "model (DeepSeek-V3's MTP needs attention_type='mla')")
    m = cfg.moe
    if m is None:
        if cfg.attention_bias and cfg.qk_norm:
            raise _unsupported("ModelConfig.attention_bias", True, "together with qk_norm has no HF model")
        return "qwen2" if cfg.attention_bias else "qwen3" if cfg.qk_norm else "llama"
    checks = {"router_score_function": (m.router_score_function, "softmax"),
              "router_num_groups": (m.router_num_groups, None),
              "router_enable_expert_bias": (m.router_enable_expert_bias, False),
              "router_topk_scaling_factor": (m.router_topk_scaling_factor, None),
              "expert_capacity_factor": (m.expert_capacity_factor, None),
              "apply_probs_on_input": (m.apply_probs_on_input, False),
              "activation": (m.activation, cfg.activation)}
    for f, (v, want) in checks.items():
        if v != want:
            raise _unsupported(f"MoEConfig.{f}", v, f"has no Hugging Face equivalent (needs {want!r})")
    if m.shared_expert_intermediate_size:
        if not m.shared_expert_gate:
            raise _unsupported("MoEConfig.shared_expert_gate", False, "(Qwen2-MoE gates its shared expert)")
        if cfg.qk_norm:
            raise _unsupported("ModelConfig.qk_norm", True, "with a shared expert has no HF model")
        return "qwen2_moe"
    if cfg.qk_norm:
        return "qwen3_moe"
    if cfg.attention_bias:
        raise _unsupported("ModelConfig.attention_bias", True, "without a shared expert has no HF MoE model")
    if all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) and not m.router_pre_softmax \
            and m.ffn_hidden_size == cfg.ffn_hidden_size:
        return "mixtral"
    raise _unsupported("MoEConfig", "(layer pattern / router_pre_softmax / ffn sizes)",
                       "fits Mixtral only with every layer MoE, post-softmax routing and "
                       "moe.ffn_hidden_size == ffn_hidden_size; add qk_norm to export as Qwen3-MoE")


def config_to_hf(cfg: ModelConfig, arch: str | None = None) -> dict:
    arch = arch or pick_arch(cfg)
    act = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}[cfg.activation]
    names = {**DEEPSEEK_NAMES, "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "mistral": "MistralForCausalLM"}
    hf: dict[str, Any] = {
        "architectures": [names[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim_, "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "sliding_window": None,
        "use_sliding_window": False, "torch_dtype": "float32", "dtype": "float32",
    }
    if arch in DEEPSEEK:
        return {**hf, **deepseek_to_hf(cfg, arch)}
    if arch in ("qwen2", "qwen2_moe"):
        hf["qkv_bias"] = cfg.attention_bias
    m = cfg.moe
    if m is not None:
        hf.update(num_experts_per_tok=m.router_topk, router_aux_loss_coef=m.aux_loss_coeff,
                  output_router_logits=False)
        if arch == "mixtral":
            hf.update(num_local_experts=m.num_experts, router_jitter_noise=m.input_jitter_eps or 0.0)
        else:
            hf.update(num_experts=m.num_experts, num_local_experts=m.num_experts,
                      moe_intermediate_size=m.ffn_hidden_size, norm_topk_prob=not m.router_pre_softmax,
                      decoder_sparse_step=1,
                      mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)])
            if arch == "qwen2_moe":
                hf["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size
    return hf
