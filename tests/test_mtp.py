"""Multi-token prediction (moe_jax.mtp): the loss against a direct computation on truncated sequences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.model import GPT
from moe_jax.mtp import mtp_loss
from moe_jax.rope import model_rope_tables


def mtp_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=48, d_model=24, num_layers=2, num_heads=2, ffn_hidden_size=32, max_seq_len=32,
                attention_type="mla", q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
                qk_rope_head_dim=4, v_head_dim=6, mtp_num_layers=2, init_std=0.2,
                moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=8, layer_freq=(0, 1),
                              router_score_function="sigmoid", router_enable_expert_bias=True))
    base.update(kw)
    return ModelConfig(**base)


def direct_mtp_loss(model: GPT, tokens_BT):
    """Module k on the positions that have a label (sequence cut to S-k): embed t[i+k], predict
    t[i+k+1], explicit log-softmax of explicit logits."""
    s = tokens_BT.shape[1] - 1
    h = model.trunk(tokens_BT[:, :s])[0]
    embed, head = model.embed_VD[...], model.head()
    losses = []
    for k, m in enumerate(model.mtp, start=1):
        n = s - k
        e = embed[tokens_BT[:, k:k + n]]
        w = m.eh_proj_nDD[...]
        x = jnp.concatenate([m.enorm(e), m.hnorm(h[:, :n])], -1) @ jnp.concatenate([w[0], w[1]], 0)
        h = m.block(x, *model_rope_tables(model.cfg, n))[0]
        logits = m.final_norm(h) @ head
        logp = jax.nn.log_softmax(logits, -1)
        labels = tokens_BT[:, k + 1:k + 1 + n]
        losses.append(-jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("grads", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["loss", "grads"])
def test_mtp_loss_matches_direct_computation(grads):
    cfg = mtp_cfg(num_layers=1, moe=None)
    graphdef, params, rest = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def ours(params):
        model = nnx.merge(graphdef, params, rest)
        return mtp_loss(model, model.trunk(inputs)[0], targets)[0]

    direct = lambda params: direct_mtp_loss(nnx.merge(graphdef, params, rest), tokens)  # noqa: E731
    if not grads:
        np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(direct)(params), rtol=1e-5)
        return
    l1, g1 = jax.jit(jax.value_and_grad(ours))(params)
    l2, g2 = jax.jit(jax.value_and_grad(direct))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert float(jnp.abs(g1["mtp"][1]["eh_proj_nDD"][...]).sum()) > 0  # the second module is trained


def test_mtp_off_at_inference_and_block_kind():
    abstract = nnx.eval_shape(lambda: GPT(mtp_cfg(mtp_num_layers=1), rngs=nnx.Rngs(0)))
    assert abstract.mtp[0].block.is_moe  # the last layer is MoE, so is the MTP block
    model = GPT(mtp_cfg(mtp_num_layers=1, moe=None, num_layers=1), rngs=nnx.Rngs(0))
    plain = GPT(mtp_cfg(mtp_num_layers=0, moe=None, num_layers=1), rngs=nnx.Rngs(0))
    assert plain.mtp is None and not model.mtp[0].block.is_moe
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, 48)
    np.testing.assert_allclose(model(tokens)[0], plain(tokens)[0], atol=1e-6)  # same main weights


@pytest.mark.slow
def test_tiny_deepseek_v3_trains_and_logs_mtp_loss(tmp_path):
    from moe_jax import runner
    from moe_jax.presets import load_config
    cfg = load_config("tiny_deepseek_v3", ["train.steps=20", "train.batch_size=8", "train.seq_len=32",
                                           "train.warmup_steps=2", "train.log_every=10", "train.heatmap=false",
                                           f"train.out_dir={tmp_path}"])
    lines = []
    summary = runner.train(cfg, progress=False, log=lines.append)
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    assert summary["last_mtp_loss"] < summary["first_mtp_loss"]
    assert any("| mtp_loss " in line for line in lines)
