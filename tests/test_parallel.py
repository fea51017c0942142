"""Mesh construction, parallel folding, the logical-axis rules and layout validation (no compiles)."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import parallel
from moe_jax.config import DispatchConfig, ModelConfig, MoEConfig, ParallelConfig


def _model(**kw):
    moe = MoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=64)
    args = dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                ffn_hidden_size=64, moe=moe)
    args.update(kw)
    return ModelConfig(**args)


@pytest.mark.devices(8)
@pytest.mark.parametrize("pc,dense,moe", [
    (ParallelConfig(), (8, 1, 1), (8, 1, 1)),
    (ParallelConfig(data=2, fsdp=2, tensor=2, expert=4), (2, 2, 2), (2, 4, 1)),
    (ParallelConfig(data=2, tensor=4, expert=8), (2, 1, 4), (1, 8, 1)),        # EP=8 > DP=2: folding
    (ParallelConfig(data=-1, tensor=2, expert=2, expert_tensor=2), (4, 1, 2), (2, 2, 2)),
    (ParallelConfig(data=1, fsdp=8, expert=-1), (1, 8, 1), (1, 8, 1)),
])
def test_meshes_fold_the_same_devices(pc, dense, moe):
    lay = parallel.make_layout(pc, _model())
    assert tuple(lay.mesh.shape.values()) == dense
    assert tuple(lay.moe_mesh.shape.values()) == moe
    assert list(lay.mesh.devices.flat) == list(lay.moe_mesh.devices.flat) == jax.devices()
    assert "devices" in lay.describe()


@pytest.mark.devices(8)
@pytest.mark.parametrize("pc,model,batch,match", [
    (ParallelConfig(data=3), {}, None, "must equal the device count"),
    (ParallelConfig(data=-1, tensor=3), {}, None, "cannot fill"),
    (ParallelConfig(expert=3), {}, None, "must divide the device count"),
    (ParallelConfig(data=1, expert=8, fsdp=8), {"moe": MoEConfig(num_experts=4, ffn_hidden_size=8)},
     None, "num_experts"),
    (ParallelConfig(data=1, tensor=8), {}, None, "num_heads"),
    (ParallelConfig(data=4, tensor=2), {"num_kv_heads": 1}, None, "num_kv_heads"),
    (ParallelConfig(expert=2, expert_tensor=4), {"moe": MoEConfig(ffn_hidden_size=6)}, None,
     "ffn_hidden_size"),
    (ParallelConfig(data=4, fsdp=2), {}, 4, "batch_size"),
])
def test_invalid_layouts_fail_before_compiling(pc, model, batch, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_layout(pc, _model(**model), batch_size=batch, seq_len=16)


def test_parallel_config_validates_new_fields():
    with pytest.raises(ValueError, match="expert_tensor"):
        ParallelConfig(expert_tensor=0)
    with pytest.raises(ValueError, match="overlap_chunks"):
        DispatchConfig(overlap_chunks=0)
    with pytest.raises(ValueError, match="buffer_factor"):
        DispatchConfig(buffer_factor=0)


@pytest.mark.devices(8)
def test_rules_map_logical_names():
    assert parallel.spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert parallel.spec(("embed", "heads", None)) == P("fsdp", "tensor", None)
    assert parallel.spec(("exp", "embed_moe", None, "mlp_moe")) == P("expert", None, None, "etensor")
    assert parallel.spec(("act_batch", None)) == P(("data", "fsdp"), None)
    lay = parallel.make_layout(ParallelConfig(data=4, tensor=2, expert=2, expert_tensor=2), _model())
    assert parallel.sharding(("exp", "mlp_moe", "embed_moe"), lay).mesh is lay.moe_mesh
    assert parallel.sharding(("embed", "mlp"), lay).mesh is lay.mesh
    # a dim that does not divide its axis stays whole instead of failing
    assert parallel.sharding(("heads",), lay, shape=(3,)).spec == P(None)


@pytest.mark.devices(8)
def test_layout_for_stays_single_device_on_cpu_by_default():
    from moe_jax.config import Config
    assert parallel.layout_for(Config()) is None
    cfg = Config(model=_model(), parallel=ParallelConfig(expert=2))
    assert parallel.layout_for(cfg).moe_mesh.shape["expert"] == 2


def test_distributed_detects_the_environment():
    from moe_jax import distributed
    assert distributed.detect({}) is None
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed.detect(env) == {"coordinator_address": "h0:1234", "num_processes": 2,
                                       "process_id": 1, "local_device_ids": [0, 1]}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "2"})
    assert distributed.initialize({}) is False


@pytest.mark.devices(8)
def test_train_cli_rejects_an_invalid_mesh(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "experiments" / "train.py"
    spec = importlib.util.spec_from_file_location("train_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["parallel.expert=3"]) == 2
    assert "expert" in capsys.readouterr().err


def test_mesh_tests_skip_where_the_backend_has_fewer_devices():
    """tests/conftest.py: a `devices(8)` test skips, naming why, where the default backend has fewer devices
    (a one-GPU machine, here one host device) instead of failing to build its mesh."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "tests/test_routing.py::test_global_aux_loss_shard_map"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 skipped" in r.stdout and "builds a mesh of 8 devices; cpu has 1 here" in r.stdout, r.stdout[-2000:]
