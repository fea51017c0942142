"""Run directories (issue 15): NaN-safe checkpoints, one writer per out_dir, a resume that keeps the
run's settings and logs, and refused commands that leave the directory as it was. Training runs go
through experiments/train.py's `main` in-process (a tiny dense model: a few seconds each)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint as C, data, runs
from moe_jax.model import GPT
from moe_jax.presets import load_config, to_dict
from moe_jax.resume import ConfigChangeError, check_resume, config_changes
from moe_jax.train import init_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "experiments" / "train.py")
TRAIN = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(TRAIN)

BASE = ["--no-progress", "--config", "dense_small", "model.d_model=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=2", "model.ffn_hidden_size=32", "model.vocab_size=257",
        "train.batch_size=2", "train.seq_len=16", "train.tensorboard=false", "train.heatmap=false",
        "train.data=synthetic", "train.log_every=1", "train.warmup_steps=0"]


def cli(*args) -> int:
    return TRAIN.main([*BASE, *args])


def files(d: Path) -> dict:
    """Every file under `d` with its bytes (a refused command must leave all of them as they were)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run checkpointed after steps 1 and 2 (tests work on copies)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert cli("train.steps=2", "train.checkpoint=true", "train.checkpoint_every=1", f"train.out_dir={out}") == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "r")
    return tmp_path / "r"


def _finite_params(out: Path, step: int) -> bool:
    cfg, model = runs.load_model(out, step)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Finding 1: a NaN checkpoint became the latest; the process hung; the error's step was 0-based.

def test_nan_stop_keeps_the_latest_checkpoint_finite_and_exits_promptly(tmp_path):
    out = tmp_path / "x"
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), *BASE, "train.steps=30",
                        "train.lr=1e4", "train.checkpoint=true", "train.checkpoint_every=1",
                        f"train.out_dir={out}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.time() - t0 < 120, "no idle minutes after the NaN stop"
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "became nan at step" in errors[0], r.stderr[-3000:]
    bad = int(errors[0].split("at step ")[1].split(":")[0])
    logged = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("step ")]
    assert logged == list(range(1, bad)), "the error names the step as the log numbers it"
    steps = runs.checkpoint_steps(out)
    assert steps and steps[-1] == bad - 1 and f"the latest checkpoint is step {bad - 1}" in errors[0]
    assert _finite_params(out, steps[-1])
    assert not list((out / "checkpoints").glob("*tmp*")), "no half-written save left behind"
    assert summary(out)["status"] == "nonfinite" and [h["step"] for h in history(out)] == logged
    assert not (out / runs.LOCK_NAME).exists()

    # --resume-from an older step with a lower lr: the later checkpoints move aside, the logs go on
    back = steps[-2] if len(steps) > 1 else steps[-1]
    assert cli("--resume-from", str(back), "train.lr=1e-3", f"train.steps={bad + 1}",
               f"train.out_dir={out}") == 0
    assert [h["step"] for h in history(out)] == list(range(1, bad + 2))
    assert runs.checkpoint_steps(out)[-1] == bad + 1 and _finite_params(out, bad + 1)
    moved = sorted(int(p.name) for p in (out / "superseded").glob("*/*"))
    assert moved == [s for s in steps if s > back]
    segs = summary(out)["segments"]
    assert [(s["start_step"], s["status"]) for s in segs] == [(0, "nonfinite"), (back, "finished")]


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
    """The last guard: whatever the loop checked, a state holding NaN/inf is never written."""
    import flax.struct

    @flax.struct.dataclass
    class S:
        step: jax.Array
        w: jax.Array
    ck = C.Checkpointer(tmp_path)
    bad = S(step=jnp.int32(3), w=jnp.ones((4, 8)).at[1, 2].set(jnp.inf))
    with pytest.raises(C.NonFiniteStateError, match=r"not saving checkpoint .*/3: 1 of 2 arrays hold NaN/inf "
                                                     r"values, e.g. \['w'\]"):
        ck.save(bad)
    ck.save(bad.replace(w=jnp.ones((4, 8))))
    ck.close()
    assert ck.all_steps() == [3]


@pytest.mark.parametrize("programs", ["one", "layers"])
def test_skip_nonfinite_steps_leaves_the_state_unchanged(programs):
    """train.skip_nonfinite_steps: a step whose loss or gradient norm is not finite applies no update
    (params, optimizer and expert-bias state as they were); the step and data position move on. With
    train.programs=layers the update runs a layer at a time (moe_jax/layer_update.py)."""
    cfg = load_config("tiny_moe", ["model.d_model=16", "model.num_layers=1", "moe.layer_freq=1",
                                   "moe.num_experts=2", "moe.ffn_hidden_size=8", "train.skip_nonfinite_steps=2",
                                   "moe.router_enable_expert_bias=true", "moe.router_score_function=sigmoid",
                                   f"train.programs={programs}"])
    graphdef, state = init_state(GPT(cfg.model, rngs=nnx.Rngs(0)), cfg.train)
    step = make_train_step(graphdef, cfg.train)
    rows = np.random.default_rng(0).integers(0, 256, (2, 17))
    good = {"inputs": jnp.asarray(rows[:, :-1], jnp.int32), "targets": jnp.asarray(rows[:, 1:], jnp.int32)}
    bad = {**good, "targets": good["targets"].at[0, 3].set(cfg.model.vocab_size)}  # out of range: NaN loss
    before = jax.device_get(state)
    new, m = step(state, bad)
    assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
    after = jax.device_get(new)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.model_state)),
                    jax.tree.leaves((after.params, after.opt_state, after.model_state))):
        np.testing.assert_array_equal(a, b)
    assert int(after.step) == 1 and int(after.data_pos) == 1
    new, m = step(new, good)
    assert not bool(m["skipped"]) and np.isfinite(float(m["loss"]))


def test_skip_policy_in_the_loop_then_stop(tmp_path, monkeypatch, capsys):
    """Steps 2 and 4 read out-of-range targets: with skip_nonfinite_steps=1 step 2 is skipped (logged,
    a history row) and the run stops at step 4, its checkpoints all finite."""
    real = data.SyntheticDataset.batch

    def poisoned(self, i):
        b = real(self, i)
        if i in (1, 3):
            b["targets"] = b["targets"].copy()
            b["targets"][0, 0] = 10_000
        return b
    monkeypatch.setattr(data.SyntheticDataset, "batch", poisoned)
    out = tmp_path / "s"
    rc = cli("train.steps=6", "train.skip_nonfinite_steps=1", "train.checkpoint=true",
             "train.checkpoint_every=1", f"train.out_dir={out}")
    io = capsys.readouterr()
    assert rc == 1 and "loss became nan at step 4 (the 1 allowed by train.skip_nonfinite_steps are used up)" in io.err
    assert "step      2 | loss became nan: update skipped (1 of train.skip_nonfinite_steps=1)" in io.out
    assert [(h["step"], h.get("skipped", False)) for h in history(out)] == [(1, False), (2, True), (3, False)]
    assert runs.checkpoint_steps(out) == [1, 2, 3] and _finite_params(out, 2)


# ---------------------------------------------------------------------------------------------
# Finding 2: two runs in one out_dir overwrote each other.

def test_a_second_run_is_refused_while_the_first_holds_the_lock(run_copy, capsys):
    lock = runs.RunLock.acquire(run_copy)  # run A (this process) is writing there
    before = files(run_copy)
    assert cli("--resume", "train.steps=3", f"train.out_dir={run_copy}") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"is in use by another run: pid {os.getpid()}" in err
    assert f"started {lock.info['started']}" in err
    assert files(run_copy) == before
    lock.release()
    assert not (run_copy / runs.LOCK_NAME).exists()


def test_lock_is_atomic_and_stale_locks_are_taken_over(tmp_path):
    won, lost = [], []

    def take():
        try:
            won.append(runs.RunLock.acquire(tmp_path / "d"))
        except runs.RunDirError as e:
            lost.append(str(e))
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    won[0].release()

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process on this host holds it: refused, naming it
        lock = runs.RunLock.acquire(tmp_path / "d")
        (tmp_path / "d" / runs.LOCK_NAME).write_text(json.dumps(
            {**lock.info, "pid": other.pid, "pid_start": runs._proc_start(other.pid)}))
        with pytest.raises(runs.RunDirError, match=rf"in use by another run: pid {other.pid} on "):
            runs.RunLock.acquire(tmp_path / "d")
    finally:
        other.kill()
        other.wait()
    logs = []  # its process is gone: the lock is stale, taken over with a log line
    runs.RunLock.acquire(tmp_path / "d", log=logs.append).release()
    assert logs and f"taking over the stale lock of pid {other.pid}" in logs[0]


def test_a_fresh_run_into_another_runs_checkpoints_needs_overwrite(run_copy, capsys):
    before = files(run_copy)
    assert cli("train.steps=1", f"train.out_dir={run_copy}") == 1
    err = capsys.readouterr().err
    assert "already holds the checkpoints [1, 2] of another run" in err and "--overwrite" in err
    assert files(run_copy) == before
    assert cli("train.steps=1", "train.seed=1", f"train.out_dir={run_copy}", "--overwrite") == 0
    assert runs.checkpoint_steps(run_copy) == [] and [h["step"] for h in history(run_copy)] == [1]
    assert "seed: 1" in (run_copy / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Findings 3 and 4: --resume saved nothing without train.checkpoint=true; history was truncated.

def test_resume_keeps_checkpointing_and_appends_the_logs(finished_run, run_copy, capsys):
    first = history(finished_run)
    # no preset, no checkpoint flags: the run's own config, train.steps raised
    assert TRAIN.main(["--resume", "--no-progress", f"train.out_dir={run_copy}", "train.steps=4"]) == 0
    assert runs.checkpoint_steps(run_copy) == [2, 3, 4]  # saved every step, as the run did (keep 3)
    h = history(run_copy)
    assert [r["step"] for r in h] == [1, 2, 3, 4] and h[:2] == first
    s = summary(run_copy)
    assert s["status"] == "finished" and s["first_loss"] == first[0]["loss"] and s["step"] == 4
    assert [(g["start_step"], g["end_step"]) for g in s["segments"]] == [(0, 2), (2, 4)]
    capsys.readouterr()
    # nothing to do: the logs stay, the summary says so
    assert TRAIN.main(["--resume", "--no-progress", f"train.out_dir={run_copy}"]) == 0
    assert "nothing to do: the run is already at step 4" in capsys.readouterr().out
    assert history(run_copy) == h and summary(run_copy)["first_loss"] == first[0]["loss"]


def test_ctrl_c_and_errors_leave_consistent_logs_and_no_lock(tmp_path, monkeypatch, capsys):
    real = data.SyntheticDataset.batch
    fail = {"at": 2, "exc": KeyboardInterrupt}

    def batch(self, i):
        if i == fail["at"]:
            raise fail["exc"]()
        return real(self, i)
    monkeypatch.setattr(data.SyntheticDataset, "batch", batch)
    out = tmp_path / "c"
    args = ("train.steps=4", "train.checkpoint=true", "train.checkpoint_every=1", f"train.out_dir={out}")
    assert cli(*args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert summary(out)["status"] == "interrupted" and [h["step"] for h in history(out)] == [1, 2]
    assert runs.checkpoint_steps(out) == [1, 2] and not (out / runs.LOCK_NAME).exists()

    fail.update(at=3, exc=lambda: RuntimeError("boom"))  # a bug, not a user error: the traceback stays
    with pytest.raises(RuntimeError, match="boom"):
        cli("--resume", *args)
    s = summary(out)
    assert s["status"] == "error" and s["segments"][-1]["message"] == "RuntimeError: boom"
    assert [h["step"] for h in history(out)] == [1, 2, 3] and not (out / runs.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# Findings 5 and 6: refused commands rewrote config.yaml; config changes on resume were silent.

def test_a_refused_resume_leaves_the_run_directory_as_it_was(run_copy, capsys):
    before = files(run_copy)
    assert cli("--resume", "model.d_model=64", f"train.out_dir={run_copy}") == 2
    err = capsys.readouterr().err
    assert "config error: cannot resume" in err and "model.d_model 32 → 64" in err
    assert files(run_copy) == before
    assert cli("--resume", "model.rope_theta=500000", "model.norm_eps=1e-6", f"train.out_dir={run_copy}") == 2
    err = capsys.readouterr().err
    assert "would change the model's function: model.norm_eps 1e-05 → 1e-06, model.rope_theta 10000.0 → " \
           "500000" in err and "--allow-config-change" in err
    assert files(run_copy) == before


def test_config_changes_are_classified():
    base = ["model.d_model=32", "model.num_layers=2", "moe.layer_freq=[0,1]"]
    old = load_config("tiny_moe", base)
    new = load_config("tiny_moe", base + ["moe.router_topk=1", "moe.router_score_function=sigmoid",
                                          "model.rope_theta=500000", "train.lr=1e-3", "train.steps=9",
                                          "parallel.expert=2", "moe.dispatcher.type=allgather",
                                          "moe.aux_loss_coeff=0.1", "model.dtype=bfloat16"])
    kinds = {c.key: c.kind for c in config_changes(old, new)}
    assert kinds == {"moe.router_topk": "function", "moe.router_score_function": "function",
                     "model.rope_theta": "function", "train.lr": "run", "train.steps": "run",
                     "parallel.expert": "run", "moe.dispatcher.type": "run", "moe.aux_loss_coeff": "run",
                     "model.dtype": "run"}
    same = load_config("tiny_moe", base + ["model.head_dim=8", "moe.layer_freq=([0]*1+[1]*1)"])
    assert config_changes(old, same) == []  # two spellings of one model
    shape = load_config("tiny_moe", base + ["moe.num_experts=4", "train.grad_clip=null", "model.activation=gelu"])
    assert {c.key for c in config_changes(old, shape) if c.kind == "shape"} == {
        "moe.num_experts", "train.grad_clip", "model.activation"}
    with pytest.raises(ConfigChangeError, match=r"function: .*moe.router_topk 2 → 1"):
        check_resume(to_dict(old), new, where="ckpt", log=lambda *_: None)
    logs = []
    check_resume(to_dict(old), new, where="ckpt", allow_function_change=True, log=logs.append)
    assert "changing the model's function (--allow-config-change): " in logs[0]
    assert "settings changed from the checkpoint's config: " in logs[1] and "train.lr 0.002 → 0.001" in logs[1]


# A truncated checkpoint data file: one line, not a 1,500-line CheckpointError.

def test_truncated_checkpoint_is_one_line(run_copy, capsys):
    for f in (run_copy / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d" and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = files(run_copy)
    assert TRAIN.main(["--resume", "--no-progress", f"train.out_dir={run_copy}", "train.steps=3"]) == 1
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert err.count("\n") == 0 and line.startswith("error: checkpoint "), err
    assert "/checkpoints/2 could not be read (truncated or corrupted?)" in line and len(line) < 800
    assert "--resume-from" in line
    assert files(run_copy) == before


def test_benchmark_times_steps_with_the_next_one_queued(tmp_path):
    """--benchmark's step time: the gaps between the ends of consecutive steps (the loop sends step
    i+1 before it waits for step i, and keeps the data position on the host)."""
    from moe_jax.runner import train
    over = [a for a in BASE if "=" in a] + [f"train.out_dir={tmp_path / 'b'}", "train.steps=9"]
    cfg = load_config("dense_small", over)
    s = train(cfg, benchmark=True, progress=False, log=lambda *_: None)
    assert s["trained_steps"] == 9 and 0 < s["step_time_s"] < 10
    assert s["tokens_per_s"] == pytest.approx(2 * 16 / s["step_time_s"])
    hist = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [r["step"] for r in hist] == list(range(1, 10))
