"""Hugging Face `config.json` <-> `ModelConfig` for Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE and
Qwen3-MoE; fields we cannot represent exactly fail with a ValueError naming them."""
from __future__ import annotations

from typing import Any

from moe_jax.config import MoEConfig, ModelConfig

DENSE = ("llama", "mistral", "qwen2", "qwen3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED = DENSE + MOE
ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"Hugging Face config field {field}={value!r} is not supported: {why}")


class _Fields(dict):
    """A config.json mapping whose missing required fields raise a ValueError naming them."""

    def __missing__(self, key):
        raise ValueError(f"Hugging Face config lacks the required field {key!r}")


def _rope_theta(hf: dict) -> float:
    """RoPE theta, read as transformers (5.x) reads it: a non-empty `rope_scaling` (the older name)
    takes precedence over `rope_parameters`; either may be nested per layer type; any rope_type other
    than 'default' is refused."""
    name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rp = hf.get(name) or {}
    if not isinstance(rp, dict):
        raise _bad(name, rp, "must be a mapping")
    nested = [v for v in rp.values() if isinstance(v, dict)]
    thetas = set()
    for params in nested or [rp]:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _bad(f"{name}.rope_type", kind, "only 'default' RoPE is implemented (no RoPE scaling)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _bad(f"{name}.partial_rotary_factor", params["partial_rotary_factor"], "must be 1.0")
        thetas.add(float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if len(thetas) > 1:
        raise _bad(f"{name}.rope_theta", sorted(thetas), "one RoPE theta for every layer is implemented")
    return thetas.pop()


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
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n_layers, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None, ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=max_len, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf), activation=ACTS[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype,
        attention_bias=(mt == "qwen2") or (mt == "qwen2_moe" and hf.get("qkv_bias", True)),
        qk_norm=mt in ("qwen3", "qwen3_moe"), moe=moe)


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"cannot export to Hugging Face: {field}={value!r} {why}")


def pick_arch(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that represents `cfg` exactly."""
    if cfg.norm != "rmsnorm":
        raise _unsupported("ModelConfig.norm", cfg.norm, "(HF Llama-family models use RMSNorm)")
    if cfg.activation not in ("swiglu", "geglu"):
        raise _unsupported("ModelConfig.activation", cfg.activation, "(must be swiglu or geglu)")
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
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "mistral": "MistralForCausalLM"}
    hf: dict[str, Any] = {
        "architectures": [names[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim_, "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "sliding_window": None,
        "use_sliding_window": False, "torch_dtype": "float32", "dtype": "float32",
    }
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
