"""ops.gated_act: the SwiGLU custom VJP (plain forward, Pallas backward in interpret mode) against the
reference and its plain autodiff, on fresh random inputs and cotangents; backend choice and shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import gated_act as G


# (R, F): F a power of two (two column blocks), F = 11·16 (like 1408 = 11·128: 16-wide column blocks), odd R
@pytest.mark.parametrize("shape", [(16, 2048), (48, 176), (7, 32)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_matches_reference(shape, dtype):
    r, f = shape
    kh, kd = jax.random.split(jax.random.fold_in(jax.random.key(0), r * f))
    h = (2.0 * jax.random.normal(kh, (r, 2, f))).astype(dtype)
    dy = jax.random.normal(kd, (r, f)).astype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-2

    @jax.jit
    def run(h, dy):
        (y, vjp), (y_ref, vjp_ref) = (jax.vjp(fn, h) for fn in (
            lambda h: G.swiglu(h, backend="pallas", interpret=True), G.reference_swiglu))
        return y, y_ref, vjp(dy)[0], vjp_ref(dy)[0]

    y, y_ref, dh, dh_ref = run(h, dy)
    assert y.shape == (r, f) and y.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    assert dh.shape == h.shape and dh.dtype == h.dtype
    dh, dh_ref = np.asarray(dh, np.float32), np.asarray(dh_ref, np.float32)
    scale = np.abs(dh_ref).max()
    np.testing.assert_allclose(dh, dh_ref, rtol=tol, atol=tol * scale)
    if dtype == "float32":  # and the math itself, in float64
        g, u, d = (np.asarray(a, np.float64) for a in (h[:, 0], h[:, 1], dy))
        s = 1 / (1 + np.exp(-g))
        np.testing.assert_allclose(dh[:, 0], d * u * s * (1 + g * (1 - s)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dh[:, 1], d * g * s, rtol=1e-5, atol=1e-5)


def test_swiglu_grad_under_jit():
    h = jax.random.normal(jax.random.key(1), (32, 2, 128))
    loss = jax.grad(lambda h: jnp.sum(G.swiglu(h, backend="pallas", interpret=True) ** 2))
    ref = jax.grad(lambda h: jnp.sum(G.reference_swiglu(h) ** 2))
    assert str(jax.make_jaxpr(loss)(h)).count("pallas_call") == 1  # the kernel is the backward
    loss = jax.jit(loss)
    np.testing.assert_allclose(loss(h), ref(h), rtol=1e-5, atol=1e-6)


def test_swiglu_unsupported_shapes_and_backends():
    h = jax.random.normal(jax.random.key(2), (8, 2, 24))
    with pytest.raises(ValueError, match="F = 24 is not a multiple of 16"):
        G.swiglu(h, backend="pallas", interpret=True)
    np.testing.assert_array_equal(G.swiglu(h, interpret=True), G.reference_swiglu(h))  # auto falls back
    for bad in (jnp.ones((8, 3, 16)), jnp.ones((2, 8, 2, 16)), jnp.ones((8, 32))):
        with pytest.raises(ValueError, match=r"\[R, 2, F\]"):
            G.swiglu(bad, backend="reference")
    with pytest.raises(ValueError, match="unknown backend"):
        G.swiglu(jnp.ones((8, 2, 16)), backend="triton")


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="CPU behaviour")
def test_swiglu_auto_on_cpu_is_reference():
    h = jax.random.normal(jax.random.key(3), (16, 2, 64))
    np.testing.assert_array_equal(G.swiglu(h), G.reference_swiglu(h))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        G.swiglu(h, backend="pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("f", [4096, 1408])  # mixtral_small's and deepseek_small's expert widths
def test_gpu_kernel_matches_reference(f):
    kh, kd = jax.random.split(jax.random.key(f))
    h = (2.0 * jax.random.normal(kh, (8192, 2, f))).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (8192, f)).astype(jnp.bfloat16)
    dh = jax.jit(lambda h, dy: jax.vjp(lambda h: G.swiglu(h, backend="pallas"), h)[1](dy)[0])(h, dy)
    dh_ref = jax.jit(lambda h, dy: jax.vjp(G.reference_swiglu, h)[1](dy)[0])(h, dy)
    dh, dh_ref = np.asarray(dh, np.float32), np.asarray(dh_ref, np.float32)
    np.testing.assert_allclose(dh, dh_ref, rtol=2e-2, atol=2e-2 * np.abs(dh_ref).max())
