"""The training loop: data, progress bar, log lines, TensorBoard, expert-load heatmap, NaN guard."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from ops.grouped_matmul import resolve_backend
from ops.tuning import table_note

from moe_jax import distributed, metrics as M
from moe_jax import ep, parallel
from moe_jax.attention import resolve_impl
from moe_jax.checkpoint import Checkpointer, abstract_state
from moe_jax.config import Config
from moe_jax.presets import to_dict
from moe_jax.data import make_dataset
from moe_jax.model import GPT
from moe_jax.train import init_sharded_state, init_state, make_train_step


class NonFiniteLossError(RuntimeError):
    pass


def kernels_note(mc) -> str:
    """Which attention kernel and grouped-GEMM tuning the model runs with here (for the log)."""
    note = f"attention {resolve_impl(mc.attention_impl, mc.dtype, (mc.head_dim_,))}"
    if mc.moe is not None:
        gemm = resolve_backend(mc.moe.grouped_gemm_backend, mc.dtype)
        note += f" | grouped GEMM {gemm}" + (f" ({table_note()})" if gemm == "pallas" else "")
    return note


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def train(cfg: Config, *, benchmark: bool = False, progress: bool = True, log=print,
          resume: bool = False) -> dict:
    """Train `cfg` for `cfg.train.steps` steps; return a summary dict (also saved as summary.json).

    With `train.checkpoint`, the state is saved (async) every `train.checkpoint_every` steps and at the
    end under `<out_dir>/checkpoints`; `resume` continues from the latest checkpoint there (restored
    into this run's layout, whatever the layout that saved it).
    """
    tc, mc = cfg.train, cfg.model
    # multi-host: every process trains; process 0 alone logs and writes the run's files (checkpoints
    # are written by all, as Orbax requires)
    main = distributed.is_main_process()
    if not main:
        log, progress = (lambda *_, **__: None), False
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    layout = parallel.layout_for(cfg)  # None on one device; else the mesh over all hosts' devices
    if layout is None:
        model = GPT(mc, rngs=nnx.Rngs(tc.seed))
        counts = M.param_counts(model)
        graphdef, state = init_state(model, tc)
        shardings = None
        del model
    else:
        counts = M.param_counts(nnx.eval_shape(lambda: GPT(mc, rngs=nnx.Rngs(tc.seed))))
        graphdef, state, shardings = init_sharded_state(mc, tc, layout)
        disp = ""
        if mc.moe is not None and layout.moe_mesh.shape["expert"] > 1:
            row = jax.ShapeDtypeStruct((1, mc.d_model), jnp.dtype(mc.dtype))
            disp = f" | dispatcher {ep.resolve_type(mc.moe.dispatcher.type, row)}"
        log(f"mesh: {layout.describe()}{disp}")
    ckpt = None
    if tc.checkpoint or resume:
        ckpt = Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every)
        if resume and ckpt.latest_step() is None:
            log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
        elif resume:
            target = abstract_state(state)
            del state  # free the fresh state before reading the checkpoint into its layout
            state = ckpt.restore(target)
            log(f"resumed from {ckpt.directory / str(int(state.step))}")
    step_fn = make_train_step(graphdef, tc, layout=layout, shardings=shardings)
    data = make_dataset(tc, mc.vocab_size)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_tok = M.flops_per_token(mc, counts["active"], tc.seq_len)
    peak = tc.peak_tflops or M.peak_tflops()
    n_dev = 1 if layout is None else layout.num_devices
    log(f"model: {counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active "
        f"({len(mc.moe_layers)} MoE layers) | {jax.devices()[0].device_kind} | "
        f"{tokens_per_step} tokens/step | {flops_tok / 1e9:.3f} GFLOP/token | {kernels_note(mc)}")

    writer = M.Writer(out / "tb" if tc.tensorboard and not benchmark and main else None)
    load_LE = None
    history, step_times = [], []
    prev = None  # (step, metrics) of the previous step: read one step late so the host never stalls
    t_last, tok_since = time.perf_counter(), 0
    bar = tqdm(total=tc.steps, disable=not progress, dynamic_ncols=True, desc="train")

    def consume(step: int, m: dict):
        nonlocal load_LE, t_last, tok_since
        loss = float(m["loss"])
        if not np.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss} at step {step}: stopping (lower train.lr, "
                                     f"enable train.grad_clip, or check the data)")
        row = {"step": step, "loss": loss, "ce": float(m["ce"])}
        if "routed_counts" in m:
            counts_LE = np.asarray(m["routed_counts"])
            load_LE = counts_LE if load_LE is None else load_LE + counts_LE
            row["imbalance"] = float(M.imbalance(counts_LE).max())
            row["dropped"] = int(np.asarray(m["dropped"]).sum())
        history.append(row)
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            now = time.perf_counter()
            tok_s = tok_since / (now - t_last)
            tflops = tok_s * flops_tok / 1e12 / n_dev
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
            aux = {k: float(v) for k, v in m.items() if k.endswith("loss") and k != "loss"}
            aux_s = "".join(f" | {k} {v:.4f}" for k, v in aux.items())
            bal = f" | imbalance {row['imbalance']:.2f}" if "imbalance" in row else ""
            (bar.write if progress else log)(f"step {step + 1:>6} | loss {loss:.4f}{aux_s} | lr {float(m['lr']):.2e} | "
                      f"{_fmt_rate(tok_s)} tok/s | {tflops:.2f} TFLOP/s/dev | MFU {mfu}{bal}")
            sc = {"loss/total": loss, "loss/ce": row["ce"], "opt/lr": float(m["lr"]),
                  "opt/grad_norm": float(m["grad_norm"]), "perf/tokens_per_s": tok_s,
                  "perf/tflops_per_device": tflops, **{f"loss/{k}": v for k, v in aux.items()}}
            if "routed_counts" in m:
                for j, layer in enumerate(mc.moe_layers):
                    c = counts_LE[j]
                    sc[f"moe/layer{layer}/imbalance"] = float(M.imbalance(c[None])[0])
                    sc.update({f"moe/layer{layer}/tokens_expert{e}": float(v) for e, v in enumerate(c)})
                sc["moe/dropped"] = row["dropped"]
            writer.scalars(step + 1, sc)
            t_last, tok_since = now, 0

    start, saved_at = int(state.step), int(state.step)
    for step in range(start, tc.steps):
        batch = data.batch(int(state.data_pos))
        if layout is not None:
            batch = parallel.put_batch(batch, layout)
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        if prev is not None:
            consume(*prev)
        if benchmark:
            jax.block_until_ready(m["loss"])
            step_times.append(time.perf_counter() - t0)
        tok_since += tokens_per_step
        if step == start:  # keep compilation out of the throughput numbers
            jax.block_until_ready(m["loss"])
            t_last, tok_since = time.perf_counter(), 0
        prev = (step, m)
        bar.update(1)
        if ckpt is not None and tc.checkpoint and tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0:
            ckpt.save(state, config=to_dict(cfg))  # async: returns once the arrays are on the host
            saved_at = step + 1
    if prev is not None:
        consume(*prev)
    if ckpt is not None:
        if tc.checkpoint and saved_at != int(state.step):
            ckpt.save(state, config=to_dict(cfg))
        ckpt.close()
    bar.close()
    writer.close()

    summary = {"steps": tc.steps, "params": counts, "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None,
               "flops_per_token": flops_tok, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__}
    if benchmark and len(step_times) > 3:
        med = float(np.median(step_times[min(5, len(step_times) // 2):]))
        tflops = tokens_per_step * flops_tok / med / 1e12 / n_dev
        summary.update(num_devices=n_dev, step_time_s=med, tokens_per_s=tokens_per_step / med, tflops_per_device=tflops,
                       mfu=tflops / peak if peak else None, peak_memory_gib=M.peak_memory_gib())
    if not main:
        return summary
    if load_LE is not None and tc.heatmap and not benchmark:
        png = M.save_load_heatmap(load_LE, mc.moe_layers, out / "expert_load.png")
        summary["heatmap"] = str(png)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    return summary
