"""ops.rms_norm: the Pallas kernels (interpret mode on CPU; Triton on the GPU) against the plain-JAX
reference, forward and gradients (x and scale), on fresh random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.rms_norm import kernel_takes, reference_rms_norm, rms_norm

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
