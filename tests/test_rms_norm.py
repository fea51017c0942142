"""ops.rms_norm: the Pallas kernels (interpret mode on CPU; Triton on the GPU) against the plain-JAX
reference, forward and gradients (x and scale), on fresh random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.rms_norm import add_rms_norm, kernel_takes, reference_add_rms_norm, reference_rms_norm, rms_norm

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def _inputs(shape, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = (2.0 * jax.random.normal(k[0], shape) + 0.5).astype(dtype)
    scale = 1.0 + 0.3 * jax.random.normal(k[1], shape[-1:], jnp.float32)
    dy = jax.random.normal(k[2], shape).astype(dtype)
    return x, scale, dy


def _value_and_grads(backend, x, scale, dy, interpret):
    def f(x, scale):
        y = rms_norm(x, scale, 1e-5, backend=backend, interpret=interpret)
        return y, jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    y = f(x, scale)[0]
    gx, gs = jax.grad(lambda x, s: f(x, s)[1], argnums=(0, 1))(x, scale)
    return y, gx, gs


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 32, 128), (6, 256), (3, 5, 64)])  # 6 and 15 rows: odd blocks
def test_kernels_match_reference(shape, dtype):
    x, scale, dy = _inputs(shape, dtype)
    ours = _value_and_grads("pallas", x, scale, dy, True)
    ref = _value_and_grads("reference", x, scale, dy, False)
    assert ours[0].dtype == x.dtype and ours[1].dtype == x.dtype and ours[2].dtype == scale.dtype
    for a, b in zip(ours, ref):
        _close(a, b, TOL[dtype])


def _add_value_and_grads(backend, x, delta, scale, cts, interpret):
    def f(x, delta, scale):
        s, y = add_rms_norm(x, delta, scale, 1e-5, backend=backend, interpret=interpret)
        return (s, y), sum(jnp.sum(a.astype(jnp.float32) * c) for a, c in zip((s, y), cts))
    out = f(x, delta, scale)[0]
    return out + jax.grad(lambda *a: f(*a)[1], argnums=(0, 1, 2))(x, delta, scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 64, 128), (6, 256)])  # 128 rows: two backward programs
def test_add_kernels_match_reference(shape, dtype):
    """The residual add fused in: both outputs (sum and norm) and the gradients of x, delta, scale."""
    x, scale, _ = _inputs(shape, dtype, seed=1)
    delta, _, _ = _inputs(shape, dtype, seed=2)
    k = jax.random.split(jax.random.key(4))
    cts = tuple(jax.random.normal(kk, shape) for kk in k)
    ours = _add_value_and_grads("pallas", x, delta, scale, cts, True)
    ref = _add_value_and_grads("reference", x, delta, scale, cts, False)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        _close(a, b, TOL[dtype])
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32),
                                  np.asarray(reference_add_rms_norm(x, delta, scale, 1e-5)[0], np.float32))


def _fan_value_and_grads(backend, x, scale, cts, interpret):
    """n copies of the norm, each with its own cotangent (as q, k and v projections use them)."""
    def f(x, scale):
        ys = rms_norm(x, scale, 1e-5, fanout=len(cts), backend=backend, interpret=interpret)
        return ys, sum(jnp.sum(y.astype(jnp.float32) * c) for y, c in zip(ys, cts))
    ys = f(x, scale)[0]
    assert isinstance(ys, tuple) and len(ys) == len(cts)
    return (*ys, *jax.grad(lambda x, s: f(x, s)[1], argnums=(0, 1))(x, scale))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,n", [((2, 64, 128), 3), ((6, 256), 2)])
def test_fanout_kernels_match_reference(shape, n, dtype):
    """fanout=n: every copy is the norm, and the gradients are those of the n cotangents' sum."""
    x, scale, _ = _inputs(shape, dtype, seed=7)
    cts = tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(8), n))
    ours = _fan_value_and_grads("pallas", x, scale, cts, True)
    ref = _fan_value_and_grads("reference", x, scale, cts, False)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        _close(a, b, TOL[dtype])
    # the fused sum is the plain norm's gradient of the summed cotangent
    plain = _value_and_grads("pallas", x, scale, sum(cts).astype(dtype), True)
    _close(ours[n], plain[1], TOL[dtype])
    _close(ours[n + 1], plain[2], TOL[dtype])


def test_reference_is_the_formula():
    x, scale, _ = _inputs((5, 64), "float32", seed=3)
    xn = np.asarray(x, np.float64)
    want = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(scale, np.float64)
    _close(reference_rms_norm(x, scale, 1e-5), want, 1e-5)


def test_choice_and_errors():
    x, scale, _ = _inputs((4, 96), "float32")
    assert kernel_takes(x.shape) == (False, "row width 96 is not a power of two <= 16384")
    with pytest.raises(ValueError, match="row width 96"):
        rms_norm(x, scale, 1e-5, backend="pallas", interpret=True)
    with pytest.raises(ValueError, match="scale"):
        rms_norm(x, scale[:8], 1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        rms_norm(x, scale, 1e-5, backend="triton")
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(x, x[:2], scale, 1e-5)
    with pytest.raises(ValueError, match="fanout"):
        rms_norm(x, scale, 1e-5, fanout=0)
    x, scale, _ = _inputs((4, 128), "float32")
    if jax.devices()[0].platform == "cpu":  # auto: plain JAX off the GPU
        np.testing.assert_array_equal(rms_norm(x, scale, 1e-5), reference_rms_norm(x, scale, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 2048), (16, 2048, 128)])  # a model's rows; qk-norm rows
def test_gpu_kernels_match_reference(shape):
    x, scale, dy = _inputs(shape, "bfloat16", seed=5)
    ours = jax.jit(lambda *a: _value_and_grads("pallas", *a, False))(x, scale, dy)
    ref = jax.jit(lambda *a: _value_and_grads("reference", *a, False))(x, scale, dy)
    for a, b in zip(ours, ref):
        _close(a, b, 2e-2)
    delta, _, _ = _inputs(shape, "bfloat16", seed=6)
    cts = (dy.astype(jnp.float32), 0.5 * dy.astype(jnp.float32))
    ours = jax.jit(lambda *a: _add_value_and_grads("pallas", *a, False))(x, delta, scale, cts)
    ref = jax.jit(lambda *a: _add_value_and_grads("reference", *a, False))(x, delta, scale, cts)
    for a, b in zip(ours, ref):
        _close(a, b, 2e-2)
    cts = (dy.astype(jnp.float32), -0.5 * dy.astype(jnp.float32), delta.astype(jnp.float32))
    ours = jax.jit(lambda *a: _fan_value_and_grads("pallas", *a, False))(x, scale, cts)
    ref = jax.jit(lambda *a: _fan_value_and_grads("reference", *a, False))(x, scale, cts)
    for a, b in zip(ours, ref):
        _close(a, b, 2e-2)
