"""A run directory (`train.out_dir`): one writer at a time (`RunLock`), what it holds (`config.yaml`,
`checkpoints/`, `history.json` and `summary.json`, kept by `RunRecord`), and its checkpoints read back
as a model (`load_model`).

Sits above `checkpoint`, `presets`, `model` and `train`: none of them imports it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from moe_jax.checkpoint import Checkpointer, CheckpointError, abstract_state, read_metadata
from moe_jax.model import GPT
from moe_jax.presets import build_config
from moe_jax.train import init_state, split_model

LOCK_NAME = "run.lock"
RUN_FILES = ("config.yaml", "history.json", "summary.json", "history.superseded.json", "expert_load.png")


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked: busy, holding another run, or not writable."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_out_dir(out: Path, what: str = "train.out_dir") -> None:
    """Raise RunDirError when `out` is a file, or lies under one, or cannot be created or written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise RunDirError(f"{what}={out} cannot be used: {p} is a file, not a directory; "
                                  f"choose another {what}")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunDirError(f"{what}={out} is not writable ({p}: permission denied); "
                                  f"choose another {what}")
            return


def checkpoint_steps(out: Path) -> list[int]:
    """The committed checkpoint steps under `<out>/checkpoints` (read-only: creates nothing)."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


# ---------------------------------------------------------------------------------------------
# One writer per run directory.

def _proc_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux), to tell a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return start is None or _proc_start(pid) in (None, start)


class RunLock:
    """`<out_dir>/run.lock`: created atomically (a hard link of a complete temporary file, so it
    never exists half-written) and holding the owner's pid, host, start time and command; removed by
    `release` (on every exit path through `with`). A lock whose process is gone (same host, pid dead
    or reused) is stale and taken over with a log line; any other lock refuses the second run."""

    def __init__(self, out: Path, info: dict, created: bool = False):
        self.path, self.info, self.created = out / LOCK_NAME, info, created

    @classmethod
    def acquire(cls, out_dir: str | Path, *, log=print, what: str = "train.out_dir") -> "RunLock":
        out = Path(out_dir)
        check_out_dir(out, what)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{what}={out} cannot be created: {e.strerror or e}; choose another {what}") \
                from None
        pid = os.getpid()
        info = {"pid": pid, "host": socket.gethostname(), "started": _now(), "pid_start": _proc_start(pid),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""}
        path = out / LOCK_NAME
        tmp = out / f".{LOCK_NAME}.{pid}.tmp"
        try:
            tmp.write_text(json.dumps(info))
            for _ in range(3):
                try:
                    os.link(tmp, path)
                    return cls(out, info, created)
                except FileExistsError:
                    other = cls._read(path)
                    if other is None or not cls._stale(other):
                        raise RunDirError(cls._busy(out, path, other, what)) from None
                    log(f"run lock: taking over the stale lock of pid {other.get('pid')} on "
                        f"{other.get('host')} (started {other.get('started')}): that process is gone")
                    path.unlink(missing_ok=True)
            raise RunDirError(f"{what}={out}: could not take {path} (other runs keep starting there)")
        except OSError as e:
            raise RunDirError(f"{what}={out} is not writable: {e.strerror or e}; choose another {what}") \
                from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> dict | None:
        for _ in range(5):
            try:
                info = json.loads(path.read_text())
                if isinstance(info, dict) and isinstance(info.get("pid"), int):
                    return info
            except FileNotFoundError:
                return {}  # released meanwhile: stale by definition, take it
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return None

    @staticmethod
    def _stale(info: dict) -> bool:
        if not info:
            return True
        return info.get("host") == socket.gethostname() and not _alive(info["pid"], info.get("pid_start"))

    @staticmethod
    def _busy(out: Path, path: Path, other: dict | None, what: str) -> str:
        if other is None:
            return (f"{what}={out} is locked by {path}, which is unreadable; if no run uses this directory, "
                    f"delete {path}")
        cmd = f" ({other['command']})" if other.get("command") else ""
        here = other.get("host") == socket.gethostname()
        gone = "" if here else f"; if that run is gone, delete {path}"
        return (f"{what}={out} is in use by another run: pid {other['pid']} on {other.get('host')}, "
                f"started {other.get('started')}{cmd}; wait for it, stop it, or choose another {what}{gone}")

    def release(self) -> None:
        """Remove the lock if it is still ours (and the directory, if this lock created it and nothing
        was written there: a refused run leaves no trace)."""
        try:
            if json.loads(self.path.read_text()).get("pid") == self.info["pid"]:
                self.path.unlink()
            if self.created:
                self.path.parent.rmdir()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *_) -> None:
        self.release()


def clear_run(out: Path, *, log=print) -> None:
    """Remove a previous run's outputs from `out` (its checkpoints, logs, TensorBoard events and
    tokenizer)."""
    removed = []
    for name in ("checkpoints", "superseded", "tb", "tokenizer"):
        if (out / name).exists():
            shutil.rmtree(out / name)
            removed.append(name + "/")
    for name in RUN_FILES:
        if (out / name).exists():
            (out / name).unlink()
            removed.append(name)
    if removed:
        log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")


def supersede_checkpoints(out: Path, after: int, *, log=print) -> list[int]:
    """Move the checkpoints of steps after `after` to `<out>/superseded/<time>/` (a resume from an
    older step continues from there; the later ones would otherwise collide with its saves)."""
    later = [s for s in checkpoint_steps(out) if s > after]
    if not later:
        return []
    dest = out / "superseded" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest.mkdir(parents=True)
    for s in later:
        os.replace(out / "checkpoints" / str(s), dest / str(s))
    log(f"resume from step {after}: moved the later checkpoints {later} to {dest}")
    return later


# ---------------------------------------------------------------------------------------------
# history.json and summary.json

class RunRecord:
    """`history.json` (one row per trained step, `step` 1-based as the log prints it) and
    `summary.json` of a run directory. A resume from step S keeps the rows up to S and appends; rows
    after S (steps redone, or abandoned by --resume-from) move to `history.superseded.json`. The
    summary lists every invocation (`segments`: start and end step, status, pid, times); `write` saves
    both files atomically, at checkpoints and on every exit path."""

    def __init__(self, out: Path, *, start_step: int, resume: bool, write: bool = True, log=print):
        self.out, self.enabled = Path(out), write
        self.history: list[dict] = []
        self.segments: list[dict] = []
        if resume and write:
            old = self._load("history.json", [])
            self.history = [r for r in old if isinstance(r, dict) and r.get("step", 0) <= start_step]
            dropped = [r for r in old if isinstance(r, dict) and r.get("step", 0) > start_step]
            if dropped:
                kept = self._load("history.superseded.json", [])
                _write_atomic(self.out / "history.superseded.json", json.dumps(kept + dropped))
                log(f"history.json: {len(dropped)} rows after step {start_step} moved to "
                    f"history.superseded.json (those steps are trained again)")
            self.segments = list(self._load("summary.json", {}).get("segments", []))
        self.segment = {"start_step": start_step, "end_step": start_step, "status": "running",
                        "pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "ended": None}
        self.segments.append(self.segment)

    def _load(self, name: str, default: Any) -> Any:
        try:
            value = json.loads((self.out / name).read_text())
        except (OSError, ValueError):
            return default
        return value if isinstance(value, type(default)) else default

    def append(self, row: dict) -> None:
        self.history.append(row)
        self.segment["end_step"] = row["step"]

    def summary(self, **fields) -> dict:
        finite = [r["loss"] for r in self.history if r.get("loss") is not None]
        mtp = [r["mtp_loss"] for r in self.history if r.get("mtp_loss") is not None]
        extra = {"first_mtp_loss": mtp[0], "last_mtp_loss": mtp[-1]} if mtp else {}
        return {"status": self.segment["status"], "first_loss": finite[0] if finite else None,
                "last_loss": finite[-1] if finite else None, **extra, **fields, "segments": self.segments}

    def write(self, status: str | None = None, message: str | None = None, **fields) -> dict:
        """Save history.json and summary.json (status: running | finished | nonfinite | error |
        interrupted); returns the summary."""
        if status is not None:
            self.segment["status"] = status
            self.segment["ended"] = None if status == "running" else _now()
        if message is not None:
            self.segment["message"] = message
        summary = self.summary(**fields)
        if self.enabled:
            _write_atomic(self.out / "history.json", json.dumps(self.history))
            _write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


# ---------------------------------------------------------------------------------------------
# A run's checkpoints, read back.

def stored_config(out: str | Path, step: int | None = None) -> dict | None:
    """The run config saved with checkpoint `step` (default: the latest) of the run in `out` (None when
    the run has no checkpoint, or the checkpoint no config); an absent `step` raises CheckpointError."""
    steps, where = checkpoint_steps(Path(out)), Path(out) / "checkpoints"
    if not steps:
        if step is not None:
            raise CheckpointError(f"--resume-from {step}: no checkpoint in {where}")
        return None
    if step is not None and step not in steps:
        raise CheckpointError(f"--resume-from {step}: no checkpoint for step {step} in {where}; "
                              f"available steps: {steps}")
    return read_metadata(where / str(steps[-1] if step is None else step)).get("config")


def load_model(directory: str | Path, step: int | None = None):
    """(Config, GPT) from a run's checkpoint (the run config is read from the checkpoint itself);
    `directory` is the checkpoints folder or the run's out_dir that holds `checkpoints/`."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints at {directory} (give a run's out_dir or its checkpoints/ folder)")
    ck = Checkpointer(directory)
    step = ck.resolve(step)
    raw = ck.metadata(step).get("config")
    if not raw:
        raise CheckpointError(f"checkpoint {directory / str(step)} carries no run config; "
                              "it was not written by experiments/train.py")
    cfg = build_config(raw)
    make = lambda: GPT(cfg.model, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef = split_model(nnx.eval_shape(make))[0]
    abstract = jax.eval_shape(lambda: init_state(make(), cfg.train)[1])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ck.restore(abstract_state(abstract, jax.tree.map(lambda _: one, abstract)), step)
    ck.close()
    return cfg, nnx.merge(graphdef, state.params, state.model_state)
