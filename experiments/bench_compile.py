"""Compile time of the train step against depth (BENCHMARKS.md §3: nearly flat with the layers
scanned; target: 16 layers within 1.35x of 4 on CPU, 48 within 1.3x of 12 on the GPU).

  PYTHONPATH=. python experiments/bench_compile.py --config tiny_moe --layers 4,16
  PYTHONPATH=. python experiments/bench_compile.py --config mixtral_small --layers 12,48 model.param_dtype=bfloat16
  PYTHONPATH=. python experiments/bench_compile.py --config mixtral_small --layers 12,48 train.programs=one

Each depth repeats the preset's layer pattern (its first layer kept as is, e.g. a first dense layer);
the step is lowered and compiled (no run), each depth in a new process (`--same-process`: all in this
one, where later depths reuse XLA's caches), and the JSON records seconds per depth and the ratios. With
per-layer programs (`train.programs`: auto, on one device) every program of a step is compiled (seconds
per program in the JSON); `train.programs=one` measures the step as one program.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax.model import GPT  # noqa: E402
from moe_jax.presets import load_config  # noqa: E402
from moe_jax.train import init_state, make_train_step  # noqa: E402
from timing import write_result  # noqa: E402


def depth_overrides(cfg, layers: int) -> list[str]:
    """num_layers=layers, with a layer_freq list pattern extended by repeating its last entry."""
    out = [f"model.num_layers={layers}"]
    if cfg.model.moe is not None and isinstance(cfg.model.moe.layer_freq, tuple):
        lf = list(cfg.model.moe.layer_freq)
        out.append(f"moe.layer_freq={(lf + [lf[-1]] * layers)[:layers]}".replace(" ", ""))
    return out


def compile_seconds(cfg) -> tuple[float, float, dict | None]:
    """(lower seconds, compile seconds, seconds per program or None) of the train step on abstract state
    and batch. Per-layer programs (`train.programs`, auto on one device): every program one step runs,
    each lowered and compiled (lowering counted in the compile seconds)."""
    tc = cfg.train
    graphdef, state = init_state_abstract(cfg)
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32) for k in ("inputs", "targets")}
    step = make_train_step(graphdef, tc)
    if hasattr(step, "build"):  # per-layer programs, or the one program of a scanned model
        programs = step.build(state)
        if programs is not None:
            t0 = time.perf_counter()
            seconds = programs.compile_all(state, batch)
            return 0.0, time.perf_counter() - t0, {k: v[1] for k, v in seconds.items()}
        step = step.one
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1, None


def init_state_abstract(cfg):
    """(graphdef, abstract TrainState) without allocating parameters."""
    box = {}

    def make():
        graphdef, state = init_state(GPT(cfg.model, rngs=nnx.Rngs(0)), cfg.train)
        box["graphdef"] = graphdef
        return state
    state = jax.eval_shape(make)
    return box["graphdef"], state


def measure(config: str, overrides: list[str], n: int) -> dict:
    """One depth's row: seconds lowering and compiling (and per program with train.programs=layers)."""
    base = load_config(config, overrides)
    cfg = load_config(config, list(overrides) + depth_overrides(base, n))
    lower_s, compile_s, programs = compile_seconds(cfg)
    row = {"layers": n, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
           "total_s": round(lower_s + compile_s, 2)}
    if programs is not None:
        row["programs_s"] = {k: round(v, 2) for k, v in programs.items()}
    return row


def measure_fresh(config: str, overrides: list[str], n: int) -> dict:
    """measure() in a new process with no persistent compile cache: XLA's in-process caches (GPU
    autotuning results, the backend's start-up) would otherwise make every depth after the first look
    cheaper, and the per-layer programs are the same at every depth."""
    with tempfile.TemporaryDirectory() as tmp:
        row_path = Path(tmp) / "row.json"
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # nor a program another depth left on disk
        subprocess.run([sys.executable, __file__, "--config", config, "--layers", str(n),
                        "--row-json", str(row_path), *overrides], check=True, env=env)
        return json.loads(row_path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny_moe")
    ap.add_argument("--layers", default="4,16", help="comma list of depths")
    ap.add_argument("--out", default=None)
    ap.add_argument("--same-process", action="store_true",
                    help="measure every depth in this process (default: each in a new one, so none reuses "
                         "another's compile caches)")
    ap.add_argument("--row-json", default=None, help=argparse.SUPPRESS)  # measure_fresh's child
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    depths = [int(v) for v in args.layers.split(",")]
    if args.row_json:
        Path(args.row_json).write_text(json.dumps(measure(args.config, args.overrides, depths[0])))
        return 0
    fresh = not args.same_process and len(depths) > 1
    rows = []
    for n in depths:
        row = (measure_fresh if fresh else measure)(args.config, args.overrides, n)
        rows.append(row)
        line = f"layers {n:>3}: lower {row['lower_s']:6.1f} s, compile {row['compile_s']:6.1f} s"
        if "programs_s" in row:
            line += "  (" + ", ".join(f"{k} {v:.1f}" for k, v in row["programs_s"].items()) + ")"
        print(line, flush=True)
    for r in rows[1:]:
        r["ratio_to_first"] = round(r["total_s"] / rows[0]["total_s"], 3)
        print(f"{r['layers']} vs {rows[0]['layers']} layers: {r['ratio_to_first']:.2f}x")
    write_result("compile", Path(args.config).stem, {"config": args.config, "overrides": args.overrides,
                                                     "fresh_process_per_depth": fresh, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
