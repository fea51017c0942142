"""MoE layer forward+backward against a dense MLP of the same FLOPs (BENCHMARKS.md §3).

  PYTHONPATH=. python experiments/bench_moe.py [--backends xla,pallas] [--iters 20]

For each reference model's MoE layer (tokens = batch 8 × seq 2048, bf16) it times `jax.vjp` of the
layer with a random cotangent, and the same for a dense SwiGLU MLP with hidden size top-k × expert
ffn (+ the shared expert), i.e. the same matmul FLOPs. Prints a table and writes
experiments/results/moe_layer_<date>_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax.presets import load_config  # noqa: E402
from moe_jax.layers import MLP  # noqa: E402
from moe_jax.moe import MoELayer  # noqa: E402
from timing import median_seconds  # noqa: E402

MODELS = {"bench_mixtral": ("mixtral_small", []),
          "bench_deepseek": ("deepseek_small", ["moe.router_score_function=softmax",
                                                "moe.router_num_groups=null", "moe.router_group_topk=null",
                                                "moe.router_enable_expert_bias=false"])}


def fwd_bwd(module, tokens, d):
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x, ct):
        def f(state, x):
            out = nnx.merge(graphdef, state)(x)
            return out[0] if isinstance(out, tuple) else out
        y, vjp = jax.vjp(f, state, x)
        return y, vjp(ct)

    return lambda x, ct: run(state, x, ct)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="xla,pallas" if "H100" in jax.devices()[0].device_kind
                    or "H200" in jax.devices()[0].device_kind else "xla")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        preset, ov = MODELS[name]
        base = load_config(preset, ov + ["model.num_layers=1", "moe.layer_freq=1"]).model
        m = base.moe
        d = base.d_model
        shape = (args.batch, args.seq, d)
        keys = jax.random.split(jax.random.key(0), 6)
        args_list = [(jax.random.normal(keys[2 * i], shape, jnp.bfloat16),
                      jax.random.normal(keys[2 * i + 1], shape, jnp.bfloat16)) for i in range(3)]
        tokens = args.batch * args.seq
        hidden = m.router_topk * m.ffn_hidden_size + m.shared_size
        flops = 3 * 2 * tokens * 3 * d * hidden  # fwd + bwd (2x), three matmuls of SwiGLU
        dense = MLP(base, hidden, rngs=nnx.Rngs(0))
        t_dense = median_seconds(fwd_bwd(dense, tokens, d), iters=args.iters, rotate=args_list)
        row = {"model": name, "tokens": tokens, "dense_ms": t_dense * 1e3,
               "dense_tflops": flops / t_dense / 1e12}
        for backend in args.backends.split(","):
            for balanced in (False, True):
                cfg = dataclasses.replace(base, moe=dataclasses.replace(
                    m, grouped_gemm_backend=backend, router_force_load_balancing=balanced))
                layer = MoELayer(cfg, rngs=nnx.Rngs(0))
                key = f"{backend}{'_balanced' if balanced else ''}"
                try:
                    t = median_seconds(fwd_bwd(layer, tokens, d), iters=args.iters, rotate=args_list)
                    row[f"{key}_ms"] = t * 1e3
                    row[f"{key}_vs_dense"] = t_dense / t
                except Exception as e:  # noqa: BLE001 — report and continue with the other variants
                    row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row))
    print("\n| model | dense fwd+bwd ms (TFLOP/s) | " + " | ".join(
        k[:-3] for k in rows[0] if k.endswith("_ms") and k != "dense_ms") + " |")
    for r in rows:
        cells = [f"{r[k]:.2f} ms ({100 * r[k[:-3] + '_vs_dense']:.0f} %)" for k in r
                 if k.endswith("_ms") and k != "dense_ms"]
        print(f"| {r['model']} | {r['dense_ms']:.2f} ({r['dense_tflops']:.0f}) | " + " | ".join(cells) + " |")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    out = Path(__file__).parent / "results" / f"moe_layer_{stamp:%Y-%m-%d}_{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": stamp.isoformat(timespec="seconds"), "device": dev,
                               "jax": jax.__version__, "command": " ".join(sys.argv), "rows": rows},
                              indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
