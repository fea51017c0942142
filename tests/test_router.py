"""TopKRouter: parameters, metadata, jitter, expert-bias state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.router import ExpertBias, TopKRouter
from moe_jax.routing import route


def model_cfg(**moe_kw):
    moe = dict(num_experts=8, router_topk=2, ffn_hidden_size=64)
    moe.update(moe_kw)
    return ModelConfig(d_model=32, num_heads=4, num_kv_heads=4, ffn_hidden_size=64,
                       init_std=0.5, moe=MoEConfig(**moe))


def x_TD(seed=0, T=12, D=32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(T, D)), jnp.float32)


def test_shapes_param_and_logits():
    cfg = model_cfg()
    router = TopKRouter(cfg, rngs=nnx.Rngs(0))
    w = router.w_DE
    assert isinstance(w, nnx.Param) and w.shape == (32, 8) and w.dtype == jnp.float32
    assert w.get_metadata()["logical_axes"] == ("embed", None)
    assert 0.3 < float(jnp.std(w[...])) < 0.7          # normal(init_std=0.5)
    assert router.expert_bias is None
    x = x_TD()
    r = router(x)
    assert r.weights.shape == (12, 2) and r.experts.shape == (12, 2)
    assert r.tokens_per_expert.shape == (8,) and "aux_loss" in r.losses
    ref = route(x @ w[...], cfg.moe)
    np.testing.assert_array_equal(r.experts, ref.experts)
    np.testing.assert_allclose(r.weights, ref.weights, rtol=1e-6)


def test_bf16_params_route_in_float32():
    cfg = ModelConfig(d_model=32, num_heads=4, num_kv_heads=4, ffn_hidden_size=64,
                      param_dtype="bfloat16", moe=MoEConfig(num_experts=8, ffn_hidden_size=64))
    router = TopKRouter(cfg, rngs=nnx.Rngs(1))
    assert router.w_DE.dtype == jnp.bfloat16
    logits = router.logits(x_TD().astype(jnp.bfloat16))
    assert logits.dtype == jnp.float32
    assert router(x_TD()).weights.dtype == jnp.float32


def test_jitter_only_with_rng():
    eps = 0.1
    cfg = model_cfg(input_jitter_eps=eps)
    router = TopKRouter(cfg, rngs=nnx.Rngs(0))
    x = x_TD(1)
    plain = router.logits(x)
    np.testing.assert_allclose(plain, x @ router.w_DE[...], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(router.logits(x, None), plain)
    jittered = router.logits(x, jax.random.key(3))
    assert not np.allclose(jittered, plain)
    noise = jax.random.uniform(jax.random.key(3), x.shape, jnp.float32, 1 - eps, 1 + eps)
    np.testing.assert_allclose(jittered, (x * noise) @ router.w_DE[...], rtol=1e-5, atol=1e-5)
    # through __call__: no rng -> same as no jitter; rng -> different logits
    a, b = router(x), router(x, rng=jax.random.key(4))
    np.testing.assert_array_equal(a.experts, route(plain, cfg.moe).experts)
    assert not np.allclose(a.weights, b.weights)
    # without input_jitter_eps an rng changes nothing
    r0 = TopKRouter(model_cfg(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(r0(x).weights, r0(x, rng=jax.random.key(4)).weights)


def test_expert_bias_state():
    cfg = model_cfg(router_enable_expert_bias=True, router_bias_update_rate=0.01,
                    router_score_function="sigmoid", router_load_balancing_type="none")
    router = TopKRouter(cfg, rngs=nnx.Rngs(0))
    assert isinstance(router.expert_bias, ExpertBias)
    assert not isinstance(router.expert_bias, nnx.Param)
    assert router.expert_bias.shape == (8,) and router.expert_bias.dtype == jnp.float32
    params = nnx.state(router, nnx.Param)
    assert len(jax.tree.leaves(params)) == 1              # only w_DE is trained
    assert len(jax.tree.leaves(nnx.state(router, ExpertBias))) == 1

    x = x_TD(2, T=64)
    r = router(x)
    router.update_bias(r.tokens_per_expert)
    counts = np.asarray(r.tokens_per_expert, np.float64)
    np.testing.assert_allclose(router.expert_bias[...], 0.01 * np.sign(counts.mean() - counts))
    # the bias is used for the choice only
    router.expert_bias[...] = jnp.zeros(8).at[6].set(10.0)
    rb = router(x)
    assert (np.asarray(rb.experts) == 6).any(-1).all()
    s = jax.nn.sigmoid(router.logits(x))
    chosen = jnp.take_along_axis(s, rb.experts, -1)
    np.testing.assert_allclose(rb.weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)


def test_nnx_jit_and_grad():
    cfg = model_cfg(router_load_balancing_type="seq_aux_loss", z_loss_coeff=1e-3)
    router = TopKRouter(cfg, rngs=nnx.Rngs(0))
    x = x_TD(3, T=16)

    @nnx.jit
    def loss(m, x):
        r = m(x, seq_len=8)
        return jnp.sum(r.weights ** 2) + sum(r.losses.values())

    grads = nnx.grad(loss)(router, x)
    g = grads.w_DE[...]
    assert g.shape == (32, 8) and np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError, match="seq_len"):
        router(x)


def test_needs_moe_config():
    with pytest.raises(ValueError, match="moe"):
        TopKRouter(ModelConfig(d_model=32, num_heads=4, num_kv_heads=4), rngs=nnx.Rngs(0))
