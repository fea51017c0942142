"""KV-cache decoding (`moe_jax.generate`): greedy output equals the argmax of full forward passes
(dense, MoE with a capacity that inference turns off, GQA), top-p sampling, refusals."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig, RopeScalingConfig
from moe_jax.evaluate import for_inference, inference_config
from moe_jax.generate import generate, nucleus_logits
from moe_jax.model import GPT

MOE = MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16, layer_freq=(0, 1),
                expert_capacity_factor=1.0, input_jitter_eps=0.1)


def cfg(moe=None, **kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                max_seq_len=32, init_std=0.3, moe=moe)
    return ModelConfig(**{**base, **kw})


def full_forward_argmax(model: GPT, seq: np.ndarray) -> np.ndarray:
    """argmax of one full (causal) forward pass at every position: position t's is the greedy
    choice after tokens 0..t."""
    return np.asarray(jnp.argmax(for_inference(model)(jnp.asarray(seq))[0], -1))


YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=4)  # 11 positions > 4


MLA = dict(attention_type="mla", num_kv_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=6, mtp_num_layers=1,  # MTP: off at inference
           rope_scaling=RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=4,
                                          mscale=1.0, mscale_all_dim=0.8))  # mscale: MLA's softmax scale


@pytest.mark.parametrize("c", [cfg(MOE, rope_scaling=YARN),  # GQA 4/2; layer 0 dense, layer 1 MoE; YaRN
                               cfg(MOE, **MLA),
                               pytest.param(cfg(num_kv_heads=1), marks=pytest.mark.slow)],
                         ids=["moe_gqa", "moe_mla_mtp", "dense_mqa"])
def test_greedy_equals_full_forward_argmax(c):
    model = GPT(c, rngs=nnx.Rngs(1))
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, (2, 5)).astype(np.int32)
    got = generate(model, prompt, 6, temperature=0.0)
    want = full_forward_argmax(model, np.concatenate([prompt, got], axis=1))[:, 4:-1]
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 1  # not a degenerate constant stream


def test_inference_config_is_dropless_and_keeps_weights():
    c = cfg(MOE)
    assert inference_config(c).moe.expert_capacity_factor is None
    assert inference_config(cfg()) == cfg()
    model = GPT(c, rngs=nnx.Rngs(0))
    inf = for_inference(model)
    assert inf.cfg.moe.expert_capacity_factor is None
    np.testing.assert_array_equal(np.asarray(inf.embed_VD[...]), np.asarray(model.embed_VD[...]))


def test_nucleus_keeps_the_smallest_top_set():
    probs = jnp.array([[0.05, 0.5, 0.15, 0.3]])
    kept = jnp.isfinite(nucleus_logits(jnp.log(probs), jnp.float32(0.7)))
    np.testing.assert_array_equal(np.asarray(kept), [[False, True, False, True]])
    kept = jnp.isfinite(nucleus_logits(jnp.log(probs), jnp.float32(1.0)))
    assert bool(kept.all())


def test_sampling_seeded_top_p_and_vocab_limit():
    model = GPT(cfg(MOE), rngs=nnx.Rngs(2))
    prompt = np.array([3, 7, 1], np.int32)
    a = generate(model, prompt, 8, temperature=1.0, top_p=0.9, rng=5, vocab_limit=40)
    b = generate(model, prompt, 8, temperature=1.0, top_p=0.9, rng=5, vocab_limit=40)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 8) and a.max() < 40
    # a tiny nucleus holds the most likely token only: greedy (below the limit)
    np.testing.assert_array_equal(generate(model, prompt, 8, temperature=1.0, top_p=1e-6, rng=1, vocab_limit=40),
                                  generate(model, prompt, 8, vocab_limit=40))
    # EOS: stop once every row has produced it
    assert generate(model, prompt, 8, rng=5, eos_id=int(a[0, 0]), temperature=1.0, top_p=0.9,
                    vocab_limit=40).shape == (1, 1)


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_ids=[1, 64]), r"prompt token id 64 \(position 1\) is outside the model's vocabulary \[0, 64\)"),
    (dict(prompt_ids=[]), "need at least one integer token id"),
    (dict(max_new_tokens=40), "exceeds the model's max_seq_len=32"),
    (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
    (dict(top_p=0.0), "top_p=0.0 is invalid"),
])
def test_refusals(kw, match):
    model = GPT(cfg(), rngs=nnx.Rngs(0))
    args = {"prompt_ids": [1, 2], "max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
