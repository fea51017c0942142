"""Hugging Face interop: tiny random HF models (built locally with transformers) load into our GPT with
matching fp32 logits, and our export loads back into transformers with matching logits."""
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_jax.convert.hf import config_from_hf, load_hf, save_hf  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(  # 12 tokens > 8 positions
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, mscale=0.9,
        mscale_all_dim=0.7))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters=dict(  # linear RoPE scaling
        rope_type="linear", rope_theta=10000.0, factor=3.0))),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[0])),
    "qwen2_moe_top1": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(  # unnormalised top-1 weight
        num_experts=4, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        head_dim=16)),
}


def hf_model(arch, seed=0):
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # every tensor random (HF zero-inits biases and Qwen2-MoE's router)
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def ours_logits(model, tokens):
    return np.asarray(model(jnp.asarray(tokens))[0], np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_load_and_save_match_transformers(arch, tmp_path):
    hf = hf_model(arch)
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))
    ref = hf_logits(hf, tokens)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if arch == "mixtral" else "1GB")
    if arch == "mixtral":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded checkpoint
    cfg, model = load_hf(tmp_path / "hf")
    if "moe" in arch or arch == "mixtral":
        assert cfg.moe is not None and cfg.moe.num_experts == 4
    assert rel_err(ours_logits(model, tokens), ref) < 1e-4

    save_hf(model, cfg, tmp_path / "ours")
    back = getattr(transformers, "AutoModelForCausalLM").from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == ARCHS[arch][1] or arch == "mistral"
    assert rel_err(hf_logits(back, tokens), ref) < 1e-4


def test_routing_semantics_map_to_moe_config():
    base = dict(COMMON, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=16)
    q2 = config_from_hf(dict(base, model_type="qwen2_moe", norm_topk_prob=False,
                             shared_expert_intermediate_size=8, decoder_sparse_step=2))
    assert q2.moe.router_pre_softmax and q2.moe.shared_expert_gate and q2.attention_bias
    assert q2.moe.layer_freq == (0, 1)  # Qwen's (i+1) % step == 0
    q3 = config_from_hf(dict(base, model_type="qwen3_moe", norm_topk_prob=True))
    assert not q3.moe.router_pre_softmax and q3.qk_norm and q3.moe.layer_freq == 1
    mx = config_from_hf(dict(COMMON, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2))
    assert not mx.moe.router_pre_softmax and mx.moe.ffn_hidden_size == 48


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt2", "model_type='gpt2'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0}, "rope_type='llama3'"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type='dynamic'"),
    ("sliding_window", 16, "sliding_window=16"),
    ("hidden_act", "relu", "hidden_act='relu'"),
    ("mlp_bias", True, "mlp_bias"),
    ("attention_bias", True, "attention_bias"),
])
def test_unsupported_fields_are_named(field, value, match):
    hf = dict(COMMON, model_type="mistral")
    hf[field] = value
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_unknown_tensor_is_named(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    t = load_file(tmp_path / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf(tmp_path)


def test_export_rejects_what_hf_cannot_express():
    from moe_jax.presets import load_config
    cfg = load_config("tiny_moe", ["moe.router_score_function=sigmoid"]).model
    with pytest.raises(ValueError, match="router_score_function"):
        save_hf(None, cfg, "/nonexistent/never-written")


def test_upcycle_from_hf_llama(tmp_path, capsys):
    """experiments/upcycle.py --hf: a HF Llama becomes an MoE checkpoint with the same step-0 logits."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "upcycle_cli", Path(__file__).parent.parent / "experiments" / "upcycle.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    rc = cli.main(["--hf", str(tmp_path / "hf"), "--config", "tiny_moe", "--out", str(tmp_path / "moe"),
                   "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=24",
                   "moe.layer_freq=1", "train.seq_len=16"])
    printed = capsys.readouterr().out
    assert rc == 0 and "G=2 (48/24)" in printed, printed
    assert float(printed.split("relative ")[1].split(")")[0]) < 1e-5
    from moe_jax.runs import load_model
    cfg, model = load_model(tmp_path / "moe")
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))
    assert rel_err(ours_logits(model, tokens), hf_logits(hf, tokens)) < 1e-4
