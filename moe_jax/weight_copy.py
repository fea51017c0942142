"""The routed experts' weights kept in the compute dtype between steps (with float32 master weights).

With `param_dtype` float32 and `dtype` bfloat16 the experts read their weights as `w.astype(bf16)`:
every step a pass over the largest tensors of the model (read 4 bytes, write 2 per weight) before the
first grouped GEMM. Instead the train state holds those bf16 values (`TrainState.compute_params`) and
the step writes the next step's copy in the optimizer's pass, which already reads and writes every
weight (2 more bytes written per weight). The forward reads the copy; the gradient still flows to the
float32 master weight exactly as through the cast (the bf16 cotangent converted), so the numbers of a
step are those of the cast.

The copy is derived state: checkpoints leave it out and a restore rebuilds it from the weights.

`compute_params` is a dict {key path of the weight in `params`: its nnx Variable with the copy's
value}; a Variable keeps the weight's metadata, so the copy shards like its weight.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moe_jax.parallel import _is_var

# GroupedExperts reads these only as `.astype(cfg.dtype)` (moe_jax/experts.py `weights`)
COPIED = ("w1_EDnF", "w2_EFD")


def leaf_key(path) -> str:
    """The `compute_params` key of a flattened leaf's weight: its nnx Variable's path (the leaf's path, from
    `jax.tree_util.tree_flatten_with_path`, ends in the Variable's `.value`)."""
    return jax.tree_util.keystr(path[:-1])


def _flat(params) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): v
            for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]}


def _copied(key: str) -> bool:
    return any(key.endswith(f"['{name}']") for name in COPIED)


def init(params, dtype) -> dict | None:
    """The copy of `params` in `dtype` (None when no copied weight is stored in another dtype)."""
    dtype = jnp.dtype(dtype)
    copy = {k: jax.tree.map(lambda p: p.astype(dtype), v) for k, v in _flat(params).items()
            if _copied(k) and jnp.dtype(v.dtype) != dtype}
    return copy or None


def refresh(params, like: dict | None) -> dict | None:
    """The copy of `params` for the keys and dtypes of `like` (an earlier copy, or its shapes)."""
    if like is None:
        return None
    flat = _flat(params)
    return {k: jax.tree.map(lambda p, c: p.astype(c.dtype), flat[k], c) for k, c in like.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _use_copy(dtype, p, c):
    return c


def _use_copy_fwd(dtype, p, c):
    return c, None


def _use_copy_bwd(dtype, _, ct):
    return ct.astype(dtype), None  # as through p.astype(c.dtype); the copy gets no gradient


_use_copy.defvjp(_use_copy_fwd, _use_copy_bwd)


def swap_in(params, copy: dict | None):
    """`params` with each copied weight's value replaced by its copy, for the forward: differentiating
    through it gives the weights the gradients of `p.astype(copy dtype)`."""
    if copy is None:
        return params

    def one(path, v):
        c = copy.get(jax.tree_util.keystr(path))
        if c is None:
            return v
        return jax.tree.map(lambda p, cv: _use_copy(jnp.dtype(p.dtype), p, cv), v, c)
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)
