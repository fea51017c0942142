"""ops.activations.gated: the one-pass custom VJP against autodiff of the formula (fresh random
inputs, float32 and bf16), and its backward free of the pad + add the plain transpose makes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.activations import gated


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_gated_matches_reference(kind, dtype, tol):
    h = (2 * jax.random.normal(jax.random.key(1), (6, 5, 2, 24))).astype(dtype)
    ct = jax.random.normal(jax.random.key(2), (6, 5, 24)).astype(dtype)
    ys, gs = [], []
    for backend in ("xla", "reference"):
        y, vjp = jax.vjp(lambda h: gated(h, kind, backend=backend), h)
        ys.append(np.asarray(y, np.float32))
        gs.append(np.asarray(vjp(ct)[0], np.float32))
        assert y.dtype == vjp(ct)[0].dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(ys[0], ys[1], rtol=tol, atol=tol)
    assert np.linalg.norm(gs[0] - gs[1]) / np.linalg.norm(gs[1]) < tol


def test_backward_writes_once():
    h = jax.random.normal(jax.random.key(0), (64, 2, 32))
    f = lambda h, b: jnp.sum(gated(h, "swiglu", backend=b) ** 2)  # noqa: E731
    fast = str(jax.make_jaxpr(jax.grad(lambda h: f(h, "xla")))(h))
    plain = str(jax.make_jaxpr(jax.grad(lambda h: f(h, "reference")))(h))
    assert "pad[" not in fast and "f32[64,2,32] = add_any" not in fast
    assert "pad[" in plain and "f32[64,2,32] = add_any" in plain  # what the custom VJP replaces


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        gated(jnp.zeros((2, 2, 4)), "relu")
    with pytest.raises(ValueError, match=r"\[..., 2, F\]"):
        gated(jnp.zeros((2, 3, 4)), "swiglu")
