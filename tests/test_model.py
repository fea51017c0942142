import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import metrics
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.presets import load_config
from moe_jax.model import GPT, apply_rope, rope_tables


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                max_seq_len=32, moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16,
                                              layer_freq=(0, 1, 1), z_loss_coeff=1e-3))
    base.update(kw)
    return ModelConfig(**base)


def tokens(b=2, s=16, v=64, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, v)


def test_forward_shapes_and_aux():
    cfg = small_cfg()
    model = GPT(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens())
    assert logits.shape == (2, 16, 64) and bool(jnp.all(jnp.isfinite(logits)))
    assert [b.is_moe for b in model.layers()] == [False, True, True]
    assert aux["tokens_per_expert"].shape == (2, 4)
    assert set(aux["losses"]) == {"aux_loss", "z_loss"}
    # summed over the MoE layers: recompute layer by layer
    x = jnp.take(model.embed_VD[...], tokens(), axis=0)
    cos, sin = rope_tables(16, cfg.head_dim_, cfg.rope_theta)
    total = 0.0
    for block in model.layers():
        x, a = block(x, cos, sin)
        if a is not None:
            total += a["losses"]["aux_loss"]
    np.testing.assert_allclose(aux["losses"]["aux_loss"], total, rtol=1e-6)
    np.testing.assert_array_equal(aux["tokens_per_expert"].sum(-1), 2 * 16 * 2)


def test_causal():
    """Changing tokens at positions >= p leaves the logits before p unchanged (dropless routing)."""
    model = GPT(small_cfg(), rngs=nnx.Rngs(0))
    a = tokens(seed=1)
    p = 9
    b = a.at[:, p:].set((a[:, p:] + 7) % 64)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(la[:, :p], lb[:, :p], atol=1e-6)
    assert not np.allclose(la[:, p:], lb[:, p:])


def test_rope_is_relative():
    """q·k after RoPE depends only on the position difference."""
    h = 8
    cos, sin = rope_tables(20, h, 10000.0)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, h))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, h))
    dot = lambda i, j: float(jnp.sum(apply_rope(q, cos[i:i + 1], sin[i:i + 1])  # noqa: E731
                                     * apply_rope(k, cos[j:j + 1], sin[j:j + 1])))
    assert abs(dot(3, 1) - dot(15, 13)) < 1e-5 and abs(dot(3, 1) - dot(3, 2)) > 1e-4


def test_every_param_has_logical_axes():
    model = GPT(small_cfg(moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16,
                                        shared_expert_intermediate_size=24, shared_expert_gate=True)),
                rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def test_tied_embeddings_dense_and_layernorm():
    cfg = small_cfg(tie_embeddings=True, moe=None, norm="layernorm")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert model.head_DV is None
    logits, aux = model(tokens())
    assert aux == {"losses": {}}
    x = jnp.take(model.embed_VD[...], tokens(), axis=0)
    cos, sin = rope_tables(16, cfg.head_dim_, cfg.rope_theta)
    for block in model.layers():
        x, _ = block(x, cos, sin)
    np.testing.assert_allclose(logits, model.final_norm(x) @ model.embed_VD[...].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_bias,mode", [(False, True), (True, True), (True, "selective")])
def test_remat_same_loss_and_grads(expert_bias, mode):
    """Also with the non-Param state traced (as in the train step, under jit): remat with an
    aux-loss-free ExpertBias raised TraceContextError on the deepseek_small preset."""
    cfg = small_cfg()
    if expert_bias:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
            cfg.moe, router_score_function="sigmoid", router_enable_expert_bias=True))
    graphdef, params, rest = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    graphdef_r, _, _ = nnx.split(GPT(dataclasses.replace(cfg, remat=mode), rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, rest, g):
        return jnp.mean(nnx.merge(g, p, rest)(tokens())[0] ** 2)

    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, rest, graphdef)
    l2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, rest, graphdef_r)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_jit_under_one_device_mesh():
    model = GPT(small_cfg(), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens())
    eager, _ = model(tokens())
    np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,total,active", [("mixtral_small", 2.67e9, 0.80e9),
                                                 ("deepseek_small", 4.78e9, 0.70e9)])
def test_param_counts_match_benchmark_models(preset, total, active):
    cfg = load_config(preset, ["moe.router_score_function=softmax"]).model
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    counts = metrics.param_counts(abstract)
    assert abs(counts["total"] - total) / total < 0.01, counts
    assert abs(counts["active"] - active) / active < 0.02, counts
    # 6·N_active + 6·L·d·S
    f = metrics.flops_per_token(cfg, counts["active"], 2048)
    assert f == 6 * counts["active"] + 6 * cfg.num_layers * cfg.d_model * 2048


def test_dropped_token_passes_through_the_block_residual():
    """A token every slot of which is dropped leaves the MoE block with only the attention residual."""
    cfg = small_cfg(moe=MoEConfig(num_experts=4, router_topk=1, ffn_hidden_size=16, layer_freq=(1, 1, 1),
                                  expert_capacity_factor=0.25, token_drop_policy="position"))
    block = GPT(cfg, rngs=nnx.Rngs(0)).layer(0)
    x = jax.random.normal(jax.random.key(3), (2, 16, cfg.d_model))
    cos, sin = rope_tables(16, cfg.head_dim_, cfg.rope_theta)
    out, aux = block(x, cos, sin)
    after_attn = x + block.attn(block.attn_norm(x), cos, sin)
    routing = block.mlp.router(block.mlp_norm(after_attn).reshape(-1, cfg.d_model), seq_len=16)
    dropped = ~np.asarray(routing.kept[:, 0])
    assert dropped.sum() == int(aux["dropped"]) > 0
    np.testing.assert_array_equal(np.asarray(out).reshape(-1, cfg.d_model)[dropped],
                                  np.asarray(after_attn).reshape(-1, cfg.d_model)[dropped])
    assert not np.allclose(np.asarray(out).reshape(-1, cfg.d_model)[~dropped],
                           np.asarray(after_attn).reshape(-1, cfg.d_model)[~dropped])


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
    """Consecutive layers of one kind are one stack run by one scan: the train step's jaxpr has the
    same size at 4 and 16 layers (compile time stays flat), and the layers' parameters are stacked."""
    from moe_jax.config import TrainConfig
    from moe_jax.train import init_state, make_train_step
    tc = TrainConfig(batch_size=2, seq_len=16)

    def jaxpr_len(layers):
        cfg = small_cfg(num_layers=layers, scan_layers=True,
                        moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16,
                                      layer_freq=(0,) + (1,) * (layers - 1)))
        model = GPT(cfg, rngs=nnx.Rngs(0))
        assert model.runs == ((False, 0, 1), (True, 1, layers - 1))
        assert model.stacks[1].attn.wq_DNH.shape[0] == layers - 1
        graphdef, state = init_state(model, tc)
        batch = {"inputs": tokens(), "targets": tokens(seed=1)}
        return _count_eqns(jax.make_jaxpr(make_train_step(graphdef, tc, jit=False))(state, batch).jaxpr)
    assert jaxpr_len(4) == jaxpr_len(16)


def _count_eqns(jaxpr) -> int:
    """Equations of a jaxpr, nested ones (scan/cond/custom_vjp bodies) included."""
    def subs(v):
        if hasattr(v, "eqns"):
            return [v]
        if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            return [v.jaxpr]
        if isinstance(v, (tuple, list)):
            return [j for x in v for j in subs(x)]
        return []
    return len(jaxpr.eqns) + sum(_count_eqns(j) for e in jaxpr.eqns for v in e.params.values()
                                 for j in subs(v))


@pytest.mark.parametrize("scan", [False, True])
def test_layer_views_and_stacking_round_trip(scan):
    cfg = small_cfg(scan_layers=scan)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    from moe_jax.model import stack_layers, unstack_layers
    pure = nnx.state(model).to_pure_dict()
    per_layer = unstack_layers(pure, cfg)
    assert sorted(per_layer["blocks"]) == [0, 1, 2] and "stacks" not in per_layer
    np.testing.assert_array_equal(per_layer["blocks"][2]["attn"]["wq_DNH"],
                                  model.layer(2).attn.wq_DNH[...])
    back = stack_layers(per_layer, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pure)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError, match="layer 3"):
        model.layer(3)


@pytest.mark.parametrize("qk_norm,remat,fanout,shared", [(False, "none", False, None), (True, "selective", False, None),
                                                        (False, "selective", True, 32), (False, "full", False, None)])
def test_fused_kernels_same_loss_and_grads(qk_norm, remat, fanout, shared):
    """The Pallas RMSNorm, RoPE and SwiGLU-backward kernels (interpret mode) in the whole model: same
    loss and gradients as the plain-JAX path (dense and MoE layers, with and without q/k norms, with
    the kernels' forward recomputed under selective and full remat, and with the norms' fan-out: q/k/v and
    router/dispatch/shared experts each given their own copy, the gradients summed in the kernel). Without
    q/k norms or fan-out the attention runs its merged q/k/v projection through `rope_qkv`."""
    moe = dataclasses.replace(small_cfg().moe, layer_freq=(0, 1), shared_expert_intermediate_size=shared)
    cfg = small_cfg(ffn_hidden_size=64, qk_norm=qk_norm, dtype="float32", remat=remat, num_layers=2, moe=moe)
    graphdef, params, rest = nnx.split(GPT(cfg, rngs=nnx.Rngs(1)), nnx.Param, ...)
    kcfg = dataclasses.replace(cfg, fused_kernels="interpret", norm_fanout=fanout)
    graphdef_k, _, _ = nnx.split(GPT(kcfg, rngs=nnx.Rngs(1)), nnx.Param, ...)
    w = jax.random.normal(jax.random.key(5), (2, 16, cfg.vocab_size))

    def loss(p, rest, g):
        return jnp.mean(nnx.merge(g, p, rest)(tokens())[0] * w)

    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, rest, graphdef)
    l2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, rest, graphdef_k)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-8)  # the loss is near 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
