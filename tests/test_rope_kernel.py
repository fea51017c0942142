"""ops.rope_kernel: the Pallas kernel (interpret mode) against the reference and moe_jax.rope.apply_rope,
forward and the gradient w.r.t. x, on fresh random inputs with plain, YaRN and random (unequal-halves)
tables; unsupported shapes and the CPU "auto" choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import RopeScalingConfig
from moe_jax.rope import apply_rope, rope_tables
from ops.rope_kernel import reference_rope, rope

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
