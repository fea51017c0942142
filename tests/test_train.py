import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import runner
from moe_jax.config import Config, ModelConfig, MoEConfig, TrainConfig
from moe_jax.model import GPT
from moe_jax.train import init_state, lr_schedule, make_train_step


def tiny(**moe_kw) -> ModelConfig:
    moe = dict(num_experts=4, router_topk=2, ffn_hidden_size=16)
    moe.update(moe_kw)
    return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       ffn_hidden_size=32, max_seq_len=32, moe=MoEConfig(**moe))


def batch(b=4, s=16, seed=0):
    t = jax.random.randint(jax.random.key(seed), (b, s + 1), 0, 64)
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def test_loss_falls_on_a_repeated_batch():
    tc = TrainConfig(steps=40, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2)
    graphdef, state = init_state(GPT(tiny(), rngs=nnx.Rngs(0)), tc)
    step = make_train_step(graphdef, tc)
    b = batch()
    losses = []
    for _ in range(40):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(state.step) == 40 and int(state.data_pos) == 40
    assert {"aux_loss", "ce", "grad_norm", "lr", "tokens_per_expert"} <= set(m)


def test_grad_accumulation_matches_full_batch():
    cfg = tiny(router_load_balancing_type="none")  # the aux loss is not additive over micro-batches
    # eps=1: Adam's first update g/(|g|+eps) is ~linear in g (with eps=1e-8 it is ~sign(g), which
    # turns float32 rounding of near-zero gradients into lr-sized differences)
    tc1 = TrainConfig(batch_size=4, seq_len=16, lr=1e-3, warmup_steps=0, grad_clip=None, eps=1.0)
    tc2 = dataclasses.replace(tc1, grad_accum=2)
    b = batch()
    out = []
    for tc in (tc1, tc2):
        graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc)
        new, m = make_train_step(graphdef, tc)(state, b)
        out.append((new.params, float(m["loss"]), np.asarray(m["tokens_per_expert"])))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
    np.testing.assert_array_equal(out[0][2], out[1][2])
    for a, c in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)


def test_expert_bias_updated_once_per_step():
    cfg = tiny(router_score_function="sigmoid", router_enable_expert_bias=True,
               router_bias_update_rate=0.01)
    tc = TrainConfig(batch_size=4, seq_len=16, grad_accum=2)
    graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc)
    new, m = make_train_step(graphdef, tc)(state, batch())
    counts = np.asarray(m["routed_counts"], np.float64)  # [L, E] summed over micro-batches
    biases = [b for v in jax.tree.leaves(new.model_state) for b in np.asarray(v)]  # stacked [L, E]
    assert len(biases) == 2
    for j, bias in enumerate(biases):
        expect = 0.01 * np.sign(counts[j].mean() - counts[j])
        np.testing.assert_allclose(bias, expect, rtol=1e-6)
        assert np.any(bias != 0)


def test_lr_schedule_warmup_and_cosine():
    tc = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    s = lr_schedule(tc)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1e-3) < 1e-9
    assert abs(float(s(100)) - 1e-4) < 1e-9 and float(s(50)) < 1e-3


def run_cfg(tmp_path, **train_kw) -> Config:
    tc = dict(steps=4, batch_size=2, seq_len=16, data="synthetic", log_every=2, out_dir=str(tmp_path))
    tc.update(train_kw)
    return Config(model=tiny(), train=TrainConfig(**tc))


def test_run_writes_logs_tensorboard_and_heatmap(tmp_path):
    lines = []
    summary = runner.train(run_cfg(tmp_path), progress=False, log=lines.append)
    assert np.isfinite(summary["last_loss"])
    assert any("params" in line for line in lines)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    png = tmp_path / "expert_load.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and all("imbalance" in h for h in hist)  # as logged
    assert (tmp_path / "config.yaml").exists()


def test_nan_loss_stops_with_step_number(tmp_path, monkeypatch):
    real = runner.init_state

    def poisoned(model, tc):
        graphdef, state = real(model, tc)
        return graphdef, state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))

    monkeypatch.setattr(runner, "init_state", poisoned)
    with pytest.raises(runner.NonFiniteLossError, match="at step 1: "):  # numbered as the log numbers it
        runner.train(run_cfg(tmp_path), progress=False, log=lambda s: None)


@pytest.mark.parametrize("field", ["recompute_activation", "recompute_rows"])
def test_recomputed_expert_tensors_give_the_same_step(field):
    """moe.recompute_activation / recompute_rows: the experts' activation output / fc1's input rows made
    again in the backward, not kept; the step's loss, gradient norm and new weights are those of keeping it."""
    tc = TrainConfig(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1)
    out = {}
    for recompute in (False, True):
        cfg = tiny(**{field: recompute})
        graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc)
        state, m = make_train_step(graphdef, tc)(state, batch(seed=3))
        out[recompute] = state, m
    (a, ma), (b, mb) = out[True], out[False]
    assert float(ma["grad_norm"]) > 0
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
