"""GPT: token embedding, pre-norm blocks of causal attention (GQA, or MLA per `attention_type`; RoPE)
and a dense MLP or MoE layer (per `moe.layer_freq`), final norm, LM head (tied or untied).

Layers are stored as stacks: `Block`s whose parameters carry a leading layer axis (logical name
`layers`). With `ModelConfig.scan_layers` each run of consecutive layers of one kind (dense or MoE) is
one stack, applied with one `jax.lax.scan`: compile time does not grow with depth, but each step pays
for XLA copying the layers' saved activations into (and out of) the scan's stacked buffers. Without
it (the default: the faster step, measured in ops/NOTES_fusions.md), every layer is a stack of one,
applied in a Python loop: the program holds one copy of the layer per layer. `GPT.layer(i)` gives layer
i as a plain `Block` (a copy), `unstack_layers` / `stack_layers` convert a state's pure dict between
the stacks and a per-layer `blocks: {i: ...}` view (checkpoint converters use it).

`ModelConfig.remat`: "none"; "full" (each layer's activations recomputed in the backward pass);
"selective" (matmul, grouped-GEMM and attention outputs saved, the elementwise work between them —
norms, RoPE, activations, casts — recomputed).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.attention import Attention, apply_rope, rope_tables  # noqa: F401  (re-exported)
from moe_jax.config import ModelConfig
from moe_jax.layers import MLP, Norm, param
from moe_jax.mla import MLAttention
from moe_jax.moe import MoELayer
from moe_jax.mtp import MTPModule
from moe_jax.rope import model_rope_tables

# names the selective remat policy saves (besides dot products without batch dimensions)
SAVED_NAMES = ("attn_out", "gmm_out")
REMAT_POLICIES = {
    "full": None,
    "selective": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)),
}


class Block(nnx.Module):
    """Pre-norm transformer block; the feed-forward is dense or MoE."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = MLAttention(cfg, rngs=rngs) if cfg.attention_type == "mla" else Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.is_moe = is_moe
        self.mlp = MoELayer(cfg, rngs=rngs) if is_moe else MLP(cfg, cfg.ffn_hidden_size, rngs=rngs)

    def __call__(self, x_BSD, cos_SH, sin_SH, rng=None, layout=None):
        # each norm hands its module one copy per consumer (q/k/v; router/dispatch/shared): Norm's fan-out
        x = x_BSD + self.attn(self.attn_norm(x_BSD, getattr(self.attn, "fanout", 1)), cos_SH, sin_SH)
        h = self.mlp_norm(x, getattr(self.mlp, "fanout", 1))
        if self.is_moe:
            y, aux = self.mlp(h, rng=rng, layout=layout)
        else:
            y, aux = self.mlp(h), None
        return x + y.astype(x.dtype), aux


def layer_runs(cfg: ModelConfig) -> tuple[tuple[bool, int, int], ...]:
    """(is_moe, first layer, number of layers) of each stack: with `scan_layers`, each run of
    consecutive layers of one kind; without, every layer on its own (a stack of one)."""
    runs: list[list] = []
    for i in range(cfg.num_layers):
        kind = cfg.is_moe_layer(i)
        if runs and runs[-1][0] == kind and cfg.scan_layers:
            runs[-1][2] += 1
        else:
            runs.append([kind, i, 1])
    return tuple(tuple(r) for r in runs)


def _stacked_block(cfg: ModelConfig, is_moe: bool, n: int, rngs: nnx.Rngs) -> Block:
    """n Blocks as one, every Variable with a leading layer axis (logical name `layers`)."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n)
    def create(rngs):
        return Block(cfg, is_moe, rngs=rngs)

    block = create(rngs)
    for _, var in nnx.to_flat_state(nnx.state(block)):
        axes = var.get_metadata().get("logical_axes")
        if axes is not None:
            var.set_metadata(logical_axes=("layers",) + tuple(axes))
    return block


class GPT(nnx.Module):
    """Decoder-only LM. `__call__(tokens[B,S], *, rng, layout) -> (logits[B,S,V], aux)`; `layout`
    shards the MoE layers across its MoE mesh (see `MoELayer`). `hidden` stops before the LM head
    (for a loss fused with it), `trunk` before the final norm, `head()` is the [D, V] head weight.
    `mtp`: the multi-token-prediction modules (`moe_jax.mtp`; None without), used by the training loss
    only.

    aux: `losses` (each router loss summed over MoE layers), and per MoE layer (stacked, [L_moe, ...]):
    `tokens_per_expert`, `routed_counts`, `dropped`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                              cfg.param_dtype)
        self.runs = layer_runs(cfg)
        self.stacks = nnx.List([_stacked_block(cfg, moe, n, rngs) for moe, _, n in self.runs])
        self.final_norm = Norm(cfg, cfg.d_model)
        self.head_DV = (None if cfg.tie_embeddings else
                        param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                              cfg.param_dtype))
        last_moe = cfg.is_moe_layer(cfg.num_layers - 1)  # DeepSeek-V3: the MTP block is MoE
        self.mtp = (nnx.List([MTPModule(cfg, Block(cfg, last_moe, rngs=rngs), rngs=rngs)
                              for _ in range(cfg.mtp_num_layers)]) if cfg.mtp_num_layers else None)

    def hidden(self, tokens_BS: jax.Array, *, rng: jax.Array | None = None, layout=None):
        """Final-norm activations [B,S,D] (before the LM head) and aux."""
        x, aux = self.trunk(tokens_BS, rng=rng, layout=layout)
        return self.final_norm(x), aux

    def trunk(self, tokens_BS: jax.Array, *, rng: jax.Array | None = None, layout=None):
        """The last layer's output [B,S,D] (before the final norm; MTP starts from it) and aux."""
        cfg = self.cfg
        x = jnp.take(self.embed_VD[...], tokens_BS, axis=0).astype(jnp.dtype(cfg.dtype))
        cos, sin = model_rope_tables(cfg, tokens_BS.shape[1])
        layer_aux = []
        run = _scan_stack if cfg.scan_layers else _loop_stack
        for stack, (_, first, n) in zip(self.stacks, self.runs):
            x, aux = run(stack, x, cos, sin, rng, first, layout, cfg.remat)
            if aux is not None:
                layer_aux.append(aux)
        return x, collect_aux(layer_aux)

    def head(self) -> jax.Array:
        """The LM head weight [D, V] (the embedding's transpose when tied), in the compute dtype."""
        w = self.embed_VD[...].T if self.head_DV is None else self.head_DV[...]
        return w.astype(jnp.dtype(self.cfg.dtype))

    def __call__(self, tokens_BS: jax.Array, *, rng: jax.Array | None = None, layout=None):
        x, aux = self.hidden(tokens_BS, rng=rng, layout=layout)
        return x @ self.head(), aux

    def layer(self, i: int) -> Block:
        """Layer i as a plain Block: a copy of its slice of the stack (changing it changes nothing
        here)."""
        s, j = layer_position(self.cfg, i)
        graphdef, state = nnx.split(self.stacks[s])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))

    def layers(self) -> list[Block]:
        """Every layer as a plain Block (copies; see `layer`)."""
        return [self.layer(i) for i in range(self.cfg.num_layers)]


def _scan_stack(stack: Block, x, cos, sin, rng, first: int, layout, remat: str):
    """x through the stack's layers in order (one scan step per layer); aux stacked per layer."""
    graphdef, state = nnx.split(stack)

    def body(x, xs):
        layer_state, i = xs
        r = None if rng is None else jax.random.fold_in(rng, i)
        return nnx.merge(graphdef, layer_state)(x, cos, sin, r, layout=layout)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    n = jax.tree.leaves(state)[0].shape[0]
    return jax.lax.scan(body, x, (state, first + jnp.arange(n, dtype=jnp.int32)))


def _loop_stack(stack: Block, x, cos, sin, rng, first: int, layout, remat: str):
    """`_scan_stack` as a Python loop over the stack's layers (static slices; a stack of one layer,
    as `scan_layers=False` makes them, is sliced for free)."""
    graphdef, state = nnx.split(stack)

    def layer(x, layer_state, i):
        r = None if rng is None else jax.random.fold_in(rng, i)
        return nnx.merge(graphdef, layer_state)(x, cos, sin, r, layout=layout)

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], static_argnums=2)
    auxs = []
    for j in range(jax.tree.leaves(state)[0].shape[0]):
        x, aux = layer(x, jax.tree.map(lambda a: a[j], state), first + j)
        auxs.append(aux)
    return x, (None if auxs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxs))


def layer_position(cfg: ModelConfig, i: int) -> tuple[int, int]:
    """(stack, index in the stack) of layer i."""
    if not 0 <= i < cfg.num_layers:
        raise IndexError(f"layer {i} out of range for num_layers={cfg.num_layers}")
    for s, (_, first, n) in enumerate(layer_runs(cfg)):
        if first <= i < first + n:
            return s, i - first
    raise AssertionError("unreachable")


def collect_aux(layer_aux: list[dict]) -> dict:
    """Sum router losses over layers; concatenate per-layer routing statistics (stacks in order)."""
    if not layer_aux:
        return {"losses": {}}
    losses: dict[str, jax.Array] = {}
    for a in layer_aux:
        for name, v in a["losses"].items():
            losses[name] = losses.get(name, 0.0) + jnp.sum(v)
    out = {"losses": losses}
    for key in ("tokens_per_expert", "routed_counts", "dropped"):
        out[key] = jnp.concatenate([a[key] for a in layer_aux])
    return out


# ------------------------------------------------------------------ per-layer view of a state
def _take(a, j):
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[j]


def unstack_layers(pure: dict, cfg: ModelConfig) -> dict:
    """A GPT state's pure dict (`nnx.State.to_pure_dict`) with `stacks` replaced by per-layer
    `blocks: {i: layer dict}` (slices; abstract leaves give abstract slices)."""
    out = {k: v for k, v in pure.items() if k != "stacks"}
    out["blocks"] = {}
    for i in range(cfg.num_layers):
        s, j = layer_position(cfg, i)
        out["blocks"][i] = jax.tree.map(lambda a: _take(a, j), pure["stacks"][s])
    return out


def stack_layers(pure: dict, cfg: ModelConfig) -> dict:
    """Inverse of `unstack_layers`: per-layer `blocks` stacked back into `stacks`."""
    out: dict[str, Any] = {k: v for k, v in pure.items() if k != "blocks"}
    out["stacks"] = {}
    for s, (_, first, n) in enumerate(layer_runs(cfg)):
        layers = [pure["blocks"][i] for i in range(first, first + n)]
        out["stacks"][s] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return out

