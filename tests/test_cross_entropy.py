"""ops.linear_cross_entropy: the chunked form (gradients made in the forward pass) against plain
logits + autodiff, loss and gradients, float32 and bf16, on fresh random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.cross_entropy import chunk_rows, linear_cross_entropy


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("chunk", [None, 16, 96])
def test_chunked_matches_reference(dtype, tol, chunk):
    T, D, V = 96, 32, 200
    ks = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(ks[0], (T, D)).astype(dtype)
    w = (0.3 * jax.random.normal(ks[1], (D, V))).astype(dtype)
    tg = jax.random.randint(ks[2], (T,), 0, V)

    def f(x, w, backend):  # a non-unit cotangent reaches the backward pass
        return 3.0 * linear_cross_entropy(x, w, tg, backend=backend, chunk=chunk)

    l1, g1 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "chunked")
    l2, g2 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "reference")
    assert l1.dtype == jnp.float32
    np.testing.assert_allclose(l1, l2, rtol=tol)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol
    # the forward alone (no gradient) gives the same loss
    np.testing.assert_allclose(jax.jit(f, static_argnums=2)(x, w, "chunked"), l2, rtol=tol)


def test_chunk_rows_and_errors():
    assert chunk_rows(16384, 32000) == 2048          # the largest divisor whose logits fit 256 MiB
    assert chunk_rows(12, 10) == 12 and chunk_rows(7, 10**9) == 1
    x, w, t = jnp.zeros((6, 4)), jnp.zeros((4, 5)), jnp.zeros((6,), jnp.int32)
    with pytest.raises(ValueError, match="must divide"):
        linear_cross_entropy(x, w, t, chunk=4)
    with pytest.raises(ValueError, match="D=4"):
        linear_cross_entropy(x, jnp.zeros((3, 5)), t)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(x, w, t, backend="triton")


@pytest.mark.parametrize("chunk", [None, 16])
def test_weighted_matches_reference_and_masked_subset(chunk):
    T, D, V = 48, 16, 40
    ks = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(ks[0], (T, D))
    w = 0.3 * jax.random.normal(ks[1], (D, V))
    tg = jax.random.randint(ks[2], (T,), 0, V)
    wt = jax.random.uniform(ks[3], (T,)) * (jnp.arange(T) % 3 != 0)  # zeros and random weights

    def f(x, w, backend):
        return 3.0 * linear_cross_entropy(x, w, tg, wt, backend=backend, chunk=chunk)

    l1, g1 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "chunked")
    l2, g2 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "reference")
    np.testing.assert_allclose(l1, l2, rtol=2e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # a 0/1 mask is the plain mean over the kept rows
    keep = np.arange(T) < 30
    masked = linear_cross_entropy(x, w, tg, jnp.asarray(keep, jnp.float32), chunk=chunk)
    np.testing.assert_allclose(masked, linear_cross_entropy(x[:30], w, tg[:30], backend="reference"),
                               rtol=2e-6)
