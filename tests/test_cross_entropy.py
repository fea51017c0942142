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


# ----------------------------------------------------------------------------- the softmax pass's kernel
from ops import softmax_ce  # noqa: E402
from ops.softmax_ce import Launch, reference_softmax_cross_entropy_rows, softmax_cross_entropy_rows  # noqa: E402
from ops.pallas_triton import one_gpu  # noqa: E402


@pytest.mark.parametrize("launch,c,v", [
    (Launch(block=64, programs=8, warps=4), 48, 200),     # 4 column blocks, the last one masked; 6 rows a program
    (Launch(block=4096, programs=264, warps=4), 12, 96),  # one block wider than the row; a program a row
])
def test_softmax_ce_rows_kernel_matches_reference(monkeypatch, launch, c, v):
    monkeypatch.setattr(softmax_ce, "LAUNCH", launch)
    ks = jax.random.split(jax.random.key(11), 3)
    logits = 4.0 * jax.random.normal(ks[0], (c, v))
    tg = jax.random.randint(ks[1], (c,), 0, v)
    wt = jax.random.uniform(ks[2], (c,)) * (jnp.arange(c) % 5 != 0)  # zeros and random weights
    loss, d = softmax_cross_entropy_rows(logits, tg, wt, jnp.bfloat16, backend="pallas", interpret=True)
    loss_r, d_r = reference_softmax_cross_entropy_rows(logits, tg, wt, jnp.bfloat16)
    assert loss.dtype == jnp.float32 and d.dtype == jnp.bfloat16 and d.shape == (c, v)
    np.testing.assert_allclose(loss, loss_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(d_r, np.float32), atol=4e-3)
    assert np.abs(np.asarray(d_r, np.float32)).max() > 0.1  # the gradient is not trivially small


def test_linear_cross_entropy_through_the_kernel(monkeypatch):
    """The chunked loss with its softmax pass in the kernel (interpret mode) against plain autodiff."""
    monkeypatch.setattr(softmax_ce, "LAUNCH", Launch(block=32, programs=4, warps=4))
    T, D, V = 64, 16, 72
    ks = jax.random.split(jax.random.key(12), 4)
    x = jax.random.normal(ks[0], (T, D))
    w = 0.3 * jax.random.normal(ks[1], (D, V))
    tg = jax.random.randint(ks[2], (T,), 0, V)
    wt = jax.random.uniform(ks[3], (T,)) * (jnp.arange(T) % 3 != 0)

    def f(x, w, backend, kernels):
        return 3.0 * linear_cross_entropy(x, w, tg, wt, backend=backend, chunk=16, kernels=kernels)

    l1, g1 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "chunked", "interpret")
    l2, g2 = jax.value_and_grad(f, argnums=(0, 1))(x, w, "reference", "reference")
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_softmax_ce_rows_errors():
    with pytest.raises(ValueError, match="logits"):
        softmax_cross_entropy_rows(jnp.zeros((4, 5)), jnp.zeros((3,), jnp.int32), jnp.ones((3,)), jnp.float32)
    with pytest.raises(ValueError, match="backend"):
        softmax_cross_entropy_rows(jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32), jnp.ones((4,)), jnp.float32,
                                   backend="triton")


@pytest.mark.gpu
def test_softmax_ce_rows_kernel_on_gpu():
    """The kernel at the benchmark models' chunk (2048 rows of V = 32000) against the formula."""
    if not one_gpu():
        pytest.skip("needs one NVIDIA GPU")
    ks = jax.random.split(jax.random.key(13), 3)
    c, v = 2048, 32000
    logits = 6.0 * jax.random.normal(ks[0], (c, v))
    tg = jax.random.randint(ks[1], (c,), 0, v)
    wt = jax.random.uniform(ks[2], (c,)) + 0.5
    loss, d = jax.jit(lambda *a: softmax_cross_entropy_rows(*a, jnp.bfloat16, backend="pallas"))(logits, tg, wt)
    loss_r, d_r = jax.jit(lambda *a: reference_softmax_cross_entropy_rows(*a, jnp.bfloat16))(logits, tg, wt)
    np.testing.assert_allclose(loss, loss_r, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(d_r, np.float32), atol=4e-3)


def test_head_loss_through_the_kernel_matches_plain():
    """The training loss (`moe_jax.train.head_loss`) with `fused_kernels="interpret"` takes the softmax
    kernel: same loss and gradients (hidden states and the LM head) as with plain JAX."""
    from flax import nnx
    from moe_jax.config import ModelConfig
    from moe_jax.model import GPT
    from moe_jax.train import head_loss

    cfg = ModelConfig(vocab_size=80, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                      max_seq_len=16, dtype="float32")
    ks = jax.random.split(jax.random.key(15), 2)
    h = jax.random.normal(ks[0], (2, 16, 32))
    tg = jax.random.randint(ks[1], (2, 16), 0, 80)
    out = []
    for kernels in ("interpret", "reference"):
        kcfg = ModelConfig(**{**cfg.__dict__, "fused_kernels": kernels})
        graphdef, params, rest = nnx.split(GPT(kcfg, rngs=nnx.Rngs(3)), nnx.Param, ...)

        def f(p, h):
            model = nnx.merge(graphdef, p, rest)
            return head_loss(model, h, tg, {"losses": {}}, rng=None, layout=None)[0]

        out.append(jax.value_and_grad(f, argnums=(0, 1))(params, h))
    (l1, (gp1, gh1)), (l2, (gp2, gh2)) = out
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(gh1, gh2, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gh1).max()) > 0
