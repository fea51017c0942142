"""The experts' weights kept in the compute dtype between steps (moe_jax/weight_copy.py): the same
steps as the cast, gradients to the float32 weights, left out of checkpoints and rebuilt on restore,
sharded like the weights."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint as C, parallel, weight_copy
from moe_jax.config import ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_jax.model import GPT
from moe_jax.train import init_sharded_state, init_state, make_train_step, split_model

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=32,
                  max_seq_len=32, param_dtype="float32", dtype="bfloat16",
                  moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16))
TC = TrainConfig(steps=10, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2)


def batch(seed, b=4):
    t = jax.random.randint(jax.random.key(seed), (b, 17), 0, 64)
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def expert_leaves(params) -> dict:
    return {k: v for k, v in weight_copy._flat(params).items() if "experts" in k}


def test_copy_holds_the_experts_weights_in_the_compute_dtype():
    _, state = init_state(GPT(CFG, rngs=nnx.Rngs(0)), TC)
    experts = expert_leaves(state.params)
    assert set(state.compute_params) == set(experts) and len(experts) == 2 * CFG.num_layers
    for k, v in state.compute_params.items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(experts[k][...].astype(jnp.bfloat16)))
    # nothing to copy when the weights are stored in the compute dtype, or when turned off
    bf16 = dataclasses.replace(CFG, param_dtype="bfloat16")
    assert init_state(GPT(bf16, rngs=nnx.Rngs(0)), TC)[1].compute_params is None
    off = dataclasses.replace(TC, expert_weight_copy=False)
    assert init_state(GPT(CFG, rngs=nnx.Rngs(0)), off)[1].compute_params is None


@pytest.mark.parametrize("accum", [1, 2])
def test_steps_with_the_copy_are_the_steps_with_the_cast(accum):
    """Three steps on fresh batches, with and without the copy (and with gradient accumulation): the
    same weights, optimizer state and metrics, and the copy after each step is the new weights cast."""
    runs = {}
    for on in (True, False):
        tc = dataclasses.replace(TC, expert_weight_copy=on, grad_accum=accum)
        graphdef, state = init_state(GPT(CFG, rngs=nnx.Rngs(0)), tc)
        step = make_train_step(graphdef, tc)
        for i in range(3):
            state, metrics = step(state, batch(i))
            if on:
                for k, v in weight_copy.refresh(state.params, state.compute_params).items():
                    np.testing.assert_array_equal(np.asarray(v[...]),
                                                  np.asarray(state.compute_params[k][...]), err_msg=k)
        runs[on] = state, metrics
    (a, ma), (b, mb) = runs[True], runs[False]
    assert float(ma["grad_norm"]) > 0
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(ma[name]), float(mb[name]), rtol=1e-6, err_msg=name)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_swap_in_gradients_are_those_of_the_cast():
    _, params, _ = split_model(GPT(CFG, rngs=nnx.Rngs(1)))
    copy = weight_copy.init(params, "bfloat16")
    rows = {k: jax.random.normal(jax.random.key(i), v.shape, jnp.float32)
            for i, (k, v) in enumerate(weight_copy._flat(params).items())}

    def loss(p, use_copy):  # a random linear functional of each weight, read in bf16 where copied
        flat = weight_copy._flat(weight_copy.swap_in(p, copy) if use_copy else p)
        total = 0.0
        for k, v in flat.items():
            w = v[...] if use_copy or k not in copy else v[...].astype(jnp.bfloat16)
            total = total + jnp.sum(jnp.sin(w.astype(jnp.float32)) * rows[k])
        return total

    (la, ga), (lb, gb) = (jax.value_and_grad(loss)(params, u) for u in (True, False))
    assert float(la) == float(lb)
    for k, (x, y) in zip(weight_copy._flat(ga), zip(jax.tree.leaves(ga), jax.tree.leaves(gb))):
        assert x.dtype == jnp.float32, k
        assert float(jnp.abs(x).max()) > 0, k
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


def test_checkpoints_leave_the_copy_out_and_restore_rebuilds_it(tmp_path):
    graphdef, state = init_state(GPT(CFG, rngs=nnx.Rngs(0)), TC)
    state, _ = make_train_step(graphdef, TC)(state, batch(0))
    ck = C.Checkpointer(tmp_path)
    ck.save(state)
    ck.wait()
    assert not [k for k in ck.metadata()["leaves"] if k.startswith("compute_params")]
    fresh = init_state(GPT(CFG, rngs=nnx.Rngs(5)), TC)[1]
    restored = ck.restore(fresh)
    ck.close()
    assert set(restored.compute_params) == set(state.compute_params)
    for k, v in state.compute_params.items():
        np.testing.assert_array_equal(np.asarray(restored.compute_params[k][...]), np.asarray(v[...]))


@pytest.mark.devices(8)
def test_sharded_copy_shards_like_its_weight_through_a_step():
    """EP=4 over DP=2 x FSDP=4 on 8 devices: the copy is created in its weight's shards and a sharded step
    writes it back there, equal to the new weights cast."""
    layout = parallel.make_layout(ParallelConfig(data=2, fsdp=4, expert=4), CFG)
    graphdef, state, shardings = init_sharded_state(CFG, TC, layout)
    step = make_train_step(graphdef, TC, layout=layout, shardings=shardings)
    state, metrics = step(state, parallel.put_batch(batch(0, b=8), layout))
    assert np.isfinite(float(metrics["loss"]))
    weights = weight_copy._flat(state.params)
    for k, v in state.compute_params.items():
        assert v[...].sharding.spec == weights[k][...].sharding.spec == shardings.compute_params[k].spec, k
        assert "expert" in tuple(v[...].sharding.spec), v[...].sharding.spec
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(weights[k][...].astype(jnp.bfloat16)))
