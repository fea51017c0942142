"""The optimizer step split along the parameters, one group per layer: compile time flat in depth.

Used by `train.programs = "layers"` with the default optimizer (`train.make_optimizer`). `train.make_apply`
updates every parameter in one program, and its compile time grows with the number of parameter leaves
(mixtral_small on an H100: 3.0 s at 12 layers, 11.7 s at 48). Here the parameters fall into groups, one
per layer and one for the rest (embedding, final norm, LM head, MTP), and three programs run the update;
groups of like layers share theirs:

  sumsq   a group's gradient sum of squares (per leaf in the parameter's dtype, as `optax.tree.norm`);
          a layer's backward program may compute its own instead (`sum_of_squares`, passed as `sums`)
  finish  the global norm, the non-finite check, the metrics, the expert-bias update, step + 1
  update  a group's global-norm clip, AdamW with its weight decay, the non-finite keep, and the bf16
          copies of its expert weights (`weight_copy`)

The numbers are `make_apply`'s: with the clip's norm given, the chain is elementwise, so each group's
update is the whole update restricted to its leaves. Only the order of the norm's additions differs.
The optimizer state keeps its structure (checkpoints are the one-program step's): its parameter-shaped
parts (AdamW's moments) are cut into the groups' leaves, its other leaves (the counts) are read by every
group and taken back from the first.
"""
from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import optax

from moe_jax import weight_copy
from moe_jax.config import TrainConfig
from moe_jax.train import make_optimizer, step_metrics, step_ok, update_biases, where_ok


def sum_of_squares(grads, dtypes):
    """Σ g² of a group, over its gradients in the parameters' dtypes (leaf sums added in order)."""
    return functools.reduce(operator.add, [jnp.sum(jnp.square(g.astype(d))) for g, d in zip(grads, dtypes)], 0)


class LayerUpdate:
    """`update(state, grads, total, ce, aux, rng, sums=None) -> (state, metrics)`, `train.make_apply`'s
    contract; `sums` {group index: its gradient sum of squares} where the caller has them already.

    `groups`: lists of flat parameter-leaf indices (in `jax.tree.leaves(state.params)` order) that
    together cover every leaf once; like groups (same leaf shapes and dtypes) share compiled programs."""

    JITTED = ("sumsq", "finish", "update")  # its programs (layer_programs.compile_all compiles them)

    def __init__(self, graphdef, tc: TrainConfig, state, groups: list[list[int]]):
        self.graphdef, self.tc, self.groups = graphdef, tc, groups
        self.inner = make_optimizer(tc, clip=False)  # the clip as an identity: applied here, by the norm
        paths, self.pdef = jax.tree_util.tree_flatten_with_path(state.params)
        covered = sorted(i for g in groups for i in g)
        if covered != list(range(len(paths))):
            raise ValueError("the update's groups must cover every parameter leaf exactly once")
        # the optimizer state's nodes: parameter-shaped trees (cut into the groups) and the rest (shared)
        self.odef = jax.tree.structure(state.opt_state, is_leaf=self._param_shaped)
        nodes = self.odef.flatten_up_to(state.opt_state)
        self.per_param = [self._param_shaped(n) for n in nodes]
        if not any(self.per_param):
            raise ValueError("the optimizer state has no parameter-shaped part to split")
        # the expert weights' compute copies (a dict {Variable path: Variable}): which leaf each copies
        self.copy_at = {}
        if state.compute_params is not None:
            where = {weight_copy.leaf_key(path): i for i, (path, _) in enumerate(paths)}
            copy_paths, self.cdef = jax.tree_util.tree_flatten_with_path(state.compute_params)
            self.copy_at = {where[path[0].key]: j for j, (path, _) in enumerate(copy_paths)}
        self.sumsq = jax.jit(self._sumsq)
        self.finish = jax.jit(self._finish)
        # not the grads (no output of their size); keep_unused: the copies are written, never read, and an
        # unused argument would be dropped, its donation with it
        self.update = jax.jit(self._update, donate_argnums=(0, 2, 4), keep_unused=True)

    def _param_shaped(self, node) -> bool:
        return jax.tree.structure(node) == self.pdef

    # ---------------------------------------------------------------- the programs
    @staticmethod
    def _sumsq(grads, params):
        return sum_of_squares(grads, [p.dtype for p in params])

    def _finish(self, params, model_state, sums, total, ce, aux, step, data_pos):
        """(grad norm, ok, model_state, step + 1, data_pos + 1, metrics)."""
        norm = jnp.sqrt(functools.reduce(operator.add, sums, 0))
        metrics = step_metrics(self.tc, step, total, ce, aux, norm)
        new_model_state, more = update_biases(self.graphdef, params, model_state, aux)
        metrics.update(more)
        ok = step_ok(metrics)
        if self.tc.skip_nonfinite_steps:
            new_model_state = where_ok(ok, new_model_state, model_state)
            metrics["skipped"] = ~ok
        return norm, ok, new_model_state, step + 1, data_pos + 1, metrics

    def _update(self, params, grads, nodes, shared, copies, norm, ok):
        """One group's step: params and grads are lists of its leaves, `nodes` the optimizer state's
        parameter-shaped parts cut to them, `shared` its other leaves, `copies` the compute copies
        (None where a leaf has none). Returns the new params, nodes, shared leaves and copies."""
        grads = [g.astype(p.dtype) for g, p in zip(grads, params)]
        if self.tc.grad_clip:  # optax.clip_by_global_norm's arithmetic, with the global norm given
            clip = self.tc.grad_clip
            grads = [jax.lax.select(norm < clip, g, (g / norm.astype(g.dtype)) * clip) for g in grads]
        opt_state = self._assemble_opt(nodes, shared)
        updates, new_opt = self.inner.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_nodes, new_shared = self._cut_opt(new_opt, lambda node: node)
        if self.tc.skip_nonfinite_steps:  # a non-finite loss or gradient: keep the old values
            new_params, new_nodes, new_shared = where_ok(ok, (new_params, new_nodes, new_shared),
                                                         (params, nodes, shared))
        copies = [None if c is None else p.astype(c.dtype) for p, c in zip(new_params, copies)]
        return new_params, new_nodes, new_shared, copies

    # ---------------------------------------------------------------- the optimizer state, cut and joined
    def _cut_opt(self, opt_state, take):
        """(parameter-shaped nodes, each through `take`, and the other nodes) of an optimizer state."""
        nodes = self.odef.flatten_up_to(opt_state)
        return ([take(n) for n, p in zip(nodes, self.per_param) if p],
                [n for n, p in zip(nodes, self.per_param) if not p])

    def _assemble_opt(self, param_nodes, shared):
        param_nodes, shared = iter(param_nodes), iter(shared)
        return self.odef.unflatten([next(param_nodes) if p else next(shared) for p in self.per_param])

    # ---------------------------------------------------------------- the step's tail
    def __call__(self, state, grads, total, ce, aux, rng, sums=None):
        params = self.pdef.flatten_up_to(state.params)
        grads = self.pdef.flatten_up_to(grads)
        nodes, shared = self._cut_opt(state.opt_state, self.pdef.flatten_up_to)
        copies = [None] * len(params)
        if self.copy_at:
            copy_leaves = jax.tree.leaves(state.compute_params)
            for i, j in self.copy_at.items():
                copies[i] = copy_leaves[j]
        sums = sums or {}
        sums = [sums[k] if k in sums else self.sumsq([grads[i] for i in g], [params[i] for i in g])
                for k, g in enumerate(self.groups)]
        norm, ok, model_state, step, data_pos, metrics = self.finish(
            state.params, state.model_state, sums, total, ce, aux, state.step, state.data_pos)
        new_params, new_nodes, new_copies = list(params), [list(n) for n in nodes], list(copies)
        new_shared = None
        for g in self.groups:
            p, n, s, c = self.update([params[i] for i in g], [grads[i] for i in g],
                                     [[node[i] for i in g] for node in nodes], shared,
                                     [copies[i] for i in g], norm, ok)
            for k, i in enumerate(g):
                new_params[i], new_copies[i] = p[k], c[k]
                for node, cut in zip(new_nodes, n):
                    node[i] = cut[k]
            new_shared = s if new_shared is None else new_shared  # the same in every group (counts)
        opt_state = self._assemble_opt([self.pdef.unflatten(n) for n in new_nodes], new_shared)
        compute = None
        if self.copy_at:
            leaves = [None] * len(self.copy_at)
            for i, j in self.copy_at.items():
                leaves[j] = new_copies[i]
            compute = self.cdef.unflatten(leaves)
        new = state.replace(step=step, data_pos=data_pos, params=self.pdef.unflatten(new_params),
                            opt_state=opt_state, model_state=model_state, rng=rng, compute_params=compute)
        return new, metrics
