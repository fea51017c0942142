"""RoPE scaling against transformers: our tables (`moe_jax.rope`) equal `ROPE_INIT_FUNCTIONS` and the
rotary embedding's cos/sin for YaRN (mscale / mscale_all_dim variants) and linear scaling, and the Hugging
Face `rope_parameters` map to our `RopeScalingConfig` and back."""
import numpy as np
import pytest

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from moe_jax.convert.hf_config import config_from_hf, config_to_hf, rope_from_hf  # noqa: E402
from moe_jax.rope import inv_freq_and_factor, rope_tables  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32)
SCALINGS = {
    "yarn": YARN,
    "yarn_betas": dict(YARN, beta_fast=16.0, beta_slow=2.0, rope_theta=500000.0),
    "yarn_mscale": dict(YARN, mscale=0.8, mscale_all_dim=0.6),
    "yarn_mscale_equal": dict(YARN, mscale=1.0, mscale_all_dim=1.0),   # DeepSeek-V3's: factor 1 on cos/sin
    "yarn_mscale_only": dict(YARN, mscale=0.707),                      # transformers ignores it alone
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_tables_match_transformers(name):
    hf_cfg = transformers.LlamaConfig(**BASE, rope_parameters=dict(SCALINGS[name]))
    theta, scaling = rope_from_hf(hf_cfg.to_dict())
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    want_inv, want_factor = ROPE_INIT_FUNCTIONS[SCALINGS[name]["rope_type"]](hf_cfg, "cpu")
    got_inv, got_factor = inv_freq_and_factor(head_dim, theta, scaling)
    np.testing.assert_allclose(np.asarray(got_inv), want_inv.numpy(), rtol=1e-6)
    assert got_factor == pytest.approx(want_factor, rel=1e-7)

    seq = 200  # past original_max_position_embeddings
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    x = torch.zeros(1, seq, head_dim)
    cos, sin = rotary(x, torch.arange(seq)[None])
    got_cos, got_sin = rope_tables(seq, head_dim, theta, scaling)
    np.testing.assert_allclose(np.asarray(got_cos), cos[0].numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_sin), sin[0].numpy(), atol=2e-5)


def test_rope_scaling_round_trips_through_config_json():
    for name, params in SCALINGS.items():
        cfg = config_from_hf(dict(BASE, model_type="llama", rope_parameters=dict(params)))
        back = config_from_hf(config_to_hf(cfg))
        assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == cfg.rope_theta, name


def test_legacy_rope_scaling_key_and_top_level_theta():
    """DeepSeek's own config.json: `rope_scaling` with `type`, `rope_theta` at the top level."""
    theta, s = rope_from_hf(dict(BASE, rope_theta=5e4, rope_scaling=dict(
        type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
        mscale_all_dim=1.0)))
    assert theta == 5e4 and (s.type, s.factor, s.original_max_position_embeddings, s.mscale_all_dim) == \
        ("yarn", 40.0, 4096, 1.0)


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "llama3", "factor": 8.0}, "rope_type='llama3'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    (dict(YARN, truncate=False), "truncate=False"),
    (dict(YARN, attention_factor=0.5), "attention_factor=0.5"),
    ({"rope_type": "linear", "factor": 2.0, "mscale": 1.0}, "mscale=1.0"),
    ({k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}, "original_max_position_embeddings"),
])
def test_unsupported_rope_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(dict(BASE, model_type="llama", rope_parameters=params))
