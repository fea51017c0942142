"""Orbax checkpoints of the whole `TrainState` (params, optimizer state, step, data position, RNG,
expert-bias state).

- `Checkpointer`: an `ocp.CheckpointManager` with async saves, keep-last-K plus keep-every-M, atomic
  commits (Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a process
  killed mid-save leaves the previous checkpoint the latest restorable one) and `restore(target)`.
- Reshard on restore: `target` is a state (or an abstract one, `abstract_state`) whose leaves carry
  the *new* shardings; every leaf, optimizer moments included, is read straight into that layout, so
  EP/TP/FSDP may differ from the run that saved it (`parallel.tree_shardings` gives such a layout
  from the params' logical axes).
- Derived state is not written: the compute-dtype copy of the experts' weights
  (`TrainState.compute_params`, moe_jax/weight_copy.py) is rebuilt from the restored weights.
- Loud failures, never a partial load: each checkpoint carries a manifest (every leaf's path, shape,
  dtype and a layout-independent fingerprint of its bits). Restore compares the manifest with the
  target (naming every differing path) and the restored bits with the fingerprints.
"""
from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import weight_copy

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, from a different model, unreadable, or could not be written."""


class NonFiniteStateError(CheckpointError):
    """A state holding NaN/inf values was about to be saved (it is not)."""


def short_error(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line: the first line of the message, TensorStore specs cut, long
    messages shortened to their end (where the file and the reason are)."""
    text = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec", 1)[0]
    text = text if len(text) <= limit else "..." + text[-limit:]
    return f"{type(e).__name__}: {text}"


class _DropOrphanedTaskErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


def _closed_loop_hook(previous):
    """`sys.unraisablehook` that drops `RuntimeError: Event loop is closed` and passes the rest on."""
    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)
    hook.quiet_failed_reads = True
    return hook


def quiet_failed_reads() -> None:
    """For command-line tools: after a failed restore, Orbax's other reads fail or finish too, and each
    one is reported when its task is garbage-collected (asyncio's log) or when its callback finds
    Orbax's event loop closed (a traceback printed from TensorStore's threads): thousands of lines for
    one damaged checkpoint, whose first error `Checkpointer.restore` raises already. Drop exactly
    those reports (a process-wide logging filter and `sys.unraisablehook` wrapper)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrphanedTaskErrors) for f in log.filters):
        log.addFilter(_DropOrphanedTaskErrors())
    if not getattr(sys.unraisablehook, "quiet_failed_reads", False):
        sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (its own, a cause or context, at any depth), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


_DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}


def _save_error(e: BaseException, where: Path) -> CheckpointError:
    """A failed (possibly async) save as one line naming the path and what to do."""
    os_err = _os_error(e)
    text = str(e)
    for code, name in _DISK_ERRORS.items():
        if (os_err is not None and os_err.errno == code) or name in text:
            path = (os_err.filename if os_err is not None and os_err.filename else None) or where
            return CheckpointError(f"saving a checkpoint under {where} failed: {name} ({path}); free space "
                                   f"or fix the permissions there, or set another train.out_dir, then "
                                   f"continue with --resume")
    return CheckpointError(f"saving a checkpoint under {where} failed: {short_error(e)}")


# ---------------------------------------------------------------------------------------------
# The state as a flat {path: array} dict (typed PRNG keys as their uint32 key data).

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    return "/".join(_key_name(k) for k in path)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten(tree) -> dict[str, Any]:
    """{"params/blocks/0/attn/wq_DNH/value": leaf, ...}; PRNG keys become their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf) and isinstance(leaf, jax.ShapeDtypeStruct):
            data = jax.eval_shape(jax.random.key_data, leaf)
            sh = leaf.sharding
            if isinstance(sh, NamedSharding):
                sh = NamedSharding(sh.mesh, P())
            leaf = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sh)
        elif _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        out[path_str(path)] = leaf
    return out


def unflatten(flat: dict[str, Any], like):
    """Inverse of `flatten` onto the structure of `like` (re-wrapping PRNG keys like its leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    vals = []
    for path, ref in leaves:
        v = flat[path_str(path)]
        if _is_key(ref):
            impl = ref.dtype._impl.name if isinstance(ref, jax.ShapeDtypeStruct) else jax.random.key_impl(ref)
            v = jax.random.wrap_key_data(v, impl=impl)
        vals.append(v)
    return jax.tree_util.tree_unflatten(treedef, vals)


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        *parents, last = k.split("/")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _unnest(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_unnest(v, name) if isinstance(v, dict) else {name: v})
    return out


def _bits_u32(x: jax.Array) -> jax.Array:
    """The raw bits of x as uint32 (same shape; 8-byte types get a trailing axis of 2 words)."""
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


@jax.jit
def _fingerprints(flat: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Per leaf: sum_i bits_i * (2i+1) mod 2^32 over row-major index i: position-aware and
    independent of the sharding (no reshapes, so it runs on any layout); and whether it is finite."""
    def fp(x):
        b = _bits_u32(x)
        idx, stride = jnp.zeros(b.shape, jnp.uint32), 1
        for d in reversed(range(b.ndim)):
            idx = idx + jax.lax.broadcasted_iota(jnp.uint32, b.shape, d) * jnp.uint32(stride % 2**32)
            stride *= b.shape[d]
        return jnp.sum(b * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)

    def finite(x):
        return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return {k: fp(v) for k, v in flat.items()}, {k: finite(v) for k, v in flat.items()}


def fingerprints(flat: dict[str, jax.Array]) -> dict[str, int]:
    return {k: int(v) for k, v in jax.device_get(_fingerprints(flat)[0]).items()}


def manifest(flat: dict[str, Any], *, with_fingerprints: bool = True) -> dict[str, dict]:
    """Every leaf's shape, dtype and fingerprint; raises NonFiniteStateError naming the leaves that
    hold NaN/inf (computed in the same pass as the fingerprints)."""
    fps = {}
    if with_fingerprints:
        fps, finite = jax.device_get(_fingerprints(flat))
        bad = [k for k, ok in finite.items() if not ok]
        if bad:
            raise NonFiniteStateError(f"{len(bad)} of {len(flat)} arrays hold NaN/inf values, e.g. {bad[:3]}")
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype), **({"fp": int(fps[k])} if fps else {})}
            for k, v in flat.items()}


# ---------------------------------------------------------------------------------------------
# Layouts: abstract targets and shardings from the params' logical axes.

def abstract_state(state, shardings=None):
    """`state` as ShapeDtypeStructs; with the leaves' own shardings, or `shardings` (same tree)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)), state)
    # `shardings` may be a prefix of `state` (e.g. one sharding per nnx Variable)
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(lambda s, sub: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub), shardings, state, is_leaf=is_sh)


def reshard(state, shardings):
    """`state` placed in `shardings` (the same tree, or a prefix: one sharding per nnx Variable)."""
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(lambda s, sub: jax.device_put(sub, s), shardings, state, is_leaf=is_sh)


def _without_copy(state):
    """`state` without the derived weight copy (what a checkpoint holds)."""
    if getattr(state, "compute_params", None) is None:
        return state
    return state.replace(compute_params=None)


# ---------------------------------------------------------------------------------------------
# The manager.

class Checkpointer:
    """Train-state checkpoints under `directory` (one sub-directory per step).

    keep: the last `keep` checkpoints are kept; keep_every: also every step divisible by it.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        self.directory = Path(directory).resolve()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                            enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(
            self.directory, options=opts,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # -- queries
    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save
    def save(self, state, *, config: dict | None = None, force: bool = True) -> bool:
        """Start an (async) save of `state` at its step; returns when the arrays are safe to donate.

        A state with NaN/inf values is refused (NonFiniteStateError, nothing written); a failed
        write (a full disk, no permission) raises a one-line CheckpointError naming the path, here or
        from the next `save`/`wait`/`close` when the write was async."""
        step = int(jax.device_get(state.step))
        flat = flatten(_without_copy(state))
        try:
            leaves = manifest(flat)
        except NonFiniteStateError as e:
            raise NonFiniteStateError(f"not saving checkpoint {self.directory / str(step)}: {e}") from None
        meta = {"format": FORMAT, "step": step, "config": config, "leaves": leaves}
        try:
            return self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_nest(flat)), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 — a pending async save's error surfaces here too
            raise _save_error(e, self.directory) from e

    def wait(self) -> None:
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise _save_error(e, self.directory) from e

    def close(self) -> None:
        """Wait for pending saves, release Orbax's threads, then raise the saves' error, if any."""
        error = None
        try:
            self.wait()
        except CheckpointError as e:
            error = e
        try:
            self._mgr.close()
        except Exception as e:  # noqa: BLE001 — the same failed save, reported again
            error = error or _save_error(e, self.directory)
        if error is not None:
            raise error

    # -- restore
    def resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        return step

    def metadata(self, step: int | None = None) -> dict:
        return read_metadata(self.directory / str(self.resolve(step)))

    def restore(self, target, step: int | None = None, *, verify: bool = True):
        """Restore step (default: latest) into the structure, shapes and shardings of `target`
        (arrays or ShapeDtypeStructs with `.sharding`)."""
        step = self.resolve(step)
        meta = self.metadata(step)
        copy_like, target = getattr(target, "compute_params", None), _without_copy(target)
        flat_t = flatten(abstract_state(target))
        check_compatible(meta["leaves"], flat_t, where=str(self.directory / str(step)))
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat_t.items()}
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_nest(abstract))))
        except Exception as e:  # noqa: BLE001 — any reader failure means the checkpoint is unusable
            if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
                raise  # out of (device) memory: not the checkpoint's fault
            raise CheckpointError(f"checkpoint {self.directory / str(step)} could not be read "
                                  f"(truncated or corrupted?): {short_error(e)}; resume from another "
                                  f"step (--resume-from) or another copy") from e
        flat = _unnest(dict(out["state"]))
        missing = sorted(set(abstract) - set(flat))
        if missing:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} lacks {len(missing)} "
                                  f"arrays: {missing[:8]}")
        if verify:
            fps = fingerprints(flat)
            bad = [k for k, v in meta["leaves"].items() if "fp" in v and fps[k] != v["fp"]]
            if bad:
                raise CheckpointError(f"checkpoint {self.directory / str(step)} is corrupted: "
                                      f"{len(bad)} arrays differ from their saved fingerprints, "
                                      f"e.g. {bad[:5]}")
        state = unflatten(flat, target)
        if copy_like is not None:
            state = state.replace(compute_params=weight_copy.refresh(state.params, copy_like))
        return state


def read_metadata(step_dir: str | Path) -> dict:
    """The manifest of the checkpoint in `step_dir` (format, step, run config, leaves), read without
    starting a checkpoint manager."""
    path = Path(step_dir) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir} has no readable manifest ({path}): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {step_dir} has format {got!r}, expected {FORMAT}")
    return meta


def check_compatible(saved: dict[str, dict], flat_target: dict[str, Any], *, where: str) -> None:
    """Raise CheckpointError naming every path that is missing, unexpected, or of another shape/dtype."""
    problems = []
    for k in sorted(set(flat_target) - set(saved)):
        problems.append(f"  {k}: expected by the model, not in the checkpoint")
    for k in sorted(set(saved) - set(flat_target)):
        problems.append(f"  {k}: in the checkpoint {tuple(saved[k]['shape'])}, not in the model")
    for k in sorted(set(saved) & set(flat_target)):
        s, t = saved[k], flat_target[k]
        if tuple(s["shape"]) != tuple(t.shape) or s["dtype"] != str(t.dtype):
            problems.append(f"  {k}: checkpoint {tuple(s['shape'])} {s['dtype']} vs model "
                            f"{tuple(t.shape)} {t.dtype}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"checkpoint {where} does not match the model/optimizer being restored "
                              f"(different config?); {len(problems)} differences:\n"
                              + "\n".join(problems[:20]) + more)
