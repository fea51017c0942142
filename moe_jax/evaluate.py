"""Held-out evaluation and the model at inference settings.

At inference (evaluation, sampling) the router adds no input jitter (no rng is passed) and routing is
dropless: `inference_config` turns `expert_capacity_factor` (and padding to capacity) off, so every
token reaches its top-k experts whatever the batch. Evaluation reports, besides loss and perplexity,
the router losses, the expert load and `dropped`: the assignments the *trained* capacity would have
dropped on these batches (per expert and batch, routed count minus the capacity of the whole
batch routed at once on one device), 0 for a dropless config.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import ops

from moe_jax import metrics as M
from moe_jax import parallel, runs
from moe_jax.checkpoint import CheckpointError
from moe_jax.config import ModelConfig, capacity
from moe_jax.model import GPT
from moe_jax.tokenizer import load_tokenizer, run_tokenizer
from moe_jax.train import split_model


def inference_config(mc: ModelConfig) -> ModelConfig:
    """`mc` with dropless routing (no capacity, no padding to it); dense configs unchanged."""
    if mc.moe is None or mc.moe.expert_capacity_factor is None:
        return mc
    moe = dataclasses.replace(mc.moe, expert_capacity_factor=None, pad_expert_input_to_capacity=False)
    return dataclasses.replace(mc, moe=moe)


def inference_graphdef(mc: ModelConfig):
    """The graphdef of `GPT(inference_config(mc))` (parameters as `split_model` splits them)."""
    return split_model(nnx.eval_shape(lambda: GPT(inference_config(mc), rngs=nnx.Rngs(0))))[0]


def for_inference(model: GPT) -> GPT:
    """`model`'s weights (and expert biases) in a GPT built with `inference_config` (shares arrays)."""
    _, params, rest = split_model(model)
    return nnx.merge(inference_graphdef(model.cfg), params, rest)


def make_eval_step(mc: ModelConfig, *, layout: parallel.Layout | None = None, shardings=None):
    """`step(params, model_state, batch) -> metrics`, jitted, no gradients: `ce` (mean token
    cross-entropy), each router loss, and `routed_counts` [L_moe, E] for MoE models; the model at
    inference settings. With a `layout`, `shardings` is the TrainState of shardings the state has."""
    graphdef = inference_graphdef(mc)

    def step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        x_BSD, aux = model.hidden(batch["inputs"], layout=layout)
        ce = ops.linear_cross_entropy(x_BSD.reshape(-1, x_BSD.shape[-1]), model.head(),
                                      batch["targets"].reshape(-1), kernels=mc.fused_kernels)
        out = {"ce": ce, **aux["losses"]}
        if "routed_counts" in aux:
            out["routed_counts"] = aux["routed_counts"]
        return out

    if layout is None:
        return jax.jit(step)
    return jax.jit(step, in_shardings=(shardings.params, shardings.model_state,
                                       parallel.batch_sharding(layout)),
                   out_shardings=parallel.replicated(layout))


def over_capacity(counts_LE: np.ndarray, tokens: int, mc: ModelConfig) -> int:
    """Assignments that `mc`'s capacity would drop given routed counts [L, E] of `tokens` tokens."""
    cap = None if mc.moe is None else capacity(tokens, mc.moe)
    if cap is None:
        return 0
    return int(np.maximum(np.asarray(counts_LE) - cap, 0).sum())


def evaluate(step, params, rest, dataset, num_batches: int, mc: ModelConfig,
             layout: parallel.Layout | None = None) -> dict:
    """Mean metrics over `dataset.batch(0 .. num_batches-1)` (the same batches at every call):
    `val_loss` (cross-entropy), `val_ppl`, `val_<router loss>`, and for MoE models `val_dropped`
    (summed; see the module docstring) and `val_imbalance`
    (max over MoE layers of max/mean expert load)."""
    sums: dict[str, float] = {}
    counts_LE, dropped = None, 0
    for i in range(num_batches):
        batch = dataset.batch(i)
        tokens = batch["inputs"].size
        if layout is not None:
            batch = parallel.put_batch(batch, layout)
        m = jax.device_get(step(params, rest, batch))
        for k, v in m.items():
            if k != "routed_counts":
                sums[k] = sums.get(k, 0.0) + float(v)
        if "routed_counts" in m:
            c = np.asarray(m["routed_counts"])
            counts_LE = c if counts_LE is None else counts_LE + c
            dropped += over_capacity(c, tokens, mc)
    out = {f"val_{'loss' if k == 'ce' else k}": v / num_batches for k, v in sums.items()}
    out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
    if counts_LE is not None:
        out["val_dropped"] = dropped
        out["val_imbalance"] = float(M.imbalance(counts_LE).max())
    return out


def load_for_inference(run: str | None = None, hf: str | None = None, step: int | None = None):
    """(Config or None, GPT, Tokenizer) from a run directory (its latest or `step` checkpoint and its
    tokenizer, `<run>/tokenizer/`) or a local Hugging Face checkpoint directory (its tokenizer files);
    the Config is the run's (None for `hf`). Raises CheckpointError / ValueError naming the problem."""
    from moe_jax.convert.hf import load_hf

    if (run is None) == (hf is None):
        raise ValueError("give a run directory or a Hugging Face directory (one of them)")
    if hf is not None:
        if not Path(hf).is_dir():
            raise CheckpointError(f"--hf {hf}: no such directory")
        _, model = load_hf(hf)
        return None, model, load_tokenizer(hf)
    if not Path(run).is_dir():
        raise CheckpointError(f"--run {run}: no such directory (give a train.out_dir that holds checkpoints/)")
    cfg, model = runs.load_model(run, step)
    return cfg, model, run_tokenizer(run)
