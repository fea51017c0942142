"""JAX's persistent compilation cache for training runs.

A run that compiles a program compiled before loads it from disk instead: a resume after an
interruption, or the same config on other data (`train.steps` shapes the learning-rate schedule, so it
is part of the program). Compiling `mixtral_small`'s step
takes ~2 minutes on an H200. The CLIs (`experiments/train.py`, `evaluate.py`, `generate.py`) turn the
cache on by default (`add_flag`, then `enable`), in
`$MOE_JAX_COMPILE_CACHE` or else `~/.cache/moe_jax/jax` (`$XDG_CACHE_HOME` respected). JAX's own
`JAX_COMPILATION_CACHE_DIR` wins over both. "none" turns the cache off.

JAX keys each entry on the program, the compile options and the JAX/XLA versions, so a changed
model or a new JAX compiles afresh. Only programs that took at least a second to compile are
written (JAX's `jax_persistent_cache_min_compile_time_secs`), and the directory is kept under
`MAX_BYTES` (least recently used entries go first) unless `jax_compilation_cache_max_size` is set.
With the directory set, JAX also keeps XLA's per-fusion GPU autotuning results there (its
`jax_persistent_cache_enable_xla_caches` default). A changed program can reuse them for the fusions it
shares.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

OFF = ("", "none", "off", "false", "0")
HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring's event for a program read from the cache
MAX_BYTES = 16 * 2**30  # least recently used entries go past this (a sweep of configs adds one per program)


_hits = [0]
_listening = [False]


def _count(event: str, **_) -> None:
    if event == HIT_EVENT:
        _hits[0] += 1


def hits() -> int:
    """Programs read from the persistent cache so far in this process (counted once `enable` turned the
    cache on; 0 before)."""
    return _hits[0]


def default_dir() -> str:
    """$MOE_JAX_COMPILE_CACHE, else <$XDG_CACHE_HOME or ~/.cache>/moe_jax/jax."""
    env = os.environ.get("MOE_JAX_COMPILE_CACHE")
    if env is not None:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "moe_jax" / "jax")


def add_flag(ap) -> None:
    """The CLIs' `--compile-cache DIR` flag (argparse)."""
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX's persistent compilation cache: a rerun of the same program loads it instead of "
                         "compiling (default: $MOE_JAX_COMPILE_CACHE or ~/.cache/moe_jax/jax; 'none': off; "
                         "JAX_COMPILATION_CACHE_DIR wins)")


def enable(path: str | None = None) -> str | None:
    """Use `path` (None: `default_dir()`; one of OFF: no cache) as JAX's persistent compilation cache,
    unless JAX_COMPILATION_CACHE_DIR is set (then JAX's own setting stands). Call before the first
    compile. Returns the directory in use, or None. A directory that cannot be created warns and
    leaves the cache off: a read-only home does not stop a run."""
    own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if own:
        _listen()
        return own
    path = default_dir() if path is None else path
    if path.strip().lower() in OFF:
        return None
    d = Path(path).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {d} ({e.strerror or e})", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    _listen()
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no limit; a user's own limit stands
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return str(d)


def first_step_note(seconds: float, new_hits: int) -> str:
    """The training log's line for the first step: its time, and whether its program was compiled
    or read from the cache (`new_hits`: `hits()` during the step)."""
    if new_hits:
        return f"first step: {seconds:.1f} s (the step's program read from the compile cache)"
    where = jax.config.jax_compilation_cache_dir
    kept = f"; kept in the compile cache ({where}) for a rerun" if where else ""
    return f"first step: {seconds:.1f} s (compiling the step included{kept})"


def _listen() -> None:
    if not _listening[0]:
        jax.monitoring.register_event_listener(_count)
        _listening[0] = True
