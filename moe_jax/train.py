"""Train state, optimizer, loss and the jitted train step (gradient accumulation, expert-bias update)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ops

from moe_jax import parallel, weight_copy
from moe_jax.config import ModelConfig, TrainConfig
from moe_jax.model import GPT, REMAT_POLICIES
from moe_jax.mtp import mtp_loss


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `model_state` holds non-parameter state (expert biases);
    `compute_params` the experts' weights in the compute dtype, derived from `params` and not
    checkpointed (moe_jax/weight_copy.py; None without one)."""

    step: jax.Array
    data_pos: jax.Array   # index of the next batch to read: resuming continues the data exactly
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
    compute_params: Any = None


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig, *, clip: bool = True) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping. `clip=False`: the clip is an identity
    (the same state), for an update that clips by a norm computed beforehand (moe_jax/layer_update.py)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    chain = []
    if tc.grad_clip:
        chain.append(optax.clip_by_global_norm(tc.grad_clip) if clip else optax.identity())
    chain.append(optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                             weight_decay=tc.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
    """Mean token cross-entropy of given logits, computed in float32 (the train step fuses it with
    the LM head instead: `ops.linear_cross_entropy`)."""
    logits = logits_BSV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_BS[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - gold)


def split_model(model: GPT):
    """graphdef, trainable params, the rest (expert biases and other non-Param state)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: GPT, tc: TrainConfig, optimizer: optax.GradientTransformation | None = None):
    """Build (graphdef, TrainState) for `model`."""
    graphdef, params, rest = split_model(model)
    optimizer = optimizer or make_optimizer(tc)
    copy = weight_copy.init(params, model.cfg.dtype) if tc.expert_weight_copy else None
    state = TrainState(step=jnp.zeros((), jnp.int32), data_pos=jnp.zeros((), jnp.int32),
                       params=params, opt_state=optimizer.init(params), model_state=rest,
                       rng=jax.random.key(tc.seed + 1), compute_params=copy)
    return graphdef, state


def init_sharded_state(cfg: ModelConfig, tc: TrainConfig, layout: parallel.Layout,
                       optimizer: optax.GradientTransformation | None = None):
    """(graphdef, TrainState, state shardings): the state created directly in its shards (params and
    optimizer moments by the logical-axis rules, the rest replicated) — never whole on one device."""
    optimizer = optimizer or make_optimizer(tc)
    create = lambda: init_state(GPT(cfg, rngs=nnx.Rngs(tc.seed)), tc, optimizer)[1]  # noqa: E731
    graphdef = split_model(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(tc.seed))))[0]
    shardings = parallel.tree_shardings(jax.eval_shape(create), layout)
    return graphdef, jax.jit(create, out_shardings=shardings)(), shardings


def _update_expert_biases(model: GPT, routed_counts_LE: jax.Array, mtp_counts=None) -> None:
    """One aux-loss-free bias step per MoE layer from the step's routed counts (rows: the MoE
    layers in order, as the stacks hold them; `mtp_counts` [D, E]: the MTP blocks', when MoE)."""
    j = 0
    for stack, (is_moe, _, n) in zip(model.stacks, model.runs):
        if is_moe:
            stack.mlp.router.update_bias(routed_counts_LE[j:j + n])
            j += n
    if mtp_counts is not None:
        for k, module in enumerate(model.mtp):
            module.block.mlp.router.update_bias(mtp_counts[k])


def _add_losses(losses: dict, more: dict) -> dict:
    return {**losses, **{k: losses.get(k, 0.0) + v for k, v in more.items()}}


def head_loss(model: GPT, h_BSD: jax.Array, targets: jax.Array, aux: dict, *, rng, layout):
    """The loss from the last layer's output on: final norm, LM head fused with the cross-entropy,
    multi-token prediction; plus every router loss in `aux["losses"]`. Returns (total, (ce, aux))."""
    x_BSD = model.final_norm(h_BSD)
    ce = ops.linear_cross_entropy(x_BSD.reshape(-1, x_BSD.shape[-1]), model.head(), targets.reshape(-1),
                                  kernels=model.cfg.fused_kernels)  # no [B, S, V] logits in memory
    total = ce
    if model.mtp is not None:  # multi-token prediction: its loss scaled, its router losses as they are
        remat = (None if model.cfg.remat == "none" else  # the model's remat policy, as its layers
                 lambda f: jax.checkpoint(f, policy=REMAT_POLICIES[model.cfg.remat], prevent_cse=False))
        mtp, mtp_aux = mtp_loss(model, h_BSD, targets, rng=rng, layout=layout, remat=remat)
        total = total + model.cfg.mtp_loss_scaling_factor * mtp
        aux = {**aux, "losses": _add_losses(aux["losses"], mtp_aux["losses"]), "mtp_loss": mtp}
        if "routed_counts" in mtp_aux:
            aux["mtp_routed_counts"] = mtp_aux["routed_counts"]
    total = total + sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
    return total, (ce, aux)


def step_metrics(tc: TrainConfig, step, total, ce, aux, grad_norm) -> dict:
    """The step's metrics from the micro-batches' losses (leading axis) and the gradient norm."""
    metrics = {"loss": total.mean(), "ce": ce.mean(), "grad_norm": grad_norm, "lr": lr_schedule(tc)(step)}
    metrics.update({k: v.mean() for k, v in aux["losses"].items()})
    if "mtp_loss" in aux:
        metrics["mtp_loss"] = aux["mtp_loss"].mean()  # mean over the MTP modules, before scaling
    return metrics


def update_biases(graphdef, params, model_state, aux) -> tuple[Any, dict]:
    """(model_state after the step's expert-bias update, its metrics); unchanged without routed counts.
    `model_state` itself is left as it was (the update runs on a copy of its tree)."""
    if "routed_counts" not in aux:
        return model_state, {}
    routed = aux["routed_counts"].sum(0)
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, model_state))  # merge's Variables mutate
    mtp_counts = aux["mtp_routed_counts"].sum(0) if "mtp_routed_counts" in aux else None
    _update_expert_biases(model, routed, mtp_counts)
    return split_model(model)[2], dict(tokens_per_expert=aux["tokens_per_expert"].sum(0), routed_counts=routed,
                                       dropped=aux["dropped"].sum(0))


def step_ok(metrics: dict) -> jax.Array:
    """Whether the step's loss and gradient norm are finite (`train.skip_nonfinite_steps` skips it if not)."""
    return jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])


def where_ok(ok, new, old):
    """`new` where ok, else `old`, leaf by leaf (a skipped step keeps the old values)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_apply(graphdef, tc: TrainConfig, optimizer: optax.GradientTransformation):
    """`apply(state, grads, total, ce, aux, rng) -> (state, metrics)`: the step after the gradients —
    optimizer update, expert-bias update, metrics, the non-finite skip, the weight copy's refresh.
    `total`, `ce` and `aux` carry a leading micro-batch axis; `grads` are in the params' dtypes."""

    def apply(state: TrainState, grads, total, ce, aux, rng) -> tuple[TrainState, dict]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = step_metrics(tc, state.step, total, ce, aux, optax.tree.norm(grads))
        model_state, more = update_biases(graphdef, params, state.model_state, aux)
        metrics.update(more)
        if tc.skip_nonfinite_steps:  # a non-finite loss or gradient: keep the old weights, skip the batch
            ok = step_ok(metrics)
            params, opt_state, model_state = where_ok(ok, (params, opt_state, model_state),
                                                      (state.params, state.opt_state, state.model_state))
            metrics["skipped"] = ~ok
        new = state.replace(step=state.step + 1, data_pos=state.data_pos + 1, params=params,
                            opt_state=opt_state, model_state=model_state, rng=rng,
                            compute_params=weight_copy.refresh(params, state.compute_params))
        return new, metrics
    return apply


def step_programs(tc: TrainConfig, scan_layers: bool, layout: parallel.Layout | None) -> str:
    """What the step runs as: `tc.programs`, with "auto" resolved — per-layer programs ("layers": as fast,
    compile time flat in depth) on one device with unscanned layers, else one program ("one": a mesh's
    step keeps its shardings in one program; scanned layers are one stack)."""
    if tc.programs != "auto":
        return tc.programs
    return "layers" if layout is None and not scan_layers else "one"


def make_train_step(graphdef, tc: TrainConfig, optimizer: optax.GradientTransformation | None = None,
                    *, jit: bool = True, layout: parallel.Layout | None = None, shardings=None):
    """Return `step(state, batch) -> (state, metrics)`; `batch` = {"inputs", "targets"} int32 [B,S].

    With a `layout` (and the state `shardings` of `init_sharded_state`) the model runs across it (MoE
    layers dispatch over the `expert` axis) and the step is jitted with explicit in/out shardings.
    With `tc.skip_nonfinite_steps`, a step whose loss or gradient norm is not finite leaves params,
    optimizer and expert-bias state unchanged (`metrics["skipped"]`); step and data position advance.
    """
    if jit and step_programs(tc, scan_layers=False, layout=layout) == "layers":
        # per-layer programs (the default optimizer, None, then updates a layer at a time as well); "auto"
        # falls back to the one program at the first step if the model's layers are scanned
        from moe_jax.layer_programs import make_layer_step
        one = None if tc.programs == "layers" else make_train_step(
            graphdef, dataclasses.replace(tc, programs="one"), optimizer, layout=layout, shardings=shardings)
        return make_layer_step(graphdef, tc, optimizer, layout=layout, shardings=shardings, scanned=one)
    optimizer = optimizer or make_optimizer(tc)
    accum = tc.grad_accum
    apply = make_apply(graphdef, tc, optimizer)

    def loss_fn(params, rest, inputs, targets, rng, copy):
        model = nnx.merge(graphdef, weight_copy.swap_in(params, copy), rest)
        h_BSD, aux = model.trunk(inputs, rng=rng, layout=layout)
        return head_loss(model, h_BSD, targets, aux, rng=rng, layout=layout)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731
        micro = jax.tree.map(split, batch)
        if layout is not None:  # keep each micro-batch split over (data, fsdp)
            micro = jax.tree.map(lambda x: parallel.constrain(x, (None, "act_batch", None), layout),
                                 micro)

        def micro_step(carry, xs):
            grads_acc, i = carry
            (total, (ce, aux)), grads = grad_fn(state.params, state.model_state, xs["inputs"],
                                                xs["targets"], jax.random.fold_in(step_rng, i),
                                                state.compute_params)
            if grads_acc is not None:
                grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) / accum, grads_acc, grads)
            return (grads, i + 1), (total, ce, aux)

        if accum == 1:  # the gradients as they come: no float32 accumulator (three passes over them)
            (grads, _), out = micro_step((None, 0), jax.tree.map(lambda x: x[0], micro))
            total, ce, aux = jax.tree.map(lambda v: v[None], out)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, _), (total, ce, aux) = jax.lax.scan(micro_step, (zeros, 0), micro)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        return apply(state, grads, total, ce, aux, rng)

    if layout is not None and jit:
        return jax.jit(step, donate_argnums=0,
                       in_shardings=(shardings, parallel.batch_sharding(layout)),
                       out_shardings=(shardings, parallel.replicated(layout)))
    return jax.jit(step, donate_argnums=0) if jit else step
