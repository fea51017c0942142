"""The device benchmark scripts run end to end on CPU (8 fake devices) at toy sizes: a script that
breaks should fail here, not after a machine start on the device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import CPU_QUICK_COMPILE_FLAGS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import bench_ep  # noqa: E402


@pytest.mark.devices(8)
def test_bench_ep_runs_on_cpu(tmp_path):
    out = tmp_path / "ep.json"
    precision = jax.config.jax_default_matmul_precision
    assert bench_ep.main(["--config", "tiny_moe", "--gpus", "1,2", "--plan", "1:local:1,2:alltoall:2",
                          "--tokens-per-gpu", "64", "--seq", "32", "--ragged", "", "--iters", "2", "--layers", "2",
                          "--check", "alltoall", "--out", str(out)]) == 0
    assert jax.config.jax_default_matmul_precision == precision  # the check restores it
    res = json.loads(out.read_text())
    # EP=2 and EP=2 x ETP=2, in float32 and bfloat16
    assert [(r["dtype"], r["ok"]) for r in res["check"]] == [("float32", True)] * 2 + [("bfloat16", True)] * 2
    rows = {r["variant"]: r for r in res["layer"]}
    assert set(rows) == {"local:1", "alltoall:2"} and not any("error" in r for r in rows.values())
    assert rows["alltoall:2"]["dropped"] == 0 and rows["alltoall:2"]["step_ms"] > 0
    assert rows["alltoall:2"]["layers"] == 2 and rows["alltoall:2"]["ms_per_layer"] > 0
    assert res["all_to_all"] and all("error" not in r for r in res["all_to_all"])


@pytest.mark.devices(8)
def test_profile_ep_runs_on_cpu(tmp_path):
    import profile_ep
    out = tmp_path / "profile.json"
    assert profile_ep.main(["--config", "tiny_moe", "--variants", "local:1,alltoall:2",
                            "--tokens-per-gpu", "64", "--seq", "32", "--steps", "2",
                            "--timeline", "--collectives", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [p["gpus"] for p in res["profiles"]] == [1, 2]
    assert all(p["wall_ms"] > 0 for p in res["profiles"])  # no GPU kernels on CPU: wall time only
    assert all(p["per_gpu"] == [] and p["timeline_gpu0"] == [] for p in res["profiles"])
    local, ep = res["profiles"]
    assert not local["collectives"] and any("all-to-all" in c for c in ep["collectives"])


def test_profile_split_by_kernel_kind():
    import profile_ep
    assert [profile_ep.category(op) for op in ("ep_exchange_mosaic_gpu_kernel", "gmm_fwd_t_kernel",
            "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "loop_add_fusion")] == \
        ["exchange", "gemm", "nccl", "xla"]
    ev = [("a", 0, 10), ("b", 5, 10), ("c", 20, 5), ("d", 21, 2)]  # overlapping streams count once
    assert profile_ep._busy_ns(ev) == 15 + 5
    tl = [["a", 0.0, 10.0], ["b", 12.0, 3.0], ["c", 14.0, 1.0], ["d", 20.0, 1.0]]
    assert profile_ep.gaps(tl) == (7.0, [(5.0, "d"), (2.0, "b")])


def test_bench_ops_runs_on_cpu(tmp_path):
    # its own process, with XLA's CPU code optimised (conftest turns that off for the suite): the interpreted
    # kernels at the tiny shape run ~7x longer unoptimised
    flags = os.environ.get("XLA_FLAGS", "").replace(CPU_QUICK_COMPILE_FLAGS, "")
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_ops.py"), "--shape", "tiny", "--reps", "2",
                        "--out", str(tmp_path / "ops.json")], env={**os.environ, "XLA_FLAGS": flags},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = json.loads((tmp_path / "ops.json").read_text())["rows"]
    assert len(rows) == 10 and all(r["xla_plain_ms"] > 0 for r in rows)
    assert [r["ranks_equal"] for r in rows if r["op"].startswith("routing sort")] == [True]
    assert [r["choices_equal"] for r in rows if r["op"].startswith("router top-k")] == [True]
    assert rows[-1]["op"].startswith("cross-entropy softmax pass") and rows[-1]["ours_ms"] > 0
    assert all(r["auto_mix_ms"] > 0 and r["xla_gathers_ms"] > 0 for r in rows if "permute" in r["op"])


def test_bench_ops_permute_sweep_runs_on_cpu(tmp_path):
    import bench_ops
    assert bench_ops.main(["--shape", "tiny", "--reps", "1", "--tune-permute", "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res["rows"]) == 16 and all(r["equal"] and r["permute_ms"] > 0 for r in res["rows"])
    assert all(r["scatter_equal"] and r["scatter_ms"] > 0 and r["dots_equal"] and r["dots_ms"] > 0 for r in res["rows"])
    assert res["default"] == {"block_elems": 8192, "warps": 4} and res["best"] in res["rows"]


def test_bench_compile_runs_on_cpu(tmp_path):
    import bench_compile
    assert bench_compile.main(["--config", "tiny_moe", "--layers", "2,3", "--out", str(tmp_path / "c.json"),
                               "model.d_model=32", "train.batch_size=2", "train.seq_len=16"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert [r["layers"] for r in res["rows"]] == [2, 3] and res["rows"][1]["ratio_to_first"] > 0
    assert bench_compile.main(["--config", "tiny_moe", "--layers", "2", "--out", str(tmp_path / "l.json"),
                               "model.d_model=32", "train.batch_size=2", "train.seq_len=16",
                               "train.programs=layers"]) == 0
    programs = json.loads((tmp_path / "l.json").read_text())["rows"][0]["programs_s"]
    assert {"forward", "backward", "head", "apply.update"} <= set(programs) and all(v > 0 for v in programs.values())


def test_probe_layer_memory_runs_on_cpu(tmp_path):
    """Its timeline has each layer's forward and backward and the head; the closures hold arrays."""
    import probe_layer_memory
    res = probe_layer_memory.main(["--config", "tiny_moe", "--out", str(tmp_path / "m.json"), "model.d_model=32",
                                   "model.num_layers=3", "moe.layer_freq=[0,1,1]", "train.batch_size=2",
                                   "train.seq_len=16"])
    events = [(r["event"], r["layer"]) for r in res["timeline"]]
    assert events == [("forward", 0), ("forward", 1), ("forward", 2), ("head", None),
                      ("backward", 2), ("backward", 1), ("backward", 0), ("gradients", None), ("update", None)]
    assert all(r["closure_gib"] > 0 for r in res["timeline"] if r["event"] == "forward")
    assert res["largest_closure"]["leaves"] and json.loads((tmp_path / "m.json").read_text())["config"] == "tiny_moe"
