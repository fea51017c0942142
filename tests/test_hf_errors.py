"""Hugging Face load errors name the file, field or tensor (no torch needed: the checkpoint is our own
export of a tiny Llama, then damaged)."""
import json
import shutil

import pytest
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.convert.hf import load_hf, save_hf
from moe_jax.convert.hf_config import config_from_hf
from moe_jax.model import GPT

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                  max_seq_len=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    save_hf(GPT(CFG, rngs=nnx.Rngs(0)), CFG, path)
    return path


def _variant(exported, tmp_path, edit=None, text=None, damage=None):
    d = tmp_path / "m"
    shutil.copytree(exported, d)
    cfg = json.loads((d / "config.json").read_text())
    if edit:
        edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg) if text is None else text)
    if damage:
        damage(d / "model.safetensors")
    return d


def _cut(fraction):
    return lambda p: p.write_bytes(p.read_bytes()[:int(p.stat().st_size * fraction)])


@pytest.mark.parametrize("edit,text,damage,match", [
    (lambda c: c.update(hidden_size=64), None, None,
     r"tensor model.embed_tokens.weight in .*model.safetensors has shape \(64, 32\), but config.json implies "
     r"\(64, 64\)"),
    (lambda c: c.update(vocab_size=100), None, None, r"embed_tokens.weight .* implies \(100, 32\)"),
    (lambda c: c.update(intermediate_size=40), None, None, r"mlp.gate_proj.weight .* implies \(40, 32\)"),
    (lambda c: c.update(num_key_value_heads=0), None, None,
     r"config.json: .*num_key_value_heads=0 .*must be a positive integer"),
    (lambda c: c.pop("intermediate_size"), None, None,
     r"config.json: Hugging Face config lacks the required field 'intermediate_size'"),
    (lambda c: c.pop("hidden_size"), None, None, r"lacks the required field 'hidden_size'"),
    (None, "{not json", None, r"m/config.json is not valid JSON"),
    (None, "[1, 2]", None, r"m/config.json must hold a JSON object"),
    (None, None, _cut(0.01), r"m/model.safetensors is not a readable safetensors file"),
    (None, None, _cut(0.66), r"m/model.safetensors is not a readable safetensors file"),
    (lambda c: c.update(rope_scaling={"rope_type": "longrope", "factor": 2.0}), None, None,
     r"rope_scaling.rope_type='longrope' is not supported"),
])
def test_load_hf_errors_name_file_field_or_tensor(exported, tmp_path, edit, text, damage, match):
    with pytest.raises(ValueError, match=match):
        load_hf(_variant(exported, tmp_path, edit, text, damage))


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """transformers 5 reads a non-empty `rope_scaling` in place of `rope_parameters`: so do we (it was
    ignored when both were present)."""
    hf = dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=48, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert config_from_hf(hf).rope_theta == 10000.0
    hf["rope_scaling"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert config_from_hf(hf).rope_theta == 500000.0
    hf["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    assert config_from_hf(hf).rope_scaling.factor == 4.0
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match=r"lacks the required field 'rope_scaling.original_max_position_emb"):
        config_from_hf(hf)


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*not a Hugging Face checkpoint"):
        load_hf(tmp_path)
