"""experiments/train.py turns user mistakes into one `config error:` / `error:` line on stderr and a
nonzero exit code, before any model is built where possible (issue 15's list of errors)."""
import errno
import json

import jax
import numpy as np
import pytest

from moe_jax import checkpoint as C, data, runner, runs
from test_runs import TRAIN, cli, summary


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as building a model."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the error was found")
    monkeypatch.setattr(runner, "GPT", boom)


def one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


@pytest.mark.parametrize("args,match", [
    (["train.lr=abc"], "config error: TrainConfig.lr='abc' is invalid: must be a finite number"),
    (["model.tie_embeddings=Flase"], "config error: ModelConfig.tie_embeddings='Flase' is invalid"),
    # flags and overrides in any order: the override after the flag is read (and refused on its own)
    (["train.steps=3", "--no-progress", "train.eps=0"], "config error: TrainConfig.eps=0 is invalid"),
    pytest.param(["train.grad_accum=2", "train.batch_size=8", "parallel.data=8"],
                 "config error: TrainConfig.batch_size=8 is invalid with grad_accum=2",
                 marks=pytest.mark.devices(8)),
])
def test_config_errors_are_one_line(capsys, no_model, args, match):
    assert TRAIN.main(["--no-progress", *args]) == 2
    assert match in one_line(capsys, "config error: ")


def test_malformed_preset_is_one_line(tmp_path, capsys, no_model):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {d_model: [1, 2\n")
    assert TRAIN.main(["--config", str(p)]) == 2
    assert f"preset '{p}' is not valid YAML" in one_line(capsys, "config error: ")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    p = data.write_tokens(d / "good.bin", np.random.default_rng(0).integers(0, 257, 4000), 257)
    return p


def _damage(kind, src, tmp_path):
    import shutil
    bin_path, json_path = tmp_path / "d.bin", tmp_path / "d.json"
    shutil.copy(src, bin_path)
    shutil.copy(src.with_suffix(".json"), json_path)
    h = json.loads(json_path.read_text())
    if kind == "truncated":
        bin_path.write_bytes(bin_path.read_bytes()[:-5])
    elif kind == "count":
        json_path.write_text(json.dumps({**h, "num_tokens": h["num_tokens"] + 10}))
    elif kind == "dtype":
        json_path.write_text(json.dumps({**h, "dtype": "uint32"}))
    elif kind == "no_sidecar":
        json_path.unlink()
    elif kind == "bad_sidecar":
        json_path.write_text("{not json")
    elif kind == "empty":
        data.write_tokens(bin_path, np.zeros(0, np.int64), 257)
    elif kind == "legacy_ids":  # an old header (no max_token) claiming a vocab the ids exceed
        json_path.write_text(json.dumps({k: v for k, v in {**h, "vocab_size": 200}.items() if k != "max_token"}))
    return bin_path


@pytest.mark.parametrize("kind,vocab,match", [
    ("truncated", 257, r"token data .*d.bin is 7995 bytes, but its header says 4000 tokens .*truncated"),
    ("count", 257, r"d.bin is 8000 bytes, but its header says 4010 tokens"),
    ("dtype", 257, r"d.bin is 8000 bytes, but its header says 4000 tokens x 4 bytes \(uint32\)"),
    ("no_sidecar", 257, r"token file header .*d.json not found: re-create it"),
    ("bad_sidecar", 257, r"token file header .*d.json is not valid JSON"),
    ("empty", 257, r"the train split of .*d.bin has 0 tokens .* use more text or a smaller train.seq_len"),
    ("good", 200, r"the token file's vocab_size=257 is larger than the model's vocab_size=200"),
    ("legacy_ids", 200, r"d.bin holds token id 256, outside the model's vocab_size=200"),
])
def test_token_file_problems_are_one_line_before_any_model(token_file, tmp_path, capsys, no_model, kind,
                                                            vocab, match):
    path = token_file if kind == "good" else _damage(kind, token_file, tmp_path)
    out = tmp_path / "run"
    assert cli(f"train.data={path}", f"model.vocab_size={vocab}", f"train.out_dir={out}") == 1
    import re
    assert re.search(match, one_line(capsys, "error: ")), kind
    assert not out.exists()  # nothing written


def test_out_dir_that_is_a_file_or_not_writable(tmp_path, capsys, no_model, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert cli(f"train.out_dir={out}") == 1
        assert "is a file, not a directory; choose another train.out_dir" in one_line(capsys, "error: ")
    monkeypatch.setattr(runs.os, "access", lambda *a: False)
    assert cli(f"train.out_dir={tmp_path / 'ro'}") == 1
    assert "is not writable" in one_line(capsys, "error: ")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def make(*a, **k):
        def step(state, batch):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                             "171798691840 bytes.\nBufferAssignment OOM Debugging.\n...")
        return step
    monkeypatch.setattr(runner, "make_train_step", make)
    out = tmp_path / "oom"
    assert cli("train.steps=2", f"train.out_dir={out}") == 1
    line = one_line(capsys, "error: out of memory on cpu while running step 1")
    assert "lower train.batch_size (2) or train.seq_len (16)" in line and "model.remat=true" in line
    assert summary(out)["status"] == "error" and not (out / runs.LOCK_NAME).exists()


def _enospc(path="/runs/x/checkpoints/1/state"):
    e = RuntimeError("Orbax: the async save failed (thousands of lines of context follow)\n" + "x\n" * 2000)
    e.__cause__ = OSError(errno.ENOSPC, "No space left on device", path)
    return e


def test_full_disk_during_a_save_is_one_line(tmp_path, capsys, monkeypatch):
    def save(self, *a, **k):
        raise _enospc()
    monkeypatch.setattr(C.ocp.CheckpointManager, "save", save)
    out = tmp_path / "full"
    assert cli("train.steps=2", "train.checkpoint=true", "train.checkpoint_every=1", f"train.out_dir={out}") == 1
    line = one_line(capsys, "error: saving a checkpoint under ")
    assert "failed: No space left on device (/runs/x/checkpoints/1/state); free space" in line
    assert summary(out)["status"] == "error"


def test_async_save_errors_are_translated_at_wait(tmp_path, monkeypatch):
    ck = C.Checkpointer(tmp_path)

    def wait():
        raise _enospc(str(tmp_path / "3"))
    monkeypatch.setattr(ck._mgr, "wait_until_finished", wait)
    with pytest.raises(C.CheckpointError, match=r"No space left on device \(.*/3\)") as e:
        ck.close()
    assert "\n" not in str(e.value)
