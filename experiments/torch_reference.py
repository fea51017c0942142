"""PyTorch reference for BENCHMARKS.md §3: the bench_mixtral / bench_deepseek models in plain PyTorch
(torch.compile, flash SDPA, torch._grouped_mm experts, fused AdamW), timed the same way as ours.

  python experiments/torch_reference.py --config mixtral_small [--param-dtype bf16|fp32] [--steps 20]
      [--warmup 3] [--batch 8] [--seq 2048] [--layers N] [--d-model D] [--tiny] [--no-compile]
      [--experts grouped|loop] [--sdpa auto|flash|cudnn|efficient|math] [--out PATH]

The model (torch_model.py; blocks in torch_layers.py, MLA and MTP in torch_mla.py) follows moe_jax
(model.py, moe.py, routing.py, mla.py, mtp.py): token embedding, pre-norm
blocks (RMSNorm in fp32), causal attention with rotate-half RoPE — GQA, or DeepSeek's multi-head latent
attention (`attention_type: mla`, experiments/torch_mla.py) —, dense SwiGLU or MoE FFN per `layer_freq`
(fp32 router, softmax top-k or sigmoid + group-limited top-k with a selection-only expert bias,
aux/seq-aux/z losses, dropless, routed experts as two grouped GEMMs, optional shared expert), final
RMSNorm, LM head, cross-entropy; with `mtp_num_layers`, DeepSeek-V3's multi-token-prediction modules
after it (torch_mla.py), their loss scaled by `mtp_loss_scaling_factor` and their router losses added,
as moe_jax.train's loss. Model FLOPs/token as moe_jax.metrics.flops_per_token: 6·N_active + causal
attention 3·(L + D_mtp)·S·N·(H_qk + H_v) + the LM head once more per MTP module 6·D_mtp·d_model·V.
Needs only torch + pyyaml. Without CUDA: fp32, eager, per-expert loop (for tests at tiny sizes).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from torch_model import build_model, flops_per_token, param_counts

ROOT = Path(__file__).resolve().parent.parent
PRESET_DIRS = (ROOT / "moe_jax" / "configs",)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0}
# moe_jax.config defaults of the fields used here (a preset only lists what differs)
MODEL_DEFAULTS = dict(vocab_size=512, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=None,
                      ffn_hidden_size=1024, norm="rmsnorm", norm_eps=1e-5, rope_theta=10000.0,
                      activation="swiglu", tie_embeddings=False, init_std=0.02, attention_bias=False,
                      qk_norm=False, attention_type="gqa", q_lora_rank=None, kv_lora_rank=None,
                      qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None, mtp_num_layers=0,
                      mtp_loss_scaling_factor=0.1)
MOE_DEFAULTS = dict(num_experts=8, router_topk=2, ffn_hidden_size=1024, router_score_function="softmax",
                    router_pre_softmax=False, router_topk_scaling_factor=None, router_num_groups=None,
                    router_group_topk=None, router_enable_expert_bias=False, router_bias_update_rate=1e-3,
                    router_load_balancing_type="aux_loss", aux_loss_coeff=1e-2, z_loss_coeff=None,
                    input_jitter_eps=None, expert_capacity_factor=None, shared_expert_intermediate_size=None,
                    shared_expert_gate=False, layer_freq=1, activation="swiglu",
                    router_force_load_balancing=False)
UNSUPPORTED = {("model", "norm"): "rmsnorm", ("model", "activation"): "swiglu", ("model", "attention_bias"): False,
               ("model", "qk_norm"): False, ("moe", "activation"): "swiglu", ("moe", "router_pre_softmax"): False,
               ("moe", "expert_capacity_factor"): None, ("moe", "input_jitter_eps"): None,
               ("moe", "router_force_load_balancing"): False, ("model", "rope_scaling"): None}


def load_preset(name: str) -> dict:
    """Raw YAML sections of a preset (a name under moe_jax/configs/, or a path)."""
    cands = [Path(name)] + [d / f"{name}.yaml" for d in PRESET_DIRS]
    path = next((p for p in cands if p.suffix in (".yaml", ".yml") and p.exists()), None)
    if path is None:
        raise SystemExit(f"unknown preset {name!r}: looked in {[str(d) for d in PRESET_DIRS]}")
    return yaml.safe_load(path.read_text()) or {}


def resolve(raw: dict, args) -> tuple[dict, dict, dict, dict]:
    """(model, moe, train sections after the command-line overrides; the full config used)."""
    model, moe, train = (dict(raw.get(s) or {}) for s in ("model", "moe", "train"))
    if args.tiny:  # same structure (experts, top-k, groups, layer pattern, MLA, MTP), toy widths
        model.update(d_model=64, num_heads=4, ffn_hidden_size=128, vocab_size=512)
        if model.get("attention_type") == "mla":
            model.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         **({"q_lora_rank": 32} if model.get("q_lora_rank") else {}))
        else:
            model["num_kv_heads"] = 2
        if moe:
            moe["ffn_hidden_size"] = 32
            if moe.get("shared_expert_intermediate_size"):
                moe["shared_expert_intermediate_size"] = 64
    if args.d_model:
        model["d_model"] = args.d_model
    if args.layers:
        lf = moe.get("layer_freq")
        if isinstance(lf, (list, tuple)) and len(lf) != args.layers:  # repeat the pattern
            moe["layer_freq"] = [lf[i % len(lf)] for i in range(args.layers)]
        model["num_layers"] = args.layers
    train["batch_size"] = args.batch or train.get("batch_size", 8)
    train["seq_len"] = args.seq or train.get("seq_len", 256)
    model["max_seq_len"] = max(model.get("max_seq_len", 2048), train["seq_len"])
    m, e = {**MODEL_DEFAULTS, **model}, ({**MOE_DEFAULTS, **moe} if moe else None)
    for (sec, key), ok in UNSUPPORTED.items():
        val = (m if sec == "model" else (e or {})).get(key, ok)
        if val != ok:
            raise SystemExit(f"{sec}.{key}={val!r} is not implemented in the torch reference (needs {ok!r})")
    used = {"model": model, "train": train, **({"moe": moe} if moe else {})}
    return m, e, train, used


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral_small", help="preset name or .yaml path")
    ap.add_argument("--param-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="bf16 params, or fp32 master weights with bf16 autocast (CPU: always fp32)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--tiny", action="store_true", help="toy widths (d_model 64, vocab 512), same structure")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--experts", choices=("grouped", "loop"), default=None,
                    help="grouped = torch._grouped_mm (default on CUDA), loop = per-expert matmuls")
    ap.add_argument("--sdpa", choices=("auto", "flash", "cudnn", "efficient", "math"), default="auto")
    ap.add_argument("--peak-tflops", type=float, help="bf16 dense peak (default: by device name)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def time_steps(step, warmup, steps, cuda):
    """(first step's seconds, compile included; seconds of each timed step, between CUDA events on a GPU
    with no host sync in between; every step's loss)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def mark():
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    t0 = time.perf_counter()
    losses = [step()]
    sync()
    first = time.perf_counter() - t0
    losses += [step() for _ in range(warmup - 1)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    marks = [mark()]
    for _ in range(steps):
        losses.append(step())
        marks.append(mark())
    sync()
    times = [(a.elapsed_time(z) / 1e3 if cuda else z - a) for a, z in zip(marks, marks[1:])]
    return first, times, [float(x) for x in losses]


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:  # fp32 matmuls (the router) may use TF32, as XLA's default precision does
        torch.set_float32_matmul_precision("high")
    else:  # toy sizes only; OpenMP threads spinning against a busy host cost seconds per step
        torch.set_num_threads(1)
    m, c, tc, cfg = resolve(load_preset(args.config), args)
    fp32_master = args.param_dtype == "fp32" or not cuda
    pdt, cdt = (torch.float32 if fp32_master else torch.bfloat16), (torch.bfloat16 if cuda else torch.float32)
    grouped = (args.experts or ("grouped" if cuda else "loop")) == "grouped"
    torch.manual_seed(0)
    model = build_model(m, c, dev, pdt, cdt, grouped)
    counts = param_counts(model, c)
    b, s = tc["batch_size"], tc["seq_len"]
    flops_tok = flops_per_token(m, counts["active"], s)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    moe_layers = model.moe_layers()  # the rows of the routed counts forward returns
    tokens = torch.randint(0, m["vocab_size"], (b, s + 1), device=dev)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    use_compile = cuda and not args.no_compile
    fwd = [torch.compile(model) if use_compile else model]

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda and fp32_master):
            loss, _, routed = fwd[0](inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=cuda)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # aux-loss-free balancing: bias += rate * sign(mean - count)
            for j, layer in enumerate(moe_layers):
                if layer.expert_bias is not None:
                    cnt = routed[j].float()
                    layer.expert_bias += c["router_bias_update_rate"] * torch.sign(cnt.mean() - cnt)
        return loss.detach()

    run, note = contextlib.ExitStack(), None  # the SDPA backend choice holds for the whole run
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
        run.enter_context(sdpa_kernel(getattr(SDPBackend, names.get(args.sdpa, "MATH"))))
    with run:
        try:
            first, times, losses = time_steps(step, args.warmup, args.steps, cuda)
        except Exception as e:  # noqa: BLE001 — a compile failure must not cost the reference number
            if not use_compile:
                raise
            note = f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager instead"
            print("WARNING:", note, file=sys.stderr, flush=True)
            opt.zero_grad(set_to_none=True)
            fwd[0], use_compile = model, False
            first, times, losses = time_steps(step, args.warmup, args.steps, cuda)
    med = statistics.median(times)
    tok_s = b * s / med
    tflops = tok_s * flops_tok / 1e12
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    try:
        graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) if use_compile else None
    except Exception:  # noqa: BLE001 — internal counters
        graph_breaks = None
    gib = (lambda x: x / 2**30) if cuda else (lambda x: None)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
        "preset": Path(args.config).stem, "config": cfg, "param_dtype": "fp32" if fp32_master else "bf16",
        "compile": use_compile, "compile_note": note, "graph_breaks": graph_breaks,
        "experts": "grouped_mm" if grouped else "loop", "sdpa": args.sdpa, "batch": b, "seq": s,
        "layers": m["num_layers"], "params": counts, "flops_per_token": flops_tok,
        "step_time_s": med, "step_times_ms": [round(1e3 * t, 3) for t in times], "tokens_per_s": tok_s,
        "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "first_step_s": first, "compile_s": max(first - med, 0.0),
        # peak over the timed steps (reset after warm-up); the whole process's peak is reserved memory
        "peak_memory_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "reserved_memory_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "losses": losses,
    }
    mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
    mem = "n/a" if not cuda else f"{res['peak_memory_gib']:.1f}"
    print(f"torch_ref {res['preset']} {res['param_dtype']} params: {1e3 * med:.1f} ms/step | {tok_s:.0f} tok/s | "
          f"{tflops:.1f} TFLOP/s | MFU {mfu} | peak mem {mem} GiB | compile {res['compile_s']:.1f} s | "
          f"{counts['total'] / 1e9:.3f}B / {counts['active'] / 1e9:.3f}B params | loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    stem = f"torch_ref_{res['preset']}_{res['date'][:10]}_{name.replace(' ', '_')}"
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    res["out"] = str(out)
    return res


if __name__ == "__main__":
    r = main()
    sys.exit(0 if all(math.isfinite(x) for x in r["losses"]) else 1)
