"""ops.rope_kernel: the Pallas kernel (interpret mode) against the reference and moe_jax.rope.apply_rope,
forward and the gradient w.r.t. x, on fresh random inputs with plain, YaRN and random (unequal-halves)
tables; unsupported shapes and the CPU "auto" choice. The same for rope_qkv (q, k and v of one merged
projection) against slicing plus the reference, and the attention module taking it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import RopeScalingConfig
from moe_jax.rope import apply_rope, rope_tables
from ops.rope_kernel import reference_rope, reference_rope_qkv, rope, rope_qkv, takes_qkv

YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=16)


def _normal(rng, shape, dtype="float32"):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


def _tables(kind, rng, s, hd):
    if kind == "random":  # no structure at all: four independent halves
        return _normal(rng, (s, hd)), _normal(rng, (s, hd))
    return rope_tables(s, hd, 10000.0, YARN if kind == "yarn" else None)


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


# (2, 64, 4, 64): two blocks of 32 positions a sequence; (1, 3, 2, 16): one position a block.
@pytest.mark.parametrize("shape,tables", [((2, 64, 4, 64), "plain"), ((2, 64, 4, 64), "yarn"),
                                          ((2, 64, 4, 64), "random"), ((1, 3, 2, 16), "random")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_matches_reference(shape, tables, dtype):
    rng = np.random.default_rng([shape[1], len(tables), len(dtype)])
    x = _normal(rng, shape, dtype)
    cos, sin = _tables(tables, rng, shape[1], shape[3])
    if tables == "yarn":
        assert not np.allclose(np.asarray(cos[:, 0]) ** 2 + np.asarray(sin[:, 0]) ** 2, 1.0)  # scaled
    tol = 1e-6 if dtype == "float32" else 1e-2

    def kernel(x):
        return rope(x, cos, sin, backend="pallas", interpret=True)

    out = jax.jit(kernel)(x)
    ref = reference_rope(x, cos, sin)
    assert out.dtype == x.dtype
    _close(out, ref, tol)
    _close(out, apply_rope(x, cos, sin), tol)

    ct = _normal(rng, shape, dtype)
    dx = jax.jit(lambda x, ct: jax.vjp(kernel, x)[1](ct)[0])(x, ct)
    dx_ref = jax.vjp(lambda x: reference_rope(x, cos, sin), x)[1](ct)[0]
    assert dx.dtype == x.dtype
    _close(dx, dx_ref, tol)


def test_tables_get_zero_cotangents():
    rng = np.random.default_rng(1)
    x = _normal(rng, (1, 4, 2, 8))
    cos, sin = _tables("random", rng, 4, 8)
    _, vjp = jax.vjp(lambda x, c, s: rope(x, c, s, backend="pallas", interpret=True), x, cos, sin)
    _, dcos, dsin = vjp(_normal(rng, x.shape))
    assert not np.any(np.asarray(dcos)) and not np.any(np.asarray(dsin))


@pytest.mark.parametrize("shape,tshape,match", [
    ((1, 4, 2, 24), (4, 24), "head dim 24"),
    ((1, 4, 2, 512), (4, 512), "head dim 512"),
    ((1, 4, 3, 16), (4, 16), "3 heads"),
    ((1, 4, 2, 16), (8, 16), r"must be \[S, H\]"),
    ((1, 4, 2, 15), (4, 15), "even head dim"),
])
def test_unsupported_shapes_raise(shape, tshape, match):
    x, table = np.ones(shape, np.float32), np.ones(tshape, np.float32)  # rejected before any math
    with pytest.raises(ValueError, match=match):
        rope(x, table, table, backend="pallas", interpret=True)


def test_pallas_without_interpret_needs_gpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU the kernel runs")
    x, table = np.ones((1, 4, 2, 16), np.float32), np.ones((4, 16), np.float32)
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        rope(x, table, table, backend="pallas")


def test_auto_on_cpu_is_the_reference():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("on a GPU auto takes the kernel")
    x = _normal(np.random.default_rng(4), (2, 8, 4, 32), "bfloat16")
    cos, sin = rope_tables(8, 32, 10000.0, YARN)
    np.testing.assert_array_equal(np.asarray(rope(x, cos, sin), np.float32),
                                  np.asarray(reference_rope(x, cos, sin), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 4])  # mixtral_small's q and k
def test_gpu_kernel_matches_reference(heads):
    rng = np.random.default_rng(heads)
    x = _normal(rng, (4, 2048, heads, 128), "bfloat16")
    dy = _normal(rng, x.shape, "bfloat16")
    cos, sin = rope_tables(2048, 128, 10000.0, YARN)

    def fwd_bwd(backend):
        return jax.jit(lambda x, dy: (lambda o: (o[0], o[1](dy)[0]))(
            jax.vjp(lambda x: rope(x, cos, sin, backend=backend), x)))(x, dy)
    for a, b in zip(fwd_bwd("pallas"), fwd_bwd("reference")):
        _close(a, b, 2e-2)


# (2, 64, 8+2·2 heads, 32): 16-position blocks, q in 4 chunks; (1, 3, 2+2·1, 16): one position a block,
# one KV head; (1, 8, 4+2·4, 8): as many query heads as KV heads
@pytest.mark.parametrize("shape,kv,tables", [((2, 64, 12, 32), 2, "yarn"), ((1, 3, 4, 16), 1, "random"),
                                             ((1, 8, 12, 8), 4, "plain")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qkv_kernel_matches_slices_and_reference(shape, kv, tables, dtype):
    rng = np.random.default_rng([shape[2], kv, len(dtype)])
    y = _normal(rng, shape, dtype)
    cos, sin = _tables(tables, rng, shape[1], shape[3])
    tol = 1e-6 if dtype == "float32" else 1e-2
    n = shape[2] - 2 * kv

    def kernel(y):
        return rope_qkv(y, cos, sin, num_kv=kv, backend="pallas", interpret=True)

    out = jax.jit(kernel)(y)
    want = (reference_rope(y[:, :, :n], cos, sin), reference_rope(y[:, :, n:n + kv], cos, sin), y[:, :, n + kv:])
    for o, r in zip(out, want):
        assert o.dtype == y.dtype and o.shape == r.shape
        _close(o, r, tol)
    cts = tuple(_normal(rng, r.shape, dtype) for r in want)
    dy = jax.jit(lambda y, cts: jax.vjp(kernel, y)[1](cts)[0])(y, cts)
    dy_ref = jax.vjp(lambda y: reference_rope_qkv(y, cos, sin, kv), y)[1](cts)[0]
    assert dy.dtype == y.dtype
    _close(dy, dy_ref, tol)
    np.testing.assert_array_equal(np.asarray(dy[:, :, n + kv:]), np.asarray(cts[2]))  # v's gradient: a copy


@pytest.mark.parametrize("shape,kv,tshape,match", [
    ((1, 4, 7, 16), 2, (4, 16), "3 query heads"),
    ((1, 4, 9, 16), 3, (4, 16), "3 KV heads"),
    ((1, 4, 8, 24), 2, (4, 24), "head dim 24"),
    ((1, 4, 8, 16), 2, (8, 16), r"must be \[S, H\]"),
    ((1, 4, 4, 16), 2, (4, 16), "N >= 1 query heads"),
])
def test_qkv_unsupported_shapes_raise(shape, kv, tshape, match):
    y, table = np.ones(shape, np.float32), np.ones(tshape, np.float32)
    with pytest.raises(ValueError, match=match):
        rope_qkv(y, table, table, num_kv=kv, backend="pallas", interpret=True)


def test_takes_qkv_never_raises():
    assert takes_qkv((2, 8, 12, 32), (8, 32), 2, backend="pallas", interpret=True)
    assert not takes_qkv((2, 8, 9, 32), (8, 32), 3, backend="pallas", interpret=True)  # raises in rope_qkv
    assert not takes_qkv((2, 8, 12, 32), (8, 32), 2, backend="reference")
    if jax.devices()[0].platform != "gpu":
        assert not takes_qkv((2, 8, 12, 32), (8, 32), 2)  # auto on CPU: the reference path


def _attention(kernels, **kw):
    import dataclasses

    from flax import nnx

    from moe_jax.attention import Attention
    from moe_jax.config import ModelConfig
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                      max_seq_len=16, dtype="float32", fused_kernels=kernels)
    return Attention(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True}])
def test_attention_merged_projection_matches_three(extra):
    """The attention module with the kernels (one merged projection into rope_qkv where there are no biases
    or norms; with biases, three projections and rope) against the plain path: output and gradients."""
    from flax import nnx
    rng = np.random.default_rng(7)
    x = _normal(rng, (2, 16, 32))
    cos, sin = rope_tables(16, 8, 10000.0)
    ref, ker = _attention("reference", **extra), _attention("interpret", **extra)
    graph_r, params = nnx.split(ref, nnx.Param)
    graph_k, _ = nnx.split(ker, nnx.Param)
    params = jax.tree.map(lambda p: p + _normal(rng, p.shape), params)  # biases too: not zero

    def loss(graph):
        def f(params, x):
            q, k, v = nnx.merge(graph, params).qkv(x, cos, sin)
            return sum(jnp.sum(t * _normal(np.random.default_rng(i), t.shape)) for i, t in enumerate((q, k, v)))
        return f

    jaxpr = str(jax.make_jaxpr(loss(graph_k))(params, x))
    assert ("rope_qkv_fwd" in jaxpr) == (not extra)  # the merged path only without biases
    l_r, g_r = jax.value_and_grad(loss(graph_r), argnums=(0, 1))(params, x)
    l_k, g_k = jax.value_and_grad(loss(graph_k), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(l_k, l_r, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_qkv_kernel_matches_reference():
    """mixtral_small's attention: 16 query heads, 4 KV heads, head dim 128."""
    rng = np.random.default_rng(24)
    y = _normal(rng, (4, 2048, 24, 128), "bfloat16")
    cos, sin = rope_tables(2048, 128, 10000.0, YARN)
    cts = (_normal(rng, (4, 2048, 16, 128), "bfloat16"), _normal(rng, (4, 2048, 4, 128), "bfloat16"),
           _normal(rng, (4, 2048, 4, 128), "bfloat16"))

    def fwd_bwd(backend):
        return jax.jit(lambda y, cts: (lambda o: (o[0], o[1](cts)[0]))(
            jax.vjp(lambda y: rope_qkv(y, cos, sin, num_kv=4, backend=backend), y)))(y, cts)
    (out_k, dy_k), (out_r, dy_r) = fwd_bwd("pallas"), fwd_bwd("reference")
    for a, b in zip(out_k, out_r):
        _close(a, b, 2e-2)
    _close(dy_k, dy_r, 2e-2)
