"""How the batch reaches the step, and the GPU's idle time at step boundaries (a probe, not a benchmark).

  PYTHONPATH=. python experiments/probe_feed.py [--config mixtral_small] [--steps 20] [overrides ...]

For each way of feeding the batch — `numpy` (the host array passed to the jitted step, as the runner
does on one device), `put` (jax.device_put just before the dispatch) and `ahead` (batch i+1 put on the
device before step i is dispatched) — times steps sent back to back (median gap between the ends of
consecutive steps) and traces a few, reporting GPU busy time and the idle gaps (gpu_timeline.gaps).
Run it again with XLA_FLAGS=--xla_gpu_enable_command_buffer= to see what CUDA graphs change.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from gpu_timeline import busy_ns, gaps  # noqa: E402
from profile_model import build  # noqa: E402
from timing import gpu_events_with_stats, trace  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--traced", type=int, default=4)
    ap.add_argument("--modes", default="numpy,put,ahead")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg, state, step, data, _, _ = build(args.config, ["train.programs=one", *args.overrides])  # its feed
    n = 4 + args.steps + args.traced
    batches = [data.batch(i) for i in range(n)]
    compiled = step.lower(state, jax.device_put(batches[0])).compile()
    box = {"state": state, "i": 0, "next": None}
    del state
    results = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "config": args.config,
               "overrides": args.overrides, "modes": {}}

    def run(mode):
        b = batches[box["i"] % n]
        if mode == "put":
            b = jax.device_put(b)
        elif mode == "ahead":  # this step's batch went over before the step before was sent
            b = box["next"] if box["next"] is not None else jax.device_put(b)
            box["next"] = jax.device_put(batches[(box["i"] + 1) % n])
        box["state"], m = compiled(box["state"], b)
        box["i"] += 1
        return m["loss"]

    for mode in args.modes.split(","):
        box["next"] = None
        for _ in range(2):
            jax.block_until_ready(run(mode))
        ends, last = [], run(mode)
        for _ in range(args.steps):
            queued = run(mode)
            jax.block_until_ready(last)
            ends.append(time.perf_counter())
            last = queued
        jax.block_until_ready(last)
        wall = [1e3 * (b - a) for a, b in zip(ends, ends[1:])]
        data_ = trace(lambda: [run(mode) for _ in range(args.traced)])
        events = gpu_events_with_stats(data_) if data_ is not None else []
        row = {"wall_ms": statistics.median(wall), "wall_min_ms": min(wall), "wall_all": wall}
        if events:
            row["gpu_busy_ms"] = busy_ns(events) / args.traced / 1e6
            g = gaps(events, args.traced, top=4)
            row["gaps_ms"] = g["ms_per_step"]
            row["gaps_top"] = [(t["before"][:40], t["after"][:40], round(t["ms_per_step"], 3)) for t in g["top"]]
        results["modes"][mode] = row
        print(mode, json.dumps({k: v for k, v in row.items() if k != "wall_all"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
