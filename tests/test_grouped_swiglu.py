"""ops.grouped_swiglu: fc1 with SwiGLU in the grouped GEMM's epilogue against the plain-JAX reference
(forward and both gradients) and its backend choice."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ops.grouped_matmul import is_hopper
from ops.grouped_swiglu import (grouped_swiglu, reference_grouped_swiglu, reference_swiglu_grouped_matmul,
                                resolve_backend, resolve_swiglu_gmm_backend, swiglu_grouped_matmul)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(seed, m, k, f, sizes, dtype=jnp.bfloat16):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kw, (len(sizes), k, 2 * f), jnp.float32) / np.sqrt(k)).astype(dtype)
    dh = jax.random.normal(kd, (m, f), jnp.float32).astype(dtype)
    return x, w1, jnp.asarray(sizes, jnp.int32), dh


def _vjp(f, x, w1, dh):
    h, vjp = jax.vjp(f, x, w1)
    return (h, *vjp(dh))


def check(backend, m, k, f, sizes, seed=0, tol=1.5e-2, **kw):
    x, w1, gs, dh = _inputs(seed, m, k, f, sizes)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = _vjp(lambda x, w: reference_grouped_swiglu(x, w, gs), f32(x), f32(w1), f32(dh))
    got = _vjp(lambda x, w: grouped_swiglu(x, w, gs, backend=backend, **kw), x, w1, dh)
    _assert_matches(backend, ("h", "dx", "dw1"), got, want, sizes, tol)


def _assert_matches(backend, names, got, want, sizes, tol):
    """(output, input gradient, weight gradient) of the op against the reference's; rows past
    sum(group_sizes) give zero output and zero input gradient; empty groups a zero weight gradient."""
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == jnp.bfloat16, (name, a.shape, a.dtype)
        err = _rel(a, b)
        assert err < tol, f"{backend} {name}: rel err {err:.2e} >= {tol:.0e}"
    total = int(np.sum(sizes))
    assert not np.any(np.asarray(got[0][total:], np.float32))
    assert not np.any(np.asarray(got[1][total:], np.float32))
    for gi, size in enumerate(sizes):
        if size == 0:
            assert not np.any(np.asarray(got[2][gi], np.float32))


@pytest.mark.slow  # 17 s in interpret mode for an opt-in kernel; its CUDA lowering test stays in the default suite
def test_fused_kernel_interpret_matches_reference():
    """The Mosaic-GPU kernel in interpret mode: uneven groups, an empty one, rows past the sum."""
    check("pallas", 200, 128, 128, [70, 0, 100, 20], interpret=True)


def test_unfused_matches_reference():
    check("unfused", 64, 32, 48, [10, 0, 30, 20], seed=3)


def test_backend_choice_and_errors():
    x = jnp.ones((64, 128), jnp.bfloat16)
    w1 = jnp.ones((2, 128, 256), jnp.bfloat16)
    assert resolve_backend("auto", x, w1) == "unfused"  # measured slower than the pair: opt-in only
    assert resolve_backend("pallas", x, w1, interpret=True) == "pallas"
    with pytest.raises(ValueError, match="float32"):
        grouped_swiglu(x.astype(jnp.float32), w1.astype(jnp.float32), jnp.array([32, 32]), backend="pallas",
                       interpret=True)
    with pytest.raises(ValueError, match="Hopper"):
        grouped_swiglu(x, w1, jnp.array([32, 32]), backend="pallas")
    with pytest.raises(ValueError, match="F = 80 is not a multiple"):
        grouped_swiglu(x, jnp.ones((2, 128, 160), jnp.bfloat16), jnp.array([32, 32]), backend="pallas",
                       interpret=True)
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_swiglu(x, w1, jnp.array([32, 32]), backend="triton")
    with pytest.raises(ValueError, match="gate and up"):
        grouped_swiglu(x, jnp.ones((2, 128, 255), jnp.bfloat16), jnp.array([32, 32]), backend="unfused")


def test_fused_kernel_lowers_for_cuda(monkeypatch):
    """The GPU config goes through the Pallas → Mosaic-GPU lowering for CUDA here (no GPU needed), at
    deepseek_small's F = 1408 (11 column tiles) with an empty group and rows past the sum."""
    from ops import gmm_pallas_swiglu as K
    monkeypatch.setattr(K, "num_sms", lambda interpret: 132)
    x = jnp.ones((1000, 2048), jnp.bfloat16)
    w1 = jnp.ones((4, 2048, 2 * 1408), jnp.bfloat16)
    gs = jnp.array([300, 0, 500, 100], jnp.int32)
    f = lambda x, w: K.gmm_swiglu_kernel(x, w, gs, out_dtype=jnp.bfloat16)  # noqa: E731
    assert "mosaic_gpu" in jax.jit(f).trace(x, w1).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,f,sizes", [
    (4096, 1024, 1024, [1000, 0, 1500, 1200, 300]),          # sum < M, an empty group
    (6000, 2048, 1408, [30 * (i % 7) for i in range(64)]),    # deepseek's F, 64 groups
])
def test_fused_kernel_gpu(m, k, f, sizes):
    check("pallas", m, k, f, sizes)


# ----------------------------------------------------------------------------- activation then fc2
def check_act_fc2(backend, m, f, n, sizes, seed=0, tol=1.5e-2, **kw):
    """swiglu_grouped_matmul against the reference: y, dgu, dw2 on fresh random inputs."""
    kg, kw2, kd = jax.random.split(jax.random.key(seed), 3)
    gu = (2 * jax.random.normal(kg, (m, 2 * f), jnp.float32)).astype(jnp.bfloat16)
    w2 = (jax.random.normal(kw2, (len(sizes), f, n), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = _vjp(lambda a, w: reference_swiglu_grouped_matmul(a, w, gs), f32(gu), f32(w2), f32(dy))
    got = _vjp(lambda a, w: swiglu_grouped_matmul(a, w, gs, backend=backend, **kw), gu, w2, dy)
    _assert_matches(backend, ("y", "dgu", "dw2"), got, want, sizes, tol)


@pytest.mark.parametrize("row_split", [pytest.param(1, marks=pytest.mark.slow), 2])  # 2: the default
def test_act_fc2_fused_dgrad_interpret_matches_reference(row_split, monkeypatch):
    """fc2's dgrad with SwiGLU's backward in the epilogue (interpret mode): uneven groups, an empty
    one, rows past the sum, two column tiles of F; the epilogue on whole chunks or row blocks (ROW_SPLIT), with
    the default's sigmoid form (FAST_SIGMOID)."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "ROW_SPLIT", row_split)
    check_act_fc2("pallas", 200, 128, 128, [70, 0, 100, 20], interpret=True)


# ~30 s in interpret mode; the default (FAST_SIGMOID) runs above, and the exact form lowers in the suite
@pytest.mark.slow
def test_act_fc2_fused_dgrad_exact_sigmoid_interpret_matches_reference(monkeypatch):
    """The epilogue with the exact sigmoid, 1 / (1 + e^-g) (FAST_SIGMOID off), against the reference."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "FAST_SIGMOID", False)
    check_act_fc2("pallas", 200, 128, 128, [70, 0, 100, 20], seed=9, interpret=True)


def test_fast_sigmoid_form_matches_sigmoid(monkeypatch):
    """The form itself in float32, past both ends (exp(-g) overflows for g < -88) and through 0."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "FAST_SIGMOID", True)
    g = jnp.concatenate([jnp.linspace(-120.0, 40.0, 4001), jnp.array([-jnp.inf, jnp.inf, 0.0])])
    got, want = np.asarray(K._sigmoid(g)), np.asarray(jax.nn.sigmoid(g))
    # 2^(g log2 e) carries the product's rounding, ~|g| 2^-24 relative: 4e-6 at g = -64, where s ~ 1e-28
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-37)
    near = np.abs(np.asarray(g)) <= 16
    np.testing.assert_allclose(got[near], want[near], rtol=2e-6)
    assert float(got[-3]) == 0.0 and float(got[-2]) == 1.0


@pytest.mark.slow  # ~15 s each in interpret mode; the forms are not used by default (both lower in the suite)
@pytest.mark.parametrize("split", ["n", "m"])
def test_act_fc2_fused_dgrad_split_interpret_matches_reference(split, monkeypatch):
    """The split forms (both WGs on one item): "n", each WG its own columns of F, over two items' worth of
    columns (a WG's column offset inside the item and the item's both count); "m", each WG its half of
    128-row segments, with groups that start and end inside either half (and one WG without rows)."""
    import dataclasses
    from ops import gmm_pallas_dswiglu as K
    tile_m = 64 if split == "n" else 128
    monkeypatch.setattr(K, "INTERPRET_DSWIGLU_BWD", dataclasses.replace(
        K.INTERPRET_DSWIGLU_BWD, pingpong=False, split=split, tile_m=tile_m))
    check_act_fc2("pallas", 200, 256 if split == "n" else 128, 128, [70, 0, 100, 20], seed=5, interpret=True)


def test_act_fc2_unfused_matches_reference():
    check_act_fc2("unfused", 64, 48, 32, [10, 0, 30, 20], seed=3)


# pallas in interpret mode: ~30 s on CPU (its kernel is checked by the fused-dgrad test above and on the GPU)
@pytest.mark.parametrize("backend", [pytest.param("pallas", marks=pytest.mark.slow), "unfused"])
def test_act_fc2_recompute_keeps_no_activation_and_matches(backend):
    """recompute=True: the same output and gradients as keeping the SwiGLU output, and no [M, F]
    array among the backward's residuals (it is made again from gu there)."""
    m, f, n, sizes = 200, 128, 192, [70, 0, 100, 20]  # F != N: h [M, F] is not mistaken for dy [M, N]
    kw = dict(interpret=True) if backend == "pallas" else {}
    kg, kw2, kd = jax.random.split(jax.random.key(7), 3)
    gu = (2 * jax.random.normal(kg, (m, 2 * f), jnp.float32)).astype(jnp.bfloat16)
    w2 = (jax.random.normal(kw2, (len(sizes), f, n), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    out, shapes = {}, {}
    for recompute in (False, True):
        y, vjp = jax.vjp(lambda a, w: swiglu_grouped_matmul(a, w, gs, backend=backend, recompute=recompute,
                                                            **kw), gu, w2)
        out[recompute] = (y, *vjp(dy))
        shapes[recompute] = [r.shape for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]
    assert (m, f) in shapes[False] and (m, f) not in shapes[True], shapes
    for a, b in zip(out[True], out[False]):
        assert float(jnp.abs(b.astype(jnp.float32)).max()) > 0
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    if backend == "pallas":  # compiled, the backward's SwiGLU stays its own pass (not merged by CSE)
        exps = {}
        for recompute in (False, True):
            loss = lambda a, w: jnp.sum(swiglu_grouped_matmul(  # noqa: E731
                a, w, gs, backend=backend, recompute=recompute, **kw).astype(jnp.float32) ** 2)
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(gu, w2).compile().as_text()
            exps[recompute] = hlo.count(" exponential(")
        assert exps[True] == exps[False] + 1, exps


def test_act_fc2_backend_choice_and_errors():
    gu = jnp.ones((64, 256), jnp.bfloat16)
    w2 = jnp.ones((2, 128, 128), jnp.bfloat16)
    assert resolve_swiglu_gmm_backend("pallas", gu, w2, interpret=True) == "pallas"
    if not is_hopper():
        assert resolve_swiglu_gmm_backend("auto", gu, w2) == "unfused"
        with pytest.raises(ValueError, match="Hopper"):
            resolve_swiglu_gmm_backend("pallas", gu, w2)
    with pytest.raises(ValueError, match="multiple of"):
        resolve_swiglu_gmm_backend("pallas", jnp.ones((64, 2 * 100), jnp.bfloat16),
                                   jnp.ones((2, 100, 128), jnp.bfloat16), interpret=True)
    assert resolve_swiglu_gmm_backend("auto", gu.astype(jnp.float32), w2.astype(jnp.float32),
                                      interpret=True) == "unfused"
    with pytest.raises(ValueError, match="unknown backend"):
        swiglu_grouped_matmul(gu, w2, jnp.array([32, 32]), backend="triton")
    with pytest.raises(ValueError, match=r"w2 must be \[G, F, N\]"):
        swiglu_grouped_matmul(gu, jnp.ones((2, 64, 128), jnp.bfloat16), jnp.array([32, 32]))


@pytest.mark.parametrize("split", ["n", "m"])
def test_fused_dgrad_split_lowers_for_cuda(split, monkeypatch):
    """The split GPU configs lower for CUDA: split n at mixtral_small's F = 4096 (it refuses F = 1408, not
    a multiple of its 256-column items, with the reason), split m at deepseek_small's 1408."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "num_sms", lambda interpret: 132)
    cfg, f_ = (K.DSWIGLU_BWD_SPLIT_N, 4096) if split == "n" else (K.DSWIGLU_BWD_SPLIT_M, 1408)
    dy, gs = jnp.ones((1000, 2048), jnp.bfloat16), jnp.array([300, 0, 500, 100], jnp.int32)
    w2, gu = jnp.ones((4, f_, 2048), jnp.bfloat16), jnp.ones((1000, 2 * f_), jnp.bfloat16)
    f = lambda dy, w, gu: K.gmm_dswiglu_kernel(dy, w, gu, gs, cfg=cfg)  # noqa: E731
    assert "mosaic_gpu" in jax.jit(f).trace(dy, w2, gu).lower(lowering_platforms=("cuda",)).as_text()
    if split == "n":
        assert "256-column" in K.check_shapes(1000, 2048, 1408, cfg)


@pytest.mark.parametrize("row_split,fast_sigmoid", [(1, False), (2, False), (2, True)])
def test_fused_dgrad_kernel_lowers_for_cuda(row_split, fast_sigmoid, monkeypatch):
    """The fused dgrad's GPU config (transposed w2 operand, 128 x 128 tiles) lowers for CUDA here, at
    deepseek_small's F = 1408 with an empty group and rows past the sum (both ROW_SPLIT forms, and the
    approximate sigmoid's MUFU forms)."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "num_sms", lambda interpret: 132)
    monkeypatch.setattr(K, "ROW_SPLIT", row_split)
    monkeypatch.setattr(K, "FAST_SIGMOID", fast_sigmoid)
    dy = jnp.ones((1000, 2048), jnp.bfloat16)
    w2 = jnp.ones((4, 1408, 2048), jnp.bfloat16)
    gu = jnp.ones((1000, 2 * 1408), jnp.bfloat16)
    gs = jnp.array([300, 0, 500, 100], jnp.int32)
    f = lambda dy, w, gu: K.gmm_dswiglu_kernel(dy, w, gu, gs)  # noqa: E731
    text = jax.jit(f).trace(dy, w2, gu).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert ("rsqrt.approx.f32" in text and "ex2.approx" in text) == fast_sigmoid


@pytest.mark.gpu
@pytest.mark.parametrize("m,f,n,sizes", [
    (4096, 1024, 1024, [1000, 0, 1500, 1200, 300]),          # sum < M, an empty group
    (6000, 1408, 2048, [30 * (i % 7) for i in range(64)]),    # deepseek's F, 64 groups
])
@pytest.mark.parametrize("row_split", [1, 2])
def test_fused_dgrad_gpu(m, f, n, sizes, row_split, monkeypatch):
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "ROW_SPLIT", row_split)
    check_act_fc2("pallas", m, f, n, sizes)


@pytest.mark.gpu
def test_fused_dgrad_exact_sigmoid_gpu(monkeypatch):
    """The exact sigmoid on the GPU (FAST_SIGMOID off: IEEE exp and division) against the reference, at
    deepseek's F; the default's approximate form runs in test_fused_dgrad_gpu."""
    from ops import gmm_pallas_dswiglu as K
    monkeypatch.setattr(K, "FAST_SIGMOID", False)
    check_act_fc2("pallas", 6000, 1408, 2048, [30 * (i % 7) for i in range(64)])


@pytest.mark.gpu
@pytest.mark.parametrize("split,m,f,n,sizes", [
    ("n", 4096, 1024, 1024, [1000, 0, 1500, 1200, 300]),         # few groups, an empty one, sum < M
    ("m", 6000, 1408, 2048, [30 * (i % 7) for i in range(64)]),   # deepseek's F, 64 small groups
])
def test_fused_dgrad_split_gpu(split, m, f, n, sizes, monkeypatch):
    """The split forms on the GPU against the reference."""
    from ops import gmm_pallas_dswiglu as K
    cfg = K.DSWIGLU_BWD_SPLIT_N if split == "n" else K.DSWIGLU_BWD_SPLIT_M
    monkeypatch.setattr(K, "config_for", lambda num_groups: cfg)
    check_act_fc2("pallas", m, f, n, sizes)
