"""A few train steps with a sharded state (8 fake CPU devices) give the unsharded run's losses."""
import dataclasses

import numpy as np
import pytest

from moe_jax import parallel
from moe_jax.config import ParallelConfig
from moe_jax.presets import load_config
from moe_jax.data import make_dataset
from moe_jax.model import GPT
from moe_jax.train import init_sharded_state, init_state, make_train_step
from flax import nnx

STEPS = 2


def _cfg(chunks=1, programs="one", **par):
    cfg = load_config("tiny_moe", [f"moe.dispatcher.overlap_chunks={chunks}",
                                   "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                                   "model.num_kv_heads=2", "model.ffn_hidden_size=64",
                                   "model.vocab_size=128", "moe.ffn_hidden_size=32",
                                   "moe.layer_freq=[0,1]", "moe.grouped_gemm_backend=xla",
                                   "train.batch_size=8", "train.seq_len=16", "train.lr=1e-2",
                                   "train.warmup_steps=0", "train.data=synthetic", f"train.programs={programs}"])
    return dataclasses.replace(cfg, parallel=ParallelConfig(**par))


def _losses(cfg, sharded: bool):
    tc = cfg.train
    data = make_dataset(tc, cfg.model.vocab_size)
    if sharded:
        layout = parallel.layout_for(cfg)
        graphdef, state, shardings = init_sharded_state(cfg.model, tc, layout)
        step = make_train_step(graphdef, tc, layout=layout, shardings=shardings)
    else:
        graphdef, state = init_state(GPT(cfg.model, rngs=nnx.Rngs(tc.seed)), tc)
        step = make_train_step(graphdef, tc)
    out = []
    for i in range(STEPS):
        batch = data.batch(i)
        if sharded:
            batch = parallel.put_batch(batch, layout)
        state, m = step(state, batch)
        out.append(float(m["loss"]))
    return np.array(out), state


_REF = {}


def _reference():
    if "ref" not in _REF:
        _REF["ref"] = _losses(_cfg(), sharded=False)[0]
    return _REF["ref"]


@pytest.mark.devices(8)
@pytest.mark.parametrize("par", [
    dict(data=2, fsdp=2, tensor=2, expert=4),               # DP x FSDP x TP, folded EP=4
    dict(data=4, fsdp=1, tensor=2, expert=8, chunks=2),  # EP=8 > DP=4: folding
    dict(data=2, fsdp=2, tensor=2, expert=4, programs="layers"),  # the per-layer programs, sharded
])
def test_sharded_steps_match_unsharded(par):
    ref = _reference()
    got, state = _losses(_cfg(**par), sharded=True)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    # the optimizer moments are sharded like their params
    w1 = state.params["stacks"][1]["mlp"]["experts"]["w1_EDnF"]
    mu = state.opt_state[1][0].mu["stacks"][1]["mlp"]["experts"]["w1_EDnF"]
    assert w1[...].sharding.spec == mu[...].sharding.spec
    assert w1[...].sharding.spec[1] == "expert"  # [layers, E, D, n, F]
    assert w1[...].addressable_shards[0].data.shape[1] == 8 // par["expert"]
    wq = state.params["stacks"][0]["attn"]["wq_DNH"][...]
    assert tuple(wq.sharding.spec)[1:3] == ("fsdp", "tensor")
