"""MLA (moe_jax.mla) against a plain per-head reference; RoPE scaling tables (moe_jax.rope)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig, RopeScalingConfig
from moe_jax.mla import MLAttention
from moe_jax.model import GPT
from moe_jax.rope import model_rope_tables, rope_tables, softmax_scale

YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=8, mscale=1.0,
                         mscale_all_dim=0.8)


def mla_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=3, ffn_hidden_size=48, max_seq_len=32,
                attention_type="mla", q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=5, init_std=0.3)
    base.update(kw)
    return ModelConfig(**base)


def rms(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w[None, :]


def rotate_half_rope(x_SY, cos_SY, sin_SY):
    h = x_SY.shape[-1] // 2
    return x_SY * cos_SY + jnp.concatenate([-x_SY[:, h:], x_SY[:, :h]], -1) * sin_SY


def naive_mla(p: dict, cfg: ModelConfig, x_BSD, cos, sin):
    """One head at a time: explicit scores, causal mask, softmax."""
    eps, z = cfg.norm_eps, cfg.qk_nope_head_dim
    scale = 1 / math.sqrt(z + cfg.qk_rope_head_dim)
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        f, m = cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim
        scale *= (0.1 * m * math.log(f) + 1) ** 2
    s = x_BSD.shape[1]
    mask = np.tril(np.ones((s, s), bool))
    outs = []
    for b in range(x_BSD.shape[0]):
        x = x_BSD[b]
        if "wq_DNH" in p:
            q_all = jnp.einsum("sd,dnh->snh", x, p["wq_DNH"])
        else:
            q_all = jnp.einsum("sq,qnh->snh", rms(x @ p["wq_a_DQ"], p["q_norm"]["scale"], eps), p["wq_b_QNH"])
        c = rms(x @ p["wkv_a_DC"], p["kv_norm"]["scale"], eps)
        k_rope = rotate_half_rope(x @ p["wk_rope_DY"], cos, sin)
        y = 0
        for n in range(cfg.num_heads):
            q = jnp.concatenate([q_all[:, n, :z], rotate_half_rope(q_all[:, n, z:], cos, sin)], -1)
            k = jnp.concatenate([c @ p["wk_b_CNZ"][:, n], k_rope], -1)
            v = c @ p["wv_b_CNU"][:, n]
            scores = jnp.where(mask, (q @ k.T) * scale, -jnp.inf)
            probs = jnp.exp(scores - scores.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
            y = y + (probs @ v) @ p["wo_NUD"][n]
        outs.append(y)
    return jnp.stack(outs)


@pytest.mark.parametrize("kw", [dict(rope_scaling=YARN), pytest.param(dict(q_lora_rank=None), marks=pytest.mark.slow)],
                         ids=["q_lora_yarn", "plain_q"])
def test_mla_matches_naive_reference(kw):
    cfg = mla_cfg(**kw)
    graphdef, state = nnx.split(MLAttention(cfg, rngs=nnx.Rngs(1)))
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    p = tree.unflatten([v + 0.1 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
    x = jax.random.normal(jax.random.key(3), (2, 7, cfg.d_model))
    cos, sin = model_rope_tables(cfg, 7)
    ours = lambda p, x: nnx.merge(graphdef, p)(x, cos, sin)  # noqa: E731

    ref = lambda p, x: naive_mla(p, cfg, x, cos, sin)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(p, x), jax.jit(ref)(p, x), rtol=2e-5, atol=2e-5)
    w = jax.random.normal(jax.random.key(4), (2, 7, cfg.d_model))
    g_ours = jax.jit(jax.grad(lambda p, x: jnp.sum(ours(p, x) * w), argnums=(0, 1)))(p, x)
    g_ref = jax.jit(jax.grad(lambda p, x: jnp.sum(ref(p, x) * w), argnums=(0, 1)))(p, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mla_gpt_causal_with_dense_first_layer():
    """A GPT of MLA blocks (first dense, then MoE) is causal and every parameter has logical axes."""
    cfg = mla_cfg(num_layers=2, moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16,
                                                   layer_freq=(0, 1)), init_std=0.02)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda t: nnx.merge(graphdef, state)(t)[0])
    a = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    b = a.at[:, 6:].set((a[:, 6:] + 5) % 64)
    la, lb = logits(a), logits(b)
    np.testing.assert_allclose(la[:, :6], lb[:, :6], atol=1e-6)
    assert not np.allclose(la[:, 6:], lb[:, 6:])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def test_rope_tables_linear_and_yarn_formula():
    dim, theta, s = 32, 10000.0, 12
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    cos, sin = rope_tables(s, dim, theta, RopeScalingConfig(type="linear", factor=4.0))
    ang = np.arange(s)[:, None] * (inv / 4.0)[None]
    np.testing.assert_allclose(cos, np.cos(np.concatenate([ang, ang], 1)), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(np.concatenate([ang, ang], 1)), atol=1e-6)
    # YaRN, written out from the paper's definitions (ramp over the correction dims, mscale on cos/sin)
    y = RopeScalingConfig(type="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=4.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5)
    corr = lambda r: dim * math.log(64 / (r * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    lo, hi = max(math.floor(corr(4.0)), 0), min(math.ceil(corr(1.0)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0, 1)
    inv_y = inv / 8.0 * ramp + inv * (1 - ramp)
    att = (0.1 * math.log(8.0) + 1) / (0.1 * 0.5 * math.log(8.0) + 1)
    ang = np.arange(s)[:, None] * inv_y[None]
    cos, sin = rope_tables(s, dim, theta, y)
    np.testing.assert_allclose(cos, att * np.cos(np.concatenate([ang, ang], 1)), atol=1e-6)
    np.testing.assert_allclose(sin, att * np.sin(np.concatenate([ang, ang], 1)), atol=1e-6)
    assert 0 < lo < hi < dim // 2  # the ramp is exercised
    cfg = mla_cfg(rope_scaling=y)
    assert softmax_scale(cfg, 10) == pytest.approx(10 ** -0.5 * (0.1 * 0.5 * math.log(8.0) + 1) ** 2)


@pytest.mark.parametrize("kw, match", [
    (dict(kv_lora_rank=None), "kv_lora_rank"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(attention_type="mqa"), "attention_type"),
    (dict(head_dim=8), "head_dim"),
    (dict(attention_type="gqa", num_kv_heads=3), "q_lora_rank"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor"),
    (dict(mtp_num_layers=-1), "mtp_num_layers"),
])
def test_mla_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        mla_cfg(**kw)


@pytest.mark.slow
def test_gqa_with_linear_rope_scaling_runs():
    cfg = dataclasses.replace(mla_cfg(), attention_type="gqa", q_lora_rank=None, kv_lora_rank=None,
                              qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None, num_heads=4,
                              num_kv_heads=2, rope_scaling=RopeScalingConfig(type="linear", factor=2.0))
    logits, _ = GPT(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 8), jnp.int32))
    assert logits.shape == (1, 8, 64) and bool(jnp.all(jnp.isfinite(logits)))


def test_rope_scaling_overrides_and_round_trip():
    from moe_jax.presets import build_config, load_config, to_dict
    cfg = load_config("tiny_moe", ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                                   "model.rope_scaling.original_max_position_embeddings=64"])
    assert cfg.model.rope_scaling == RopeScalingConfig(type="yarn", factor=4, original_max_position_embeddings=64)
    assert build_config(to_dict(cfg)) == cfg
    assert load_config("tiny_moe", ["model.rope_scaling=null"]).model.rope_scaling is None
    with pytest.raises(ValueError, match="rope_scaling.factr"):
        load_config("tiny_moe", ["model.rope_scaling.factr=4"])


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [(64, 32, 64), (128, 64, 128)], ids=["h96", "deepseek_h192"])
def test_mla_cudnn_matches_xla_bf16(dims):
    """cuDNN flash attention (v zero-padded to the q/k head dim) against XLA, forward and gradients."""
    z, y, u = dims
    cfg = mla_cfg(d_model=256, num_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=z,
                  qk_rope_head_dim=y, v_head_dim=u, dtype="bfloat16", init_std=0.05)
    graphdef, state = nnx.split(MLAttention(dataclasses.replace(cfg, attention_impl="cudnn"), rngs=nnx.Rngs(0)))
    graphdef_x, _ = nnx.split(MLAttention(dataclasses.replace(cfg, attention_impl="xla"), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 512, cfg.d_model), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (2, 512, cfg.d_model), jnp.float32)
    cos, sin = model_rope_tables(cfg, 512)

    def loss(g):
        return lambda st, x: jnp.sum(nnx.merge(g, st)(x, cos, sin).astype(jnp.float32) * w)

    g1, g2 = (jax.jit(jax.grad(loss(g), argnums=(0, 1)))(state, x) for g in (graphdef, graphdef_x))
    fwd = [jax.jit(lambda st, x, g=g: nnx.merge(g, st)(x, cos, sin)) for g in (graphdef, graphdef_x)]
    assert "cudnn" in fwd[0].lower(state, x).as_text().lower()  # the cuDNN path, not a silent XLA fallback

    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    assert rel(fwd[0](state, x), fwd[1](state, x)) < 2e-2
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel(a, b) < 3e-2


def test_deepseek_v3_small_attention_params_and_flops():
    from moe_jax import metrics
    from moe_jax.presets import load_config
    cfg = load_config("deepseek_v3_small").model
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    attn = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model.mtp[0].block.attn, nnx.Param)))
    d, n = 2048, 16
    assert attn == (d * 768 + 768 + 768 * n * 192          # query latent, its norm, per-head q
                    + d * 512 + 512 + d * 64                # key/value latent, its norm, shared rotary key
                    + 512 * n * (128 + 128) + n * 128 * d)  # per-head k_nope and v, output
    active = metrics.param_counts(model)["active"]
    assert metrics.flops_per_token(cfg, active, 2048) == (6 * active + 3 * 9 * 2048 * n * (192 + 128)
                                                          + 6 * d * 32000)
