"""MoEConfig.recompute_rows: fc1's rows made again in its backward (ops.grouped_matmul_remade_lhs) instead
of kept. The op against grouped_matmul on the same rows (XLA backend, and the Pallas kernels in interpret
mode), forward and gradients on fresh random inputs; that the rows are not among the saved residuals; the
MoE layer with and without it (dropless, capacity padding, gates on the input), with -m gpu on the
kernels at bf16."""
import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import ops
from moe_jax import dispatch
from moe_jax.moe import MoELayer
from tests.test_moe import B, S, make_cfg, rel_err

E, K = 4, 2


def _assignment(key, t, capacity=None):
    """A random top-K routing of t tokens over E experts (a quarter dropped), sorted by expert."""
    k1, k2, k3 = jax.random.split(key, 3)
    experts = jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(jax.random.split(k1, t)).astype(jnp.int32)
    kept = jax.random.uniform(k2, (t, K)) > 0.25
    weights = jax.nn.softmax(jax.random.normal(k3, (t, K)), axis=-1) * kept
    a = dispatch.Assignment.of(weights, experts, kept, E)
    return a, dispatch.sort_by_expert(a, capacity=capacity)


def _residual_shapes(f, *args):
    """Shapes of what JAX keeps from f's forward for its backward (jax.ad_checkpoint's listing)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(f, *args)
    return [tuple(int(n) for n in m.split(",") if n) for m in re.findall(r"^\w+\[([\d,]*)\]", buf.getvalue(), re.M)]


@pytest.mark.parametrize("backend,interpret,gates,capacity", [
    ("xla", False, False, None), ("xla", False, True, 40),
    pytest.param("pallas", True, False, None, marks=pytest.mark.slow)])  # interpret: ~30 s; GPU below
def test_op_matches_grouped_matmul_on_the_same_rows(backend, interpret, gates, capacity):
    t, d, n = (64, 64, 128) if interpret else (48, 24, 20)
    dtype = jnp.bfloat16 if interpret else jnp.float32
    k = jax.random.split(jax.random.key(7), 4)
    a, perm = _assignment(k[0], t, capacity)
    x = jax.random.normal(k[1], (t, d), dtype)
    w = (0.2 * jax.random.normal(k[2], (E, d, n))).astype(dtype)
    ct = jax.random.normal(k[3], (perm.num_rows, n), jnp.float32)
    make = dispatch.rows_maker("interpret" if interpret else "reference")
    g = a.weights.astype(jnp.float32) if gates else None
    args = (perm.dest, perm.src) + ((g,) if gates else ())

    def ours(x, w, *g):
        y = ops.grouped_matmul_remade_lhs(make, (x, *args[:2], *g), w, perm.group_sizes, backend=backend,
                                          interpret=interpret)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    def plain(x, w, *g):
        y = ops.grouped_matmul(make(x, *args[:2], *g), w, perm.group_sizes, backend=backend,
                               interpret=interpret)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    extra = (g,) if gates else ()
    argnums = tuple(range(2 + len(extra)))
    (_, y1), g1 = jax.value_and_grad(ours, argnums, has_aux=True)(x, w, *extra)
    (_, y2), g2 = jax.value_and_grad(plain, argnums, has_aux=True)(x, w, *extra)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6
    assert float(jnp.abs(y2.astype(jnp.float32)).max()) > 0.1  # the rows reach the GEMM
    assert rel_err(y1, y2) < tol
    for a_, b_ in zip(g1, g2):
        assert float(jnp.abs(b_.astype(jnp.float32)).max()) > 0
        assert rel_err(a_, b_) < tol
    # the rows [R, d] are not kept for the backward: only the tokens, the maps and the weights
    shapes = _residual_shapes(lambda *p: ours(*p)[0], x, w, *extra)
    assert (perm.num_rows, d) not in shapes and (t, d) in shapes
    shapes = _residual_shapes(lambda *p: plain(*p)[0], x, w, *extra)
    assert (perm.num_rows, d) in shapes  # the check above can fail


CASES = {"dropless": {}, "capacity_padded": dict(expert_capacity_factor=0.8, pad_expert_input_to_capacity=True),
         "probs_on_input_top1": dict(router_topk=1, apply_probs_on_input=True),
         "shared": dict(shared_expert_intermediate_size=12)}


@pytest.mark.parametrize("backend", ["reference", pytest.param("pallas", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_same_with_and_without(case, backend):
    """The MoE layer's output and parameter gradients are those of the layer that keeps its rows."""
    pallas = backend == "pallas"
    dtype, d = ("bfloat16", 256) if pallas else ("float32", 16)
    kw = dict(CASES[case], ffn_hidden_size=256 if pallas else 8,
              grouped_gemm_backend="pallas" if pallas else "xla")
    cfg = dataclasses.replace(make_cfg(d, **kw), dtype=dtype, init_std=0.05 if pallas else 0.3)
    x = jax.random.normal(jax.random.key(2), (B, S, d), jnp.float32)
    ct = jax.random.normal(jax.random.key(3), (B, S, d))

    def run(recompute):
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, recompute_rows=recompute))
        layer = MoELayer(c, rngs=nnx.Rngs(1))
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        def f(p):
            y, aux = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(y.astype(jnp.float32) * ct) + sum(aux["losses"].values()), y

        (_, y), grads = jax.value_and_grad(f, has_aux=True)(params)
        return y, grads

    y1, g1 = run(True)
    y2, g2 = run(False)
    tol = 1e-2 if pallas else 1e-6
    assert rel_err(y1, y2) < tol
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(leaves1) == len(leaves2) and any(float(jnp.abs(v).max()) > 0 for v in leaves2)
    for a_, b_ in zip(leaves1, leaves2):
        assert rel_err(a_, b_) < tol


def test_dispatch_remade_is_dispatch():
    """dispatch_remade's make(*args) are dispatch's rows, with the same group sizes."""
    a, _ = _assignment(jax.random.key(4), 32)
    x = jax.random.normal(jax.random.key(5), (32, 8))
    for disp in (dispatch.LocalDispatcher(kernels="reference"),
                 dispatch.LocalDispatcher(capacity=10, kernels="reference"),
                 dispatch.LocalDispatcher(probs_on_input=True, kernels="reference")):
        rows, gs, _ = disp.dispatch(x, a)
        make, args, gs2, _ = disp.dispatch_remade(x, a)
        np.testing.assert_array_equal(np.asarray(make(*args)), np.asarray(rows))
        np.testing.assert_array_equal(np.asarray(gs2), np.asarray(gs))


def test_config_auto_true_false():
    """"auto" (the default) and true recompute on one device, false keeps the rows; anything else is refused
    with the field named."""
    cfg = make_cfg(16, ffn_hidden_size=8)
    assert cfg.moe.recompute_rows == "auto"
    for value, want in (("auto", True), (True, True), (False, False)):
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, recompute_rows=value))
        assert MoELayer(c, rngs=nnx.Rngs(0)).local_dispatcher(32).recompute_rows is want
    with pytest.raises(ValueError, match="MoEConfig.recompute_rows='yes' is invalid: must be true, false or 'auto'"):
        dataclasses.replace(cfg.moe, recompute_rows="yes")
