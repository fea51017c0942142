"""Wall-clock timing shared by the benchmark scripts (BENCHMARKS.md: warm up, wait, median)."""
from __future__ import annotations

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
