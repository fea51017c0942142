"""Checkpoints: retention, bit-exact resume, reshard-on-restore across meshes (params and optimizer
state), and loud errors (other config, missing step, corrupted/truncated files, interrupted save)."""
import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint as C, parallel
from moe_jax.config import ParallelConfig
from moe_jax.presets import load_config
from moe_jax.data import make_dataset
from moe_jax.model import GPT
from moe_jax.train import init_state, make_train_step

TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=16",
        "moe.num_experts=4", "moe.ffn_hidden_size=16", "moe.layer_freq=[1,0]",
        "moe.router_enable_expert_bias=true", "moe.input_jitter_eps=0.01",
        "train.batch_size=8", "train.seq_len=16", "train.steps=6", "train.warmup_steps=2",
        "train.data=synthetic"]


def tiny(*extra):
    return load_config("tiny_moe", TINY + list(extra))


def fresh(cfg, seed=0):
    return init_state(GPT(cfg.model, rngs=nnx.Rngs(seed)), cfg.train)


_STEP_FNS = {}


def step_fn_for(cfg, graphdef):
    """One jitted step per config, so tests share compilations."""
    if cfg not in _STEP_FNS:
        _STEP_FNS[cfg] = make_train_step(graphdef, cfg.train)
    return _STEP_FNS[cfg]


def on_one_device(state):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return C.reshard(state, jax.tree.map(lambda _: one, state))


def run(step_fn, state, data, n):
    losses = []
    for _ in range(n):
        state, m = step_fn(state, data.batch(int(state.data_pos)))
        losses.append(float(m["loss"]))
    return state, losses


def leaves_equal(a, b):
    fa, fb = C.flatten(a), C.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_retention_async_and_roundtrip(tmp_path):
    cfg = tiny()
    _, state = fresh(cfg)
    ck = C.Checkpointer(tmp_path, keep=2, keep_every=3)
    for s in range(2, 6):
        state = state.replace(step=state.step * 0 + s)
        ck.save(state)
    ck.wait()
    assert ck.all_steps() == [3, 4, 5]  # the last two, plus every multiple of 3
    leaves_equal(ck.restore(fresh(cfg, seed=1)[1]), state)
    ck.close()


@pytest.mark.parametrize("extra", [(), ("model.dtype=bfloat16",)], ids=["fp32", "bf16_compute"])
def test_resume_is_bit_exact(tmp_path, extra):
    """bf16_compute: fp32 weights with the experts' bf16 copy, left out of the checkpoint and rebuilt."""
    cfg = tiny(*extra)
    data = make_dataset(cfg.train, cfg.model.vocab_size)
    graphdef, state = fresh(cfg)
    step_fn = step_fn_for(cfg, graphdef)
    _, full = run(step_fn, on_one_device(state), data, 4)

    graphdef, state = fresh(cfg)
    state, first = run(step_fn, on_one_device(state), data, 2)
    ck = C.Checkpointer(tmp_path)
    ck.save(state, config={"note": "test"})
    ck.close()
    del state
    ck = C.Checkpointer(tmp_path)  # as a new process would
    assert ck.latest_step() == 2 and ck.metadata()["config"] == {"note": "test"}
    state = ck.restore(on_one_device(fresh(cfg, seed=123)[1]))  # all must come from disk
    assert (state.compute_params is not None) == bool(extra)
    _, rest = run(step_fn, state, data, 2)
    assert first + rest == full  # bit-for-bit


@pytest.mark.devices(8)
def test_reshard_on_restore_ep4_ep2_ep1(tmp_path):
    """Save under (fsdp2, ep4), restore under (tp2, ep2), then one device; losses match an
    uninterrupted run. Optimizer moments are resharded like their parameters."""
    cfg = tiny("train.programs=one")  # one step program per layout (per-layer ones compile per sharding)
    data = make_dataset(cfg.train, cfg.model.vocab_size)
    graphdef, init = fresh(cfg)
    step_fn = step_fn_for(cfg, graphdef)
    layout_a = parallel.make_layout(ParallelConfig(data=-1, fsdp=2, expert=4), cfg.model)
    layout_b = parallel.make_layout(ParallelConfig(data=-1, tensor=2, expert=2), cfg.model)
    shard_a = parallel.tree_shardings(init, layout_a)
    _, full = run(step_fn, C.reshard(init, shard_a), data, 4)

    state = C.reshard(fresh(cfg)[1], shard_a)
    state, l1 = run(step_fn, state, data, 2)
    ck = C.Checkpointer(tmp_path)
    ck.save(state)
    ck.wait()

    target = C.abstract_state(init, parallel.tree_shardings(init, layout_b))
    state = ck.restore(target)
    w1 = state.params["stacks"][0]["mlp"]["experts"]["w1_EDnF"][...]
    mu = state.opt_state[1][0].mu["stacks"][0]["mlp"]["experts"]["w1_EDnF"][...]
    assert w1.sharding == mu.sharding and w1.sharding.spec[1] == "expert"  # [layers, E, ...]
    assert w1.sharding.mesh.shape["expert"] == 2
    state, l2 = run(step_fn, state, data, 1)
    ck.save(state)
    ck.wait()

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ck.restore(C.abstract_state(init, jax.tree.map(lambda _: one, init)))
    assert len(state.params["embed_VD"][...].sharding.device_set) == 1
    _, l3 = run(step_fn, state, data, 1)
    ck.close()
    np.testing.assert_allclose(l1 + l2 + l3, full, rtol=2e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved tiny checkpoint (step 0) per module; tests that damage it work on a copy."""
    path = tmp_path_factory.mktemp("ckpt")
    cfg = tiny()
    _, state = fresh(cfg)
    ck = C.Checkpointer(path, async_save=False)
    ck.save(state)
    ck.close()
    return path, cfg, state


def copy(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "c")
    return C.Checkpointer(tmp_path / "c")


def test_config_mismatch_names_the_shapes(saved):
    path, cfg, _ = saved
    other = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, ffn_hidden_size=24))
    _, target = init_state(GPT(other, rngs=nnx.Rngs(0)), cfg.train)
    with pytest.raises(C.CheckpointError) as e:
        C.Checkpointer(path).restore(target)
    msg = str(e.value)
    assert "params/stacks/0/mlp/experts/w1_EDnF/value: checkpoint (1, 4, 32, 2, 16) float32 vs " \
           "model (1, 4, 32, 2, 24) float32" in msg
    assert "opt_state" in msg and "different config" in msg


def test_missing_step_and_empty_dir(saved, tmp_path):
    path, _, state = saved
    with pytest.raises(C.CheckpointError, match=r"no checkpoint for step 7 .* available steps: \[0\]"):
        C.Checkpointer(path).restore(state, step=7)
    with pytest.raises(C.CheckpointError, match="no checkpoint found"):
        C.Checkpointer(tmp_path / "empty").restore(state)


def _data_files(root: Path):
    return sorted(p for p in (root / "0" / "state").rglob("*") if p.is_file() and p.stat().st_size > 64
                  and "manifest" not in p.name and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_fails_loudly(saved, tmp_path, damage):
    ck = copy(saved, tmp_path)
    files = _data_files(tmp_path / "c")
    assert files, "no array data files found"
    for f in files:
        raw = bytearray(f.read_bytes())
        if damage == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            for i in range(len(raw) // 3, len(raw), 97):
                raw[i] ^= 0x5A
        f.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match="corrupted"):
        ck.restore(saved[2])


def test_missing_manifest_fails_loudly(saved, tmp_path):
    ck = copy(saved, tmp_path)
    shutil.rmtree(tmp_path / "c" / "0" / "meta")
    with pytest.raises(C.CheckpointError, match="manifest"):
        ck.restore(saved[2])


def test_interrupted_save_leaves_previous_restorable(saved, tmp_path):
    """A save killed before its commit leaves only an `*.orbax-checkpoint-tmp-*` directory."""
    path = tmp_path / "c"
    shutil.copytree(saved[0], path)
    shutil.copytree(path / "0", path / "5.orbax-checkpoint-tmp-1234")
    ck = C.Checkpointer(path)
    assert ck.all_steps() == [0]
    leaves_equal(ck.restore(saved[2]), saved[2])


def test_runner_periodic_saves_and_resume(tmp_path):
    """experiments/train.py flow: checkpoint every 2 steps (async, while training continues), drop the
    last checkpoint as if the run died after step 2, `--resume`: same losses as the full run."""
    from moe_jax.runner import train
    dense = [o for o in TINY if not o.startswith("moe.")] + ["model.num_layers=1"]
    cfg = load_config("dense_small", dense + [
        f"train.out_dir={tmp_path}", "train.checkpoint=true", "train.checkpoint_every=2",
        "train.steps=4", "train.tensorboard=false", "train.heatmap=false", "train.log_every=4"])
    train(cfg, progress=False, log=lambda *a: None)
    full = [h["loss"] for h in __import__("json").loads((tmp_path / "history.json").read_text())]
    ck = C.Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [2, 4] and ck.metadata()["config"]["model"]["d_model"] == 32
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    logs = []
    train(cfg, progress=False, log=logs.append, resume=True)
    assert any("resumed from" in line for line in logs)
    rest = [h["loss"] for h in __import__("json").loads((tmp_path / "history.json").read_text())]
    assert rest == full  # steps 1-2 kept, 3-4 trained again (bit-exactly) and appended


@pytest.mark.devices(8)
def test_restore_into_parallel_layout(saved):
    """The shardings of moe_jax.parallel (dense mesh + folded MoE mesh) work as restore targets."""
    path, cfg, state = saved
    layout = parallel.make_layout(ParallelConfig(data=4, fsdp=1, tensor=2, expert=4), cfg.model)
    restored = C.Checkpointer(path).restore(
        C.abstract_state(state, parallel.tree_shardings(state, layout)))
    w1 = restored.params["stacks"][0]["mlp"]["experts"]["w1_EDnF"][...]
    mu = restored.opt_state[1][0].mu["stacks"][0]["mlp"]["experts"]["w1_EDnF"][...]
    assert w1.sharding == mu.sharding and w1.sharding.mesh.shape["expert"] == 4
    assert restored.params["embed_VD"][...].sharding.spec[0] == "tensor"
    leaves_equal(restored, state)


KILL_SCRIPT = r"""
import os, sys, jax, jax.numpy as jnp
from moe_jax import checkpoint as C, parallel
from moe_jax.config import ParallelConfig
import flax.struct

@flax.struct.dataclass
class S:
    step: jax.Array
    w: jax.Array

ck = C.Checkpointer(sys.argv[1])
s = S(step=jnp.int32(1), w=jax.random.normal(jax.random.key(0), (64, 1024, 1024)))  # 256 MB
ck.save(s); ck.wait()
s = s.replace(step=jnp.int32(2), w=s.w + 1)
ck.save(s)            # async: returns with the write still in flight
os._exit(9)           # the process dies mid-save
"""


def test_process_killed_during_async_save(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    ck = C.Checkpointer(tmp_path)
    steps = ck.all_steps()
    assert 1 in steps and steps[-1] in (1, 2)
    # whatever is listed is complete: it restores and matches its fingerprints
    import flax.struct
    import jax.numpy as jnp

    @flax.struct.dataclass
    class S:
        step: jax.Array
        w: jax.Array
    target = S(step=jax.ShapeDtypeStruct((), jnp.int32), w=jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for step in steps:
        ck.restore(C.abstract_state(target, jax.tree.map(lambda _: one, target)), step)
    print("steps after kill:", steps, "leftovers:", sorted(p.name for p in tmp_path.iterdir()))


def test_fingerprint_mismatch_is_reported(saved, tmp_path):
    """Bits that read back fine but differ from what was saved are caught by the manifest check."""
    import json
    ck = copy(saved, tmp_path)
    meta_file = tmp_path / "c" / "0" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["leaves"]["params/embed_VD/value"]["fp"] ^= 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(C.CheckpointError, match=r"corrupted: 1 arrays differ .*params/embed_VD/value"):
        ck.restore(saved[2])


@pytest.mark.slow
def test_runner_resume_under_another_ep_layout(tmp_path):
    """The real EP path: train with parallel.expert=4 (all-to-all dispatch), resume the step-2
    checkpoint with expert=2 x tensor=2, and on one device: losses match the uninterrupted run."""
    import json
    from moe_jax.runner import train
    base = [f"train.out_dir={tmp_path}", "train.checkpoint=true", "train.checkpoint_every=2",
            "train.steps=4", "train.tensorboard=false", "train.heatmap=false", "train.log_every=4",
            "moe.input_jitter_eps=null"]
    history = lambda: [h["loss"] for h in json.loads((tmp_path / "history.json").read_text())]  # noqa: E731
    train(tiny(*base, "parallel.data=-1", "parallel.expert=4"), progress=False, log=lambda *a: None)
    full = history()
    keep = tmp_path / "keep"
    shutil.copytree(tmp_path / "checkpoints", keep)
    for par in (["parallel.data=-1", "parallel.tensor=2", "parallel.expert=2"], []):
        shutil.rmtree(tmp_path / "checkpoints")
        shutil.copytree(keep, tmp_path / "checkpoints")
        shutil.rmtree(tmp_path / "checkpoints" / "4")
        train(tiny(*base, *par), progress=False, log=lambda *a: None, resume=True)
        np.testing.assert_allclose(history(), full, rtol=2e-5, err_msg=str(par))


MLA = ["model.attention_type=mla", "model.q_lora_rank=8", "model.kv_lora_rank=8", "model.qk_nope_head_dim=4",
       "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.mtp_num_layers=1", "moe.layer_freq=[0,1]"]


@pytest.mark.devices(8)
def test_mla_mtp_restore_into_parallel_layout(tmp_path):
    """MLA and MTP parameters (and their optimizer moments) restore into a (tp2, ep2) layout, sharded
    by their logical axes."""
    cfg = tiny(*MLA)
    _, state = fresh(cfg)
    ck = C.Checkpointer(tmp_path, async_save=False)
    ck.save(state)
    layout = parallel.make_layout(ParallelConfig(data=-1, tensor=2, expert=2), cfg.model)
    restored = ck.restore(C.abstract_state(state, parallel.tree_shardings(state, layout)))
    ck.close()
    leaves_equal(restored, state)
    wk = restored.params["stacks"][0]["attn"]["wk_b_CNZ"][...]
    mu = restored.opt_state[1][0].mu["stacks"][0]["attn"]["wk_b_CNZ"][...]
    assert tuple(wk.sharding.spec) == (None, None, "tensor", None) and mu.sharding == wk.sharding
    w1 = restored.params["mtp"][0]["block"]["mlp"]["experts"]["w1_EDnF"][...]
    assert w1.sharding.spec[0] == "expert" and w1.sharding.mesh.shape["expert"] == 2


@pytest.mark.devices(8)
@pytest.mark.slow
def test_mla_mtp_state_reshards_on_restore(tmp_path):
    """An MLA model with an (MoE) MTP module: trained under (fsdp2, ep4), saved, restored under (tp2,
    ep2) with MLA and MTP parameters sharded by their logical axes; the next step's loss is the same."""
    cfg = tiny(*MLA)
    data = make_dataset(cfg.train, cfg.model.vocab_size)
    graphdef, init = fresh(cfg)
    step_fn = step_fn_for(cfg, graphdef)
    layout_a = parallel.make_layout(ParallelConfig(data=-1, fsdp=2, expert=4), cfg.model)
    layout_b = parallel.make_layout(ParallelConfig(data=-1, tensor=2, expert=2), cfg.model)
    state, _ = run(step_fn, C.reshard(init, parallel.tree_shardings(init, layout_a)), data, 2)
    ck = C.Checkpointer(tmp_path)
    ck.save(state)
    ck.wait()
    restored = ck.restore(C.abstract_state(init, parallel.tree_shardings(init, layout_b)))
    ck.close()
    leaves_equal(restored, state)
    wk = restored.params["stacks"][0]["attn"]["wk_b_CNZ"][...]
    assert tuple(wk.sharding.spec) == (None, None, "tensor", None)  # [layers, C, N, Z]: heads over tensor
    w1 = restored.params["mtp"][0]["block"]["mlp"]["experts"]["w1_EDnF"][...]
    assert w1.sharding.spec[0] == "expert" and w1.sharding.mesh.shape["expert"] == 2
    (_, la), (_, lb) = run(step_fn, state, data, 1), run(step_fn, restored, data, 1)
    np.testing.assert_allclose(lb, la, rtol=2e-5)
