"""A run directory (`train.out_dir`): the run's config and checkpoints, read back as a model.

Sits above `checkpoint`, `presets`, `model` and `train`: none of them imports it.
"""
from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from moe_jax.checkpoint import Checkpointer, CheckpointError, abstract_state
from moe_jax.model import GPT
from moe_jax.presets import build_config
from moe_jax.train import init_state, split_model


def load_model(directory: str | Path, step: int | None = None):
    """(Config, GPT) from a run's checkpoint (the run config is read from the checkpoint itself);
    `directory` is the checkpoints folder or the run's out_dir that holds `checkpoints/`."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    ck = Checkpointer(directory)
    step = ck.resolve(step)
    raw = ck.metadata(step).get("config")
    if not raw:
        raise CheckpointError(f"checkpoint {directory / str(step)} carries no run config; "
                              "it was not written by experiments/train.py")
    cfg = build_config(raw)
    make = lambda: GPT(cfg.model, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef = split_model(nnx.eval_shape(make))[0]
    abstract = jax.eval_shape(lambda: init_state(make(), cfg.train)[1])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ck.restore(abstract_state(abstract, jax.tree.map(lambda _: one, abstract)), step)
    ck.close()
    return cfg, nnx.merge(graphdef, state.params, state.model_state)
