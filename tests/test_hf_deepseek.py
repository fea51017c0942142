"""DeepSeek-V2/V3 Hugging Face interop: tiny random transformers models (MLA, group-limited routing, shared
experts, expert bias, YaRN) load into our GPT with matching fp32 logits, our export loads back into
transformers with the same logits, and the MTP modules DeepSeek stores after the last layer survive
load_hf -> save_hf byte for byte."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from moe_jax.convert.hf import load_hf, save_hf  # noqa: E402
from moe_jax.convert.hf_config import config_from_hf, config_to_hf  # noqa: E402
from test_hf import hf_logits, ours_logits, rel_err  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=1, max_position_embeddings=64)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
            beta_fast=32.0, beta_slow=1.0)
V3 = dict(n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
          routed_scaling_factor=2.5, norm_topk_prob=True)
V2 = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, routed_scaling_factor=1.5)
CASES = {  # name: (model_type, extra config)
    "v3": ("deepseek_v3", V3),
    "v3_no_q_lora_yarn": ("deepseek_v3", dict(V3, q_lora_rank=None, rope_parameters=dict(
        YARN, mscale=1.0, mscale_all_dim=1.0))),
    "v3_not_interleaved_yarn_mscale": ("deepseek_v3", dict(V3, rope_interleave=False, rope_parameters=dict(
        YARN, mscale=0.9, mscale_all_dim=0.7))),
    "v2_group_limited_yarn": ("deepseek_v2", dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                  rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    "v2_greedy_no_q_lora": ("deepseek_v2", dict(V2, q_lora_rank=None, first_k_dense_replace=0)),
    # group scores that k // topk_group does not give: V3's top-2 sum with k=2 of 2 groups, V2's best
    # expert with k=4 of 2 groups (router_group_score_topk 2 and 1)
    "v3_k2_two_groups": ("deepseek_v3", dict(V3, num_experts_per_tok=2)),
    "v2_full_group_limited": ("deepseek_v2", dict(V2, num_experts_per_tok=4, topk_method="group_limited_greedy",
                                                  n_group=4, topk_group=2)),
}
CLASSES = {"deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
           "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM")}


def hf_model(mt, extra, seed=0, **over):
    cfg_cls, model_cls = CLASSES[mt]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # every tensor random, the V3 router's score-correction bias included
        for p in model.parameters():
            p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


TOKENS = np.random.default_rng(0).integers(0, V, (2, 20))  # 20 > YaRN's original 8 positions


@pytest.mark.parametrize("case", list(CASES))
def test_deepseek_load_and_save_match_transformers(case, tmp_path):
    mt, extra = CASES[case]
    hf = hf_model(mt, extra)
    ref = hf_logits(hf, TOKENS)
    hf.save_pretrained(tmp_path / "hf")  # V3: config.json names an MTP layer (transformers' default), no tensors
    if mt == "deepseek_v3":
        with pytest.warns(UserWarning, match="MTP layers but the checkpoint holds none"):
            cfg, model = load_hf(tmp_path / "hf")
    else:
        cfg, model = load_hf(tmp_path / "hf")
    assert cfg.attention_type == "mla" and cfg.moe.num_experts == 8 and cfg.mtp_num_layers == 0
    assert (cfg.q_lora_rank is None) == ("no_q_lora" in case)
    assert (cfg.rope_scaling is not None) == ("yarn" in case)
    assert rel_err(ours_logits(model, TOKENS), ref) < 1e-4

    save_hf(model, cfg, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == CLASSES[mt][1]
    assert rel_err(hf_logits(back, TOKENS), ref) < 1e-4


def _with_mtp(tmp_path):
    """A DeepSeek-V3 checkpoint with one MTP module stored as DeepSeek does (`model.layers.2.*`): its
    block is layer 2 of a 3-layer model of the same config, its embed/head copies of the main ones."""
    hf = hf_model("deepseek_v3", V3)
    hf.save_pretrained(tmp_path / "hf")
    hf_model("deepseek_v3", V3, seed=1, num_hidden_layers=3).save_pretrained(tmp_path / "donor")
    donor = load_file(tmp_path / "donor" / "model.safetensors")  # the on-disk layout: one tensor per expert
    t = load_file(tmp_path / "hf" / "model.safetensors")
    rng = np.random.default_rng(1)
    t.update({k: v for k, v in donor.items() if k.startswith("model.layers.2.")})
    d = COMMON["hidden_size"]
    t.update({"model.layers.2.enorm.weight": rng.normal(size=d).astype(np.float32),
              "model.layers.2.hnorm.weight": rng.normal(size=d).astype(np.float32),
              "model.layers.2.eh_proj.weight": rng.normal(0, 0.1, (d, 2 * d)).astype(np.float32),
              "model.layers.2.shared_head.norm.weight": rng.normal(size=d).astype(np.float32),
              "model.layers.2.shared_head.head.weight": t["lm_head.weight"],
              "model.layers.2.embed_tokens.weight": t["model.embed_tokens.weight"]})
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    return hf, t


def test_mtp_modules_survive_load_and_save(tmp_path):
    hf, tensors = _with_mtp(tmp_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    cfg, model = load_hf(tmp_path / "hf")
    assert cfg.mtp_num_layers == 1
    assert rel_err(ours_logits(model, TOKENS), hf_logits(hf, TOKENS)) < 1e-4  # logits: main head only
    save_hf(model, cfg, tmp_path / "ours")
    back = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(back) == sorted(tensors)
    mtp = [k for k in tensors if k.startswith("model.layers.2.")]
    assert len(mtp) > 20
    for k in mtp:
        assert back[k].tobytes() == tensors[k].tobytes(), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()  # ignores MTP
    assert rel_err(hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS)) < 1e-4


def test_mtp_copy_of_the_head_must_match(tmp_path):
    _, t = _with_mtp(tmp_path)
    t["model.layers.2.shared_head.head.weight"] = t["lm_head.weight"] + 1
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shared_head.head.weight"):
        load_hf(tmp_path / "hf")


def test_router_fields_map_both_ways():
    hf = dict(COMMON, model_type="deepseek_v3", **V3)
    cfg = config_from_hf(hf)
    m = cfg.moe
    assert (m.router_score_function, m.router_enable_expert_bias, m.router_num_groups, m.router_group_topk,
            m.router_topk_scaling_factor, m.shared_expert_intermediate_size, m.layer_freq) == \
        ("sigmoid", True, 4, 2, 2.5, 16, (0, 1))
    back = config_to_hf(cfg)
    for k in ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "n_shared_experts",
              "norm_topk_prob", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        assert back[k] == hf[k], k
    v2 = config_from_hf(dict(COMMON, model_type="deepseek_v2", **V2)).moe
    assert (v2.router_score_function, v2.router_pre_softmax, v2.router_num_groups) == ("softmax", True, None)
    assert config_to_hf(config_from_hf(dict(COMMON, model_type="deepseek_v2", **V2)))["model_type"] == "deepseek_v2"


# the published config.json files (weights' quantization_config left out)
DEEPSEEK_V3_JSON = dict(
    architectures=["DeepseekV3ForCausalLM"], aux_loss_alpha=0.001, ep_size=1, first_k_dense_replace=3,
    hidden_act="silu", hidden_size=7168, intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840,
    model_type="deepseek_v3", moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256,
    n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
    num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, rms_norm_eps=1e-06, rope_scaling=dict(
        beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096,
        type="yarn"), rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid", seq_aux=True,
    tie_word_embeddings=False, topk_group=4, topk_method="noaux_tc", v_head_dim=128, vocab_size=129280)
DEEPSEEK_V2_LITE_JSON = dict(
    architectures=["DeepseekV2ForCausalLM"], aux_loss_alpha=0.001, first_k_dense_replace=1, hidden_act="silu",
    hidden_size=2048, intermediate_size=10944, kv_lora_rank=512, max_position_embeddings=163840,
    model_type="deepseek_v2", moe_intermediate_size=1408, moe_layer_freq=1, n_group=1, n_routed_experts=64,
    n_shared_experts=2, norm_topk_prob=False, num_attention_heads=16, num_experts_per_tok=6, num_hidden_layers=27,
    num_key_value_heads=16, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-06,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=4096, type="yarn"), rope_theta=10000,
    routed_scaling_factor=1.0, scoring_func="softmax", seq_aux=True, tie_word_embeddings=False, topk_group=1,
    topk_method="greedy", v_head_dim=128, vocab_size=102400)


def test_published_deepseek_configs_map():
    v3 = config_from_hf(DEEPSEEK_V3_JSON)
    m = v3.moe
    assert (v3.num_layers, v3.q_lora_rank, v3.mtp_num_layers, v3.rope_scaling.factor, v3.rope_scaling.mscale_all_dim,
            m.num_experts, m.router_topk, m.router_num_groups, m.router_group_topk, m.router_topk_scaling_factor,
            m.shared_expert_intermediate_size, m.layer_freq[:4], m.router_load_balancing_type) == \
        (61, 1536, 1, 40.0, 1.0, 256, 8, 8, 4, 2.5, 2048, (0, 0, 0, 1), "seq_aux_loss")
    assert config_from_hf(config_to_hf(v3)) == v3
    lite = config_from_hf(DEEPSEEK_V2_LITE_JSON)
    assert (lite.q_lora_rank, lite.moe.router_pre_softmax, lite.moe.router_num_groups, lite.mtp_num_layers) == \
        (None, True, None, 0)
    assert config_from_hf(config_to_hf(lite)) == lite
    with pytest.raises(ValueError, match="quantization_config='fp8'"):
        config_from_hf(dict(DEEPSEEK_V3_JSON, quantization_config={"quant_method": "fp8"}))


def test_dense_mla_and_mtp_config_round_trips():
    from moe_jax.config import ModelConfig
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, ffn_hidden_size=48, norm_eps=1e-6,
                      attention_type="mla", q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, mtp_num_layers=2, max_seq_len=64)
    hf = config_to_hf(cfg)
    assert (hf["model_type"], hf["first_k_dense_replace"], hf["num_nextn_predict_layers"]) == ("deepseek_v3", 2, 2)
    assert config_from_hf(hf) == cfg


@pytest.mark.parametrize("mt,field,value,match", [
    ("deepseek_v3", "topk_group", 1, "topk_group=1"),              # 1 group of 2 experts cannot hold k=4
    ("deepseek_v3", "norm_topk_prob", False, "norm_topk_prob=False"),
    ("deepseek_v3", "scoring_func", "softmax", "scoring_func='softmax'"),
    ("deepseek_v3", "topk_method", "greedy", "topk_method='greedy'"),
    ("deepseek_v3", "moe_layer_freq", 2, "moe_layer_freq=2"),
    ("deepseek_v3", "num_key_value_heads", 2, "num_key_value_heads=2"),
    ("deepseek_v3", "attention_bias", True, "attention_bias=True"),
    ("deepseek_v3", "rms_norm_eps", 1e-5, "rms_norm_eps=1e-05"),
    ("deepseek_v3", "rope_parameters", dict(YARN, attention_factor=1.2), "attention_factor=1.2"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    ("deepseek_v2", "norm_topk_prob", True, "norm_topk_prob=True"),
    ("deepseek_v2", "topk_method", "noaux_tc", "topk_method='noaux_tc'"),
])
def test_unsupported_deepseek_fields_are_named(mt, field, value, match):
    hf = dict(COMMON, model_type=mt, **(V3 if mt == "deepseek_v3" else V2))
    hf[field] = value
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_mtp_module_matches_a_torch_computation(tmp_path):
    """The loaded MTP module computes DeepSeek's h' = block(eh_proj([enorm(e); hnorm(h)])), logits =
    head(shared_head.norm(h')) as transformers' own modules (the donor's layer 2) do."""
    from moe_jax.rope import model_rope_tables
    hf, t = _with_mtp(tmp_path)
    cfg, model = load_hf(tmp_path / "hf")
    e_tok = np.random.default_rng(2).integers(0, V, TOKENS.shape)

    h, _ = model.trunk(jnp.asarray(TOKENS))
    cos, sin = model_rope_tables(cfg, TOKENS.shape[1])
    _, normed, _ = model.mtp[0](h, jnp.take(model.embed_VD[...], jnp.asarray(e_tok), axis=0), cos, sin)
    ours = np.asarray(normed @ model.head())

    donor = hf_model("deepseek_v3", V3, seed=1, num_hidden_layers=3)  # the same block weights as layer 2
    norm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm
    p = "model.layers.2."
    with torch.no_grad():
        seen = []  # the last layer's output: the final norm's input
        hook = hf.model.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        hf(torch.from_numpy(TOKENS).long())
        hook.remove()
        h_t = seen[0]
        n = {k: norm(32) for k in ("enorm", "hnorm", "shared_head.norm")}
        for k, m in n.items():
            m.weight.copy_(torch.from_numpy(t[p + k + ".weight"]))
        e = hf.model.embed_tokens(torch.from_numpy(e_tok).long())
        x = torch.cat([n["enorm"](e), n["hnorm"](h_t)], dim=-1) @ torch.from_numpy(t[p + "eh_proj.weight"]).T
        pos = torch.arange(TOKENS.shape[1])[None]
        x = donor.model.layers[2](x, position_embeddings=hf.model.rotary_emb(x, pos), position_ids=pos)
        ref = hf.lm_head(n["shared_head.norm"](x)).numpy()
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.slow  # ~20 s on 2 shared cores
def test_tiny_deepseek_v3_preset_exports_to_transformers(tmp_path):
    """Our own DeepSeek-V3 model (the preset, with the two settings HF needs; every parameter and the
    expert bias random) -> save_hf -> transformers: the same logits; load_hf gives back the same state,
    MTP module included."""
    import jax
    from flax import nnx

    from moe_jax.model import GPT
    from moe_jax.presets import load_config
    cfg = load_config("tiny_deepseek_v3").model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), state)
    model = nnx.merge(graphdef, state)
    save_hf(model, cfg, tmp_path / "ours")
    hf_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (hf_cfg["model_type"], hf_cfg["num_nextn_predict_layers"], hf_cfg["first_k_dense_replace"]) == \
        ("deepseek_v3", 1, 1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = TOKENS % cfg.vocab_size
    ours = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens))
    assert rel_err(hf_logits(back, tokens), np.asarray(ours)) < 1e-4
    cfg2, model2 = load_hf(tmp_path / "ours")
    assert cfg2.mtp_num_layers == 1 and cfg2.moe.router_group_topk == 1
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(model2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
