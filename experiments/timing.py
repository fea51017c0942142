"""Wall-clock timing shared by the benchmark scripts (BENCHMARKS.md: warm up, wait, median)."""
from __future__ import annotations

import glob
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np


def median_seconds(fn: Callable, *args, iters: int = 20, warmup: int = 2,
                   rotate: Sequence[tuple] | None = None) -> float:
    """Median seconds of `fn(*args)` over `iters` calls, each waited on with `block_until_ready`,
    after `warmup` calls (compilation). `rotate` gives argument tuples to cycle through instead
    (so inputs that fit in L2 are not re-read from cache)."""
    sets = list(rotate) if rotate else [args]
    for i in range(warmup):
        jax.block_until_ready(fn(*sets[i % len(sets)]))
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*sets[i % len(sets)]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gpu_events(data, device: int = 0):
    """[(name, start ns, duration ns)] of GPU `device`'s kernel/memcpy stream events in a
    jax.profiler trace (a `jax.profiler.ProfileData`), sorted by start."""
    return [(name, start, dur) for name, start, dur, _ in gpu_events_with_stats(data, device, stats=False)]


def trace(fn: Callable, *args, calls: int = 1):
    """`calls` calls of `fn(*args)` (already compiled) under jax.profiler: the trace's ProfileData
    (None where no trace file was written)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        return jax.profiler.ProfileData.from_file(paths[0]) if paths else None


def device_ms(fn: Callable, *args, calls: int = 5) -> float | None:
    """GPU 0's kernel time per call of `fn(*args)` (already compiled), from a profiler trace:
    no host dispatch or sync in it. None where the trace has no GPU events (CPU)."""
    jax.block_until_ready(fn(*args))
    data = trace(fn, *args, calls=calls)
    ev = gpu_events(data) if data is not None else []
    return sum(d for _, _, d in ev) / calls / 1e6 if ev else None


def kernel_ms(fn: Callable, args: tuple, reps: int) -> float:
    """Milliseconds per call of `fn(*args)`: GPU time from a profiler trace (no dispatch in it, for passes of
    ~0.1-0.5 ms), host time (median of `reps`) where there is no trace (CPU)."""
    return device_ms(fn, *args, calls=reps) or 1e3 * median_seconds(fn, *args, iters=reps)


def fwd_bwd(f: Callable, *args):
    """(jit of f's forward and its VJP with a random cotangent, that cotangent): the op's forward +
    backward as one program to time."""
    out = jax.eval_shape(f, *args)
    ct = jax.tree.map(lambda o: jax.random.normal(jax.random.key(9), o.shape, np.float32).astype(o.dtype), out)

    @jax.jit
    def run(*a):
        y, vjp = jax.vjp(f, *a)
        return y, vjp(ct)
    return run, ct


def gpu_events_with_stats(data, device: int = 0, *, stats: bool = True):
    """`gpu_events` with each event's stats: [(name, start ns, duration ns, {stat: value})] (stat
    names as the profiler writes them, e.g. hlo_op, hlo_module, kernel_details; bytes decoded;
    `stats=False`: empty dicts)."""
    out = []
    for plane in data.planes:
        if plane.name != f"/device:GPU:{device}":
            continue
        for line in plane.lines:
            if "stream" in line.name.lower():
                out += [(ev.name, ev.start_ns, ev.duration_ns, event_stats(ev) if stats else {})
                        for ev in line.events]
    return sorted(out, key=lambda e: e[1])


def event_stats(ev) -> dict:
    """{name: value} of a ProfileData event's stats (unknown metadata ids, (None, None), skipped)."""
    out = {}
    for name, value in ev.stats:
        if name is not None:
            out[name] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return out


def write_result(kind: str, name: str, payload: dict, out: str | None = None):
    """Write a benchmark's JSON (with date, device, JAX version and the command) to `out`, or to
    experiments/results/<kind>_<name>_<date>_<device>.json; returns the path."""
    import datetime
    import json
    import sys
    from pathlib import Path
    stamp = datetime.datetime.now(datetime.timezone.utc)
    dev = jax.devices()[0].device_kind
    path = Path(out) if out else (Path(__file__).parent / "results" /
                                  f"{kind}_{name}_{stamp:%Y-%m-%d}_{dev.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": stamp.isoformat(timespec="seconds"), "device": dev,
                                "jax": jax.__version__, "command": "python " + " ".join(sys.argv),
                                **payload}, indent=2, default=float))
    return path
