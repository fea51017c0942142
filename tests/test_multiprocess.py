"""Multi-host path on CPU: two processes (4 fake devices each) started through jax.distributed from
the JAX_COORDINATOR_* variables train the same steps as one process with 8 devices."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_jax.presets import load_config
from moe_jax.runner import train

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["parallel.expert=4", "train.steps=3", "train.log_every=1", "train.batch_size=8",
             "train.seq_len=32", "model.num_layers=2", "moe.layer_freq=[0,1]", "model.d_model=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    # 4 devices a process; the suite's other XLA flags kept (conftest: its quick CPU compile)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "PYTHONPATH": str(ROOT),
           # an empty cache: both processes need the embedded corpus at once (one builds, one waits)
           "MOE_JAX_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "--config", "tiny_moe",
           "--no-progress", *OVERRIDES, f"train.out_dir={tmp_path / 'mp'}"]
    procs = [subprocess.Popen(cmd, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "loss" in outs[0] and "step" not in outs[1]   # process 0 alone reports
    assert len(list((tmp_path / "mp" / "tb").iterdir())) == 1  # and alone writes the run's files

    ref = train(load_config("tiny_moe", OVERRIDES + [f"train.out_dir={tmp_path / 'one'}"]),
                progress=False, log=lambda *_: None)
    got = json.loads((tmp_path / "mp" / "history.json").read_text())
    want = json.loads((tmp_path / "one" / "history.json").read_text())
    assert len(got) == len(want) == 3 and ref["last_loss"] == pytest.approx(want[-1]["loss"])
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
