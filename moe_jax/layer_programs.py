"""The train step as a few small jitted programs, one pair per kind of layer: compile time flat in depth.

`train.programs = "layers"`, and "auto" (the default) on one device (`make_train_step` picks it). The
one-program step (`train.programs = "one"`) holds a copy of every layer, so its compile time grows with
depth (80–130 s for the 12-layer mixtral_small on the GPU). Here a Python loop runs the step from
programs that every layer of a kind shares (~13–20 s at 12 or 48 layers):

  embed    tokens -> the first layer's input, and the embedding's backward (a `jax.vjp` closure)
  forward  one layer: its output, router losses and statistics, and the arrays of its backward closure
           (a `jax.vjp`'s) that are not its inputs: the activations the backward needs
           (`ModelConfig.remat` decides which); its weights and input are handed to the backward again
  head     final norm, LM head + cross-entropy, multi-token prediction: the loss and its gradients
  backward one layer's closure, rebuilt, applied to the output's cotangent: the layer's parameter
           gradients and its input's cotangent
  apply    optimizer, expert-bias update, metrics, the weight copy: with the default optimizer a
           layer at a time as well (moe_jax/layer_update.py), else one program (`train.make_apply`;
           also under a mesh layout, whose out_shardings keep the state's)

Each program compiles once per kind of layer (dense, MoE) whatever the depth: layers of a kind have the
same structure and shapes, and the layer index (for its rng) is an argument. No stacked buffers: each
layer's activations are its own arrays, as in the one-program step. The host dispatches 2 programs per
layer, 2 per group of the optimizer's update and a few more per micro-batch; dispatch runs ahead of
the GPU.

The numbers are the one-program step's: the same operations in the same order (tests/test_layer_programs.py).
With expert weight copies (`train.expert_weight_copy`) the layers are differentiated with respect to
the copies and the gradients cast to the weights' dtype, as `weight_copy.swap_in`'s backward does.
Needs one layer per stack (`model.scan_layers=false`).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import parallel, sumsq_probes, weight_copy
from moe_jax.layer_update import LayerUpdate, sum_of_squares
from moe_jax.model import REMAT_POLICIES, _loop_stack, collect_aux
from moe_jax.rope import model_rope_tables
from moe_jax.train import head_loss, make_apply, make_optimizer  # (train imports this module lazily)

# the experts' weight-gradient sums of squares from the wgrad kernel's epilogue (moe_jax/sumsq_probes.py)
# rather than a pass over those gradients in each layer's backward: GPU busy time 1.6-2.5 ms a step lower
# on all four benchmark rows (H200, experiments/NOTES_speed.md, stop 44)
EXPERT_SUMSQ_PROBES = True

# outputs the backward recomputes from their inputs instead of a layer's forward keeping them: a view of a
# weight (a slice, reshape or cast) would be a copy of it, an upcast a second copy of an activation
_RECOMPUTED = frozenset(("convert_element_type", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
                         "slice", "dynamic_slice", "transpose"))


def _residual_policy(base):
    """A remat policy: what `base` saves (`...`: everything, None: nothing) except `_RECOMPUTED`'s outputs.
    Saving everything, a `checkpoint_name`'s output is not saved either: it is its input, which is saved
    where the backward needs it (attention's output is both the cuDNN kernel's residual and the output
    projection's input: kept under both names it would be a second buffer, and a copy, per layer)."""
    def policy(prim, *args, **params):
        if prim.name in _RECOMPUTED or (base is ... and prim.name == "name"):
            return False
        return True if base is ... else base is not None and base(prim, *args, **params)
    return policy


def _layer_backward(kept, params, x, dy, losses, closure, sumsq_dtypes=None):
    """A layer's parameter gradients and input cotangent: its closure rebuilt from the arrays its forward
    returned (`kept`) and its inputs (`closure`: the closure's treedef, where each leaf comes from, and
    whether the forward handed the experts sum-of-squares probes out). With `sumsq_dtypes` (its master
    weights' dtypes) also the gradients' sum of squares, which the optimizer's clip needs: computed here,
    it is no program of its own and fuses with the gradients' last passes; the experts' weights' part
    comes from the probes' cotangents where the forward took them (moe_jax/sumsq_probes.py: the wgrad
    kernel's epilogue sums it), with no pass over those gradients."""
    tree, where, probed = closure
    given, kept = jax.tree.leaves((params, x)), iter(kept)
    vjp = tree.unflatten([given[w] if w >= 0 else next(kept) for w in where])
    grads, dx, *dprobes = vjp((dy, jax.tree.map(jnp.ones_like, losses)))  # the losses enter with weight 1
    if sumsq_dtypes is None:
        return grads, dx
    if not probed:
        return grads, dx, sum_of_squares(jax.tree.leaves(grads), sumsq_dtypes)
    paths = [sumsq_probes.is_probed(path) for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    rest = [(g, d) for g, d, p in zip(jax.tree.leaves(grads), sumsq_dtypes, paths) if not p]
    probed_dtype = next(d for d, p in zip(sumsq_dtypes, paths) if p)
    experts = jnp.sum(dprobes[0].astype(probed_dtype))
    return grads, dx, sum_of_squares([g for g, _ in rest], [d for _, d in rest]) + experts


class _Programs:
    """The jitted programs of one model structure (built from the first state the step sees)."""

    def __init__(self, graphdef, state, tc, optimizer, layout, shardings):
        model = nnx.merge(graphdef, state.params, state.model_state)
        cfg = self.cfg = model.cfg
        if any(n != 1 for _, _, n in model.runs):
            raise ValueError("train.programs='layers' runs each layer as its own program and needs "
                             "model.scan_layers=false (one layer per stack)")
        self.graphdef, self.layout, self.accum = graphdef, layout, tc.grad_accum
        self.dtype = jnp.dtype(cfg.dtype)
        # every layer's (graphdef, forward, backward): shared by layers of one structure
        self.layer_graphdefs = [nnx.split(stack, nnx.Param, ...)[0] for stack in model.stacks]
        kinds = list(dict.fromkeys(self.layer_graphdefs))
        # each layer's kind, a number: a graphdef's hash walks its whole structure (~0.2 ms a lookup)
        self.kind = [kinds.index(gd) for gd in self.layer_graphdefs]
        self.forward = {k: jax.jit(functools.partial(self._layer_forward, gd, k)) for k, gd in enumerate(kinds)}
        # a layer's backward takes its output's cotangent (donated: dx has its shape) and its losses (their
        # cotangents are ones)
        # (a partial: jit's caches are per function object, and each model's programs are their own)
        self.backward = jax.jit(functools.partial(_layer_backward), static_argnums=(5, 6), donate_argnums=3)
        self.closures = {}  # (kind, x's shape and dtype) -> (closure treedef, where its leaves come from)
        self.index = [jnp.int32(s) for s in range(len(model.stacks))]  # on the device once, not every step
        self.embed_backward = jax.jit(lambda vjp, dx: vjp(dx)[0])
        self.embed = jax.jit(self._embed)
        # the head differentiates the embedding only where it reads it (tied head, MTP)
        self.head_reads_embed = cfg.tie_embeddings or model.mtp is not None
        self.head = jax.jit(self._head)
        self.split = jax.jit(self._split)
        self.accumulate = jax.jit(self._accumulate, donate_argnums=0)
        # the micro-batches' losses and statistics stacked [accum, ...]: one program (stacked one by one,
        # each leaf was a dispatch of its own and a copy on the device)
        self.stack = jax.jit(lambda outs: jax.tree.map(lambda *v: jnp.stack(v), *outs))
        # where each parameter leaf's gradient comes from: the head's j-th, stack s's, the embedding's
        paths, self.treedef = jax.tree_util.tree_flatten_with_path(state.params)
        self.head_where = [i for i, (path, _) in enumerate(paths) if path[0].key != "stacks"
                           and (path[0].key != "embed_VD" or self.head_reads_embed)]
        self.stack_of = [path[1].key if path[0].key == "stacks" else None for path, _ in paths]
        self.embed_at = next(i for i, (path, _) in enumerate(paths) if path[0].key == "embed_VD")
        self._view_keys = None  # ((params' treedef, copy's keys), [(leaf index, its copy's key)]): `view`'s plan
        self.sumsq_dtypes = None  # per stack: its weights' dtypes, where its backward sums its squares
        # per kind of layer: how many of its weights the experts' sum-of-squares probes stand for (0: none)
        self.probes = [0] * len(kinds)
        if optimizer is None and layout is None:  # the default optimizer: updated a layer at a time
            groups = [[i for i, s in enumerate(self.stack_of) if s == k] for k in range(len(model.stacks))]
            groups.append([i for i, s in enumerate(self.stack_of) if s is None])
            self.apply = LayerUpdate(graphdef, tc, state, groups)
            if self.accum == 1:  # each layer's backward sums its gradients' squares (group s is stack s)
                self.sumsq_dtypes = [tuple(jnp.dtype(p.dtype) for p in jax.tree.leaves(state.params["stacks"][s]))
                                     for s in range(len(model.stacks))]
                if EXPERT_SUMSQ_PROBES:
                    for s, k in enumerate(self.kind):
                        paths = jax.tree_util.tree_flatten_with_path(state.params["stacks"][s])[0]
                        self.probes[k] = sum(sumsq_probes.is_probed(path) for path, _ in paths)
        else:  # one program over every parameter (sharded: its out_shardings keep the state's layout)
            apply = make_apply(graphdef, tc, optimizer or make_optimizer(tc))

            def apply_cast(state, grads, total, ce, aux, rng):  # copies' (bf16) gradients in the weights' dtype
                grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
                return apply(state, grads, total, ce, aux, rng)
            out = {} if layout is None else {"out_shardings": (shardings, parallel.replicated(layout))}
            self.apply = jax.jit(apply_cast, donate_argnums=0, **out)

    # ---------------------------------------------------------------- the programs
    def _split(self, rng, batch):
        """(next state rng, the micro-batches' rngs, the micro-batches [B/accum, S]): tuples of `accum`
        arrays, each its own output (indexing a stacked output outside a program is a dispatch each)."""
        rng, step_rng = jax.random.split(rng)
        micro = jax.tree.map(lambda x: x.reshape(self.accum, x.shape[0] // self.accum, *x.shape[1:]), batch)
        if self.layout is not None:  # keep each micro-batch split over (data, fsdp)
            micro = jax.tree.map(lambda x: parallel.constrain(x, (None, "act_batch", None), self.layout), micro)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(jnp.arange(self.accum))
        return rng, tuple(keys), tuple(jax.tree.map(lambda x: x[i], micro) for i in range(self.accum))

    def _embed(self, embed, tokens):
        x, vjp = jax.vjp(lambda e: jnp.take(e, tokens, axis=0).astype(self.dtype), embed)
        return x, vjp

    def _layer_forward(self, graphdef, kind, params, rest, x, rng, index):
        cos, sin = model_rope_tables(self.cfg, x.shape[1])

        def layer(params, x, rest, rng, index):  # the one-program step's layer (aux stacked [1, ...])
            y, aux = _loop_stack(nnx.merge(graphdef, params, rest), x, cos, sin, rng, index, self.layout, "none")
            aux = {"losses": {}} if aux is None else aux
            return (y, aux["losses"]), {k: v for k, v in aux.items() if k != "losses"}

        layer = jax.checkpoint(layer, policy=_residual_policy(REMAT_POLICIES.get(self.cfg.remat, ...)))
        probed = False
        if self.probes[kind]:  # the experts' sums of squares from their wgrad (moe_jax/sumsq_probes.py)
            records = []

            def with_probes(p, x, q):
                with sumsq_probes.collecting(q) as record:
                    records.append(record)
                    return layer(p, x, rest, rng, index)
            (y, losses), vjp, stats = jax.vjp(with_probes, params, x, jnp.zeros((self.probes[kind],), jnp.float32),
                                              has_aux=True)
            probed = records[0].complete
        else:
            (y, losses), vjp, stats = jax.vjp(lambda p, x: layer(p, x, rest, rng, index), params, x, has_aux=True)
        # the closure keeps the layer's inputs (its weights, x) among its leaves: returned, each would be a
        # copy (an output buffer); instead the backward is given them again. Which leaves those are is
        # static: recorded here, at trace time, for every layer of this kind and shape
        leaves, tree = jax.tree.flatten(vjp)
        given = {id(v): k for k, v in enumerate(jax.tree.leaves((params, x)))}
        where = tuple(given.get(id(v), -1) for v in leaves)
        self.closures[kind, x.shape, jnp.dtype(x.dtype)] = (tree, where, probed)
        return y, losses, stats, [v for v, w in zip(leaves, where) if w < 0]

    def _head(self, diff, params, rest, h, targets, rng, layer_aux):
        """Loss and gradients of the head's parameters (`diff`: their leaves) and of h."""
        leaves = jax.tree.leaves(params)
        aux = collect_aux([{"losses": losses, **stats}
                           for losses, stats in layer_aux if stats])  # MoE layers (dense ones have none)

        def loss(diff, h):
            full = list(leaves)
            for i, v in zip(self.head_where, diff):
                full[i] = v
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, full), rest)
            return head_loss(model, h, targets, aux, rng=rng, layout=self.layout)

        (total, (ce, aux)), (g_diff, dh) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(diff, h)
        return total, ce, aux, g_diff, dh

    def _accumulate(self, acc, grads):
        """acc + grads / accum in float32 (acc None: the first micro-batch's)."""
        if acc is None:
            return jax.tree.map(lambda g: g.astype(jnp.float32) / self.accum, grads)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32) / self.accum, acc, grads)

    # ---------------------------------------------------------------- the step
    # watch(event, layer, value): called after each layer's forward and backward, the head, the last
    # micro-batch's gradients and the update (experiments/probe_layer_memory.py reads the device's memory
    # there); None: nothing is called
    watch = None

    def _watch(self, event, layer, value):
        if self.watch is not None:
            self.watch(event, layer, value)

    def view(self, params, copy):
        """params with the copied weights' values replaced by their copies (differentiated directly)."""
        if copy is None:
            return params
        leaves, treedef = jax.tree.flatten(params)
        structure = (treedef, tuple(copy))
        if self._view_keys is None or self._view_keys[0] != structure:  # each leaf's copy key, once
            paths = jax.tree_util.tree_flatten_with_path(params)[0]
            self._view_keys = (structure, [(i, weight_copy.leaf_key(path)) for i, (path, _) in enumerate(paths)
                                           if weight_copy.leaf_key(path) in copy])
        for i, key in self._view_keys[1]:
            leaves[i] = copy[key][...]
        return jax.tree.unflatten(treedef, leaves)

    def micro_step(self, state, params, tokens, targets, rng):
        """(total, ce, aux, grads, sums) of one micro-batch; grads in `params`' structure (`params`: the
        compute view of the state's parameters), sums {stack: its gradients' sum of squares} where the
        layers' backward computed them (`sumsq_dtypes`), else {}."""
        rest = state.model_state
        x, embed_vjp = self.embed(params["embed_VD"][...], tokens)
        saved, layer_aux = [], []  # per layer: (what its forward kept, its input, its closure's recipe)
        for s, kind in enumerate(self.kind):
            rest_s = rest["stacks"][s] if "stacks" in rest and s in rest["stacks"] else nnx.State({})
            closure = (kind, x.shape, jnp.dtype(x.dtype))
            y, losses, stats, kept = self.forward[kind](params["stacks"][s], rest_s, x, rng, self.index[s])
            self._watch("forward", s, kept)
            saved.append((kept, x, self.closures[closure]))
            layer_aux.append((losses, stats))
            x = y
        leaves = jax.tree.leaves(params)
        total, ce, aux, g_head, dx = self.head([leaves[i] for i in self.head_where], params, rest, x, targets,
                                               rng, layer_aux)
        del x, y
        self._watch("head", None, dx)
        g_stacks, sums = [None] * len(saved), {}
        for s in reversed(range(len(saved))):
            kept, x, closure = saved[s]
            losses = layer_aux[s][0]
            dtypes = None if self.sumsq_dtypes is None else self.sumsq_dtypes[s]
            g_stacks[s], dx, *sumsq = self.backward(kept, params["stacks"][s], x, dx, losses, closure, dtypes)
            if sumsq:
                sums[s] = sumsq[0]
            saved[s] = kept = x = None  # its activations go as soon as its backward has run
            self._watch("backward", s, dx)
        g_embed = self.embed_backward(embed_vjp, dx)
        return total, ce, aux, self._assemble(g_head, g_stacks, g_embed), sums

    def _assemble(self, g_head, g_stacks, g_embed):
        """The gradients in the structure of the params, from the programs' pieces."""
        grads = [None] * self.treedef.num_leaves
        for i, g in zip(self.head_where, g_head):
            grads[i] = g
        stack_leaves = [iter(jax.tree.leaves(g)) for g in g_stacks]
        for i, s in enumerate(self.stack_of):
            if s is not None:
                grads[i] = next(stack_leaves[s])
        e = self.embed_at
        grads[e] = g_embed if grads[e] is None else g_embed + grads[e]
        return jax.tree.unflatten(self.treedef, grads)

    def step(self, state, batch):
        rng, keys, micro = self.split(state.rng, batch)
        params = self.view(state.params, state.compute_params)
        outs, grads = [], None
        for i in range(self.accum):
            total, ce, aux, g, sums = self.micro_step(state, params, micro[i]["inputs"], micro[i]["targets"],
                                                      keys[i])
            outs.append((total, ce, aux))
            grads = g if self.accum == 1 else self.accumulate(grads, g)
        total, ce, aux = self.stack(outs)
        self._watch("gradients", None, grads)
        new, metrics = self.apply(state, grads, total, ce, aux, rng, *([sums] if sums else []))
        self._watch("update", None, new)
        return new, metrics

    # ---------------------------------------------------------------- ahead of time

    _JITTED = ("split", "embed", "head", "backward", "embed_backward", "accumulate", "stack", "apply")

    def compile_all(self, state, batch) -> dict[str, tuple[int, float]]:
        """Lower and compile every program one step runs, on abstract (or concrete) `state` and `batch`;
        nothing runs. Returns (programs compiled, seconds lowering and compiling) per name ("forward": one
        per kind of layer). The step's Python loop is traced with `jax.eval_shape`: each program is compiled
        at its first call with a new signature, as the jit caches would at a real step."""
        seconds: dict[str, tuple[int, float]] = {}
        owners = {name: self for name in self._JITTED}
        if isinstance(self.apply, LayerUpdate):  # its programs, not the Python function that runs them
            del owners["apply"]
            owners.update({f"apply.{name}": self.apply for name in LayerUpdate.JITTED})
        saved = {name: getattr(owner, name.rpartition(".")[2]) for name, owner in owners.items()}
        saved_forward = dict(self.forward)
        seen = set()

        def compiling(name, f):
            def call(*args):
                leaves, tree = jax.tree.flatten(args)  # arrays, and a static argument's parts
                array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]  # not a static np.dtype
                key = (name, id(f), tree, tuple((x.shape, x.dtype) if a else x for x, a in zip(leaves, array)))
                if key not in seen:
                    seen.add(key)
                    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) if a else x for x, a in zip(leaves, array)]
                    t0 = time.perf_counter()
                    f.lower(*jax.tree.unflatten(tree, abstract)).compile()
                    n, t = seconds.get(name, (0, 0.0))
                    seconds[name] = (n + 1, t + time.perf_counter() - t0)
                return f(*args)  # traced into the eval_shape: its output's shapes and structure
            return call
        try:
            for name, f in saved.items():
                setattr(owners[name], name.rpartition(".")[2], compiling(name, f))
            self.forward = {k: compiling("forward", f) for k, f in saved_forward.items()}
            jax.eval_shape(self.step, state, batch)
        finally:
            for name, f in saved.items():
                setattr(owners[name], name.rpartition(".")[2], f)
            self.forward = saved_forward
        return seconds


def make_layer_step(graphdef, tc, optimizer: optax.GradientTransformation | None = None, *, layout=None,
                    shardings=None, scanned=None):
    """`step(state, batch) -> (state, metrics)` as `train.make_train_step`'s, run as per-layer programs
    (see the module docstring). The programs are built at the first call, or by `step.build(state)`
    (state may be abstract: `step.build(state).compile_all(state, batch)` compiles ahead of time).
    `scanned`: the step to run instead when the model's layers are scanned (`step.build` then returns
    None and `step.one` is that step); without it a scanned model is refused."""
    def build(state) -> _Programs | None:
        if step.programs is None and step.one is None:
            if scanned is not None and _has_scanned_stacks(graphdef, state):
                step.one = scanned
            else:
                step.programs = _Programs(graphdef, state, tc, optimizer, layout, shardings)
        return step.programs

    def step(state, batch):
        programs = build(state)
        return step.one(state, batch) if programs is None else programs.step(state, batch)
    step.programs = None  # the _Programs, once built: their jitted functions and caches
    step.one = None       # or the one-program step, for a scanned model
    step.build = build
    return step


def _has_scanned_stacks(graphdef, state) -> bool:
    return any(n != 1 for _, _, n in nnx.merge(graphdef, state.params, state.model_state).runs)
