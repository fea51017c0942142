"""Where the memory of a `train.programs=layers` step goes: device memory in use after each program.

  PYTHONPATH=. python experiments/probe_layer_memory.py --config mixtral_small model.param_dtype=bfloat16 \
      [--out PATH]

Builds the run as profile_model.py does (with `train.programs=layers`), runs one step (the compile), then
one more with `_Programs.watch` set: after each layer's forward, the head, each layer's backward, the
gradients and the update it waits for the program and reads the device's bytes in use (and the peak so
far: where it rises, the program just run set it), and for each forward the bytes of what it returned
for its backward (the activations its closure keeps; the layer's inputs, its weights and x, are
given to the backward again, not copied). Prints the timeline, the largest of those arrays for the
largest layer (shape, dtype), and the peak; writes JSON
(default experiments/results/layer_memory_<preset>_<date>_<device>.json). On CPU the device reports no
memory statistics: only the closures' bytes are reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from moe_jax import parallel  # noqa: E402
from profile_model import build  # noqa: E402

GIB = 2 ** 30


def _in_use() -> tuple[float | None, float | None]:
    stats = jax.devices()[0].memory_stats() or {}
    get = lambda k: stats[k] / GIB if k in stats else None  # noqa: E731
    return get("bytes_in_use"), get("peak_bytes_in_use")


def closure_leaves(vjp) -> list[dict]:
    """The arrays a backward closure holds, largest first: shape, dtype, how many, GiB together."""
    rows: dict = {}
    for x in jax.tree.leaves(vjp):
        r = rows.setdefault((tuple(x.shape), str(x.dtype)),
                            {"shape": list(x.shape), "dtype": str(x.dtype), "count": 0, "gib": 0.0})
        r["count"] += 1
        r["gib"] += x.nbytes / GIB
    return sorted(rows.values(), key=lambda r: -r["gib"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small")
    ap.add_argument("--top", type=int, default=25, help="closure leaves listed")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg, state, step, data, counts, layout = build(args.config, [*args.overrides, "train.programs=layers"])
    put = (lambda b: parallel.put_batch(b, layout)) if layout is not None else jax.device_put
    state = jax.block_until_ready(step(state, put(data.batch(0))))[0]  # compiles every program
    programs = step.programs
    timeline, closures = [], {}

    def watch(event, layer, value):
        jax.block_until_ready(value)
        in_use, peak = _in_use()
        row = {"event": event, "layer": layer, "in_use_gib": in_use, "peak_gib": peak}
        if event == "forward":  # what it kept, described (holding the arrays would add to the memory read)
            row["closure_gib"] = sum(x.nbytes for x in jax.tree.leaves(value)) / GIB
            closures.setdefault(row["closure_gib"], (layer, len(jax.tree.leaves(value)), closure_leaves(value)))
        timeline.append(row)
        gib = lambda v: "-" if v is None else f"{v:7.2f}"  # noqa: E731
        print(f"{event:9s} {'' if layer is None else layer:>3}  in use {gib(in_use)} GiB, peak so far {gib(peak)}"
              + (f"  closure {row['closure_gib']:.3f} GiB" if "closure_gib" in row else ""), flush=True)

    base, _ = _in_use()
    print(f"before the step: {'-' if base is None else f'{base:.2f}'} GiB in use (state, batch)")
    programs.watch = watch
    try:
        state, metrics = step(state, put(data.batch(1)))
        jax.block_until_ready(metrics["loss"])
    finally:
        programs.watch = None
    after, peak = _in_use()
    largest = max(closures) if closures else 0.0
    layer, count, leaves = closures.get(largest, (None, 0, []))
    leaves = leaves[:args.top]
    print(f"largest closure: layer {layer}, {largest:.3f} GiB in {count} arrays")
    for r in leaves:
        print(f"  {r['gib']:7.3f} GiB  {r['count']:2d} x {r['dtype']:9s} {r['shape']}")
    print(f"after the step: {'-' if after is None else f'{after:.2f}'} GiB in use; peak "
          f"{'-' if peak is None else f'{peak:.2f}'} GiB")
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": args.config,
           "overrides": list(args.overrides), "before_gib": base, "after_gib": after, "peak_gib": peak,
           "timeline": timeline, "largest_closure": {"layer": layer, "gib": largest, "leaves": leaves}}
    out = args.out or (f"experiments/results/layer_memory_{args.config}_{datetime.date.today()}_"
                       f"{jax.devices()[0].device_kind.replace(' ', '_')}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    print("wrote", out)
    return res


if __name__ == "__main__":
    main()
