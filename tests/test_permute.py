"""ops.permute: the gather-only custom VJPs (XLA gathers, and the Pallas kernels of ops.permute_kernel in
interpret mode) against plain autodiff of the same formulas and a numpy loop, forward and gradients
(inputs and gates), on fresh random data with dropped assignments and capacity padding; the kernels'
CUDA lowering (on CPU) and, with -m gpu, the kernels on the GPU at the benchmark shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import permute as P

T, K, D, E = 24, 3, 16, 5
# (backend, interpret); auto in interpret mode = the GPU default's mix (the kernel on permute's forward,
# XLA's gathers on the other passes)
BACKENDS = [("xla", False), ("pallas", True), ("auto", True)]


def _maps(key, capacity=None, drop=0.25):
    """A random routing's (dest [T,k], src [R]) maps: distinct experts per token, some dropped,
    rows sorted by expert (capacity: E·capacity rows, experts padded)."""
    k1, k2 = jax.random.split(key)
    experts = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(
        jax.random.split(k1, T)))
    kept = np.asarray(jax.random.uniform(k2, (T, K)) > drop)
    flat = [(e, a) for a, (e, kp) in enumerate(zip(experts.reshape(-1), kept.reshape(-1))) if kp]
    rows = E * capacity if capacity else T * K
    dest = np.full(T * K, rows, np.int32)
    if capacity is None:
        for r, (_, a) in enumerate(sorted(flat)):
            dest[a] = r
        dropped = [a for a in range(T * K) if not kept.reshape(-1)[a]]
        for r, a in enumerate(dropped, start=len(flat)):  # dropped ones sort last (zero rows)
            dest[a] = r
    else:
        fill = np.zeros(E, np.int32)
        for e, a in sorted(flat):
            if fill[e] < capacity:
                dest[a] = e * capacity + fill[e]
                fill[e] += 1
    src = np.full(rows, T * K, np.int32)
    for a, r in enumerate(dest):
        if r < rows:
            src[r] = a
    return jnp.asarray(dest.reshape(T, K)), jnp.asarray(src), kept


def _numpy(x, y, dest, src, w):
    x, y, dest, src, w = map(np.asarray, (x, y, dest, src, w))
    rows = np.zeros((len(src), x.shape[1]))
    for r, a in enumerate(src):
        if a < T * K:
            rows[r] = x[a // K] * w.reshape(-1)[a]
    out = np.zeros((T, y.shape[1]))
    for t in range(T):
        for j in range(K):
            if dest[t, j] < len(y):
                out[t] += w[t, j] * y[dest[t, j]]
    return rows, out


@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_permute_and_unpermute_match_reference(capacity, dtype):
    key = jax.random.key(7 if capacity else 3)
    dest, src, kept = _maps(key, capacity)
    ks = jax.random.split(jax.random.fold_in(key, 1), 4)
    R = src.shape[0]
    x = jax.random.normal(ks[0], (T, D)).astype(dtype)
    y = jax.random.normal(ks[1], (R, D)).astype(dtype)
    w = jnp.where(kept, jax.random.uniform(ks[2], (T, K)), 0.0)
    rows_np, out_np = _numpy(x.astype(jnp.float32), y.astype(jnp.float32), dest, src, w)
    tol = 1e-6 if dtype == "float32" else 1e-2
    for backend, interp in [*BACKENDS, ("reference", False)]:
        rows = P.permute(x, dest, src, w, backend=backend, interpret=interp)
        out = P.unpermute(y, dest, src, w, backend=backend, interpret=interp)
        assert rows.dtype == out.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(rows, np.float32), rows_np, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(out, np.float32), out_np, rtol=tol, atol=tol)

    ct_rows = jax.random.normal(ks[3], (R, D)).astype(dtype)
    ct_out = jax.random.normal(jax.random.fold_in(ks[3], 1), (T, D)).astype(dtype)

    def loss(x, y, w, backend, interp=False):
        a = P.permute(x, dest, src, w, backend=backend, interpret=interp).astype(jnp.float32)
        b = P.unpermute(y, dest, src, w, backend=backend, interpret=interp).astype(jnp.float32)
        return jnp.sum(a * ct_rows.astype(jnp.float32)) + jnp.sum(b * ct_out.astype(jnp.float32))

    want = jax.grad(loss, argnums=(0, 1, 2))(x, y, w, "reference")
    for backend, interp in BACKENDS:
        got = jax.grad(loss, argnums=(0, 1, 2))(x, y, w, backend, interp)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype
            assert float(jnp.abs(r.astype(jnp.float32)).max()) > 0.1  # a gradient that cannot be all zero
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                       rtol=tol, atol=tol)
        # unweighted permute (gates applied after the experts)
        g1 = jax.grad(lambda x: jnp.sum(P.permute(x, dest, src, backend=backend, interpret=interp).astype(
            jnp.float32) * ct_rows.astype(jnp.float32)))(x)
        g2 = jax.grad(lambda x: jnp.sum(P.permute(x, dest, src, backend="reference").astype(
            jnp.float32) * ct_rows.astype(jnp.float32)))(x)
        np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g2, np.float32), rtol=tol,
                                   atol=tol)


def test_backward_has_no_scatter_add():
    dest, src, kept = _maps(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (T, D))
    w = jnp.where(kept, 0.5, 0.0)

    def loss(x, w, backend):
        rows = P.permute(x, dest, src, backend=backend)
        return jnp.sum(P.unpermute(rows * 2.0, dest, src, w, backend=backend) ** 2)

    def jaxpr(backend):
        return str(jax.make_jaxpr(jax.grad(lambda x, w: loss(x, w, backend), argnums=(0, 1)))(x, w))
    fast, plain = jaxpr("xla"), jaxpr("reference")
    assert "scatter-add" not in fast and "scatter_add" not in fast
    kernels = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(P.unpermute(
        P.permute(x, dest, src, backend="pallas", interpret=True) * 2.0, dest, src, w, backend="pallas",
        interpret=True) ** 2), argnums=(0, 1)))(x, w))
    assert "scatter" not in kernels and kernels.count("pallas_call") == 5  # 2 forward, 3 backward passes
    assert "scatter-add" in plain or "scatter_add" in plain  # what the custom VJPs replace


def test_inverse_and_bad_input():
    idx = jnp.array([3, 0, 9, 1], jnp.int32)  # 9 is out of range: ignored
    np.testing.assert_array_equal(P.inverse(idx, 5), [1, 3, 4, 0, 4])
    with pytest.raises(ValueError, match="backend"):
        P.permute(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2,), jnp.int32),
                  backend="cuda")
    with pytest.raises(ValueError, match="weights"):
        P.unpermute(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2,), jnp.int32),
                    jnp.zeros((2, 2)))


@pytest.mark.parametrize("n,num_keys,block", [(1, 1, 128), (300, 9, 128), (1000, 65, 128), (4096, 3, 64),
                                               (777, 200, 32)])
def test_stable_rank_matches_a_stable_argsort(n, num_keys, block):
    """The counting sort's ranks are the stable argsort's inverse, on fresh random keys (skewed, so
    some keys repeat within a block and some never appear), jitted."""
    keys = jax.random.randint(jax.random.key(n + num_keys), (n,), 0, num_keys) // 2 * 2 % num_keys
    want = P.inverse(jnp.argsort(keys, stable=True).astype(jnp.int32), n)
    got = jax.jit(P.stable_rank, static_argnums=1, static_argnames="block")(keys, num_keys, block=block)
    np.testing.assert_array_equal(got, want)


def test_backend_choice():
    dest, src, _ = _maps(jax.random.key(2))
    x = jnp.ones((T, D))
    w = jnp.full((T, K), 0.5)

    def passes(backend, interpret, width=D):
        """Kernel calls in (permute fwd, permute bwd, unpermute fwd, unpermute bwd)."""
        xs, ys = jnp.ones((T, width)), jnp.ones((src.shape[0], width))
        f = [lambda x: P.permute(x, dest, src, backend=backend, interpret=interpret),
             lambda y: P.unpermute(y, dest, src, w, backend=backend, interpret=interpret)]
        out = []
        for fn, a in zip(f, (xs, ys)):
            fwd = str(jax.make_jaxpr(fn)(a))
            both = str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(fn(a))))(a))
            out += [fwd.count("pallas_call"), both.count("pallas_call") - fwd.count("pallas_call")]
        return tuple(out)

    # auto off a GPU is XLA's gathers; on one (and in interpret mode) the kernel takes permute's forward,
    # XLA the other passes; "pallas" takes all four (unpermute's backward: rows, then the gate dots)
    from ops.pallas_triton import one_gpu
    assert passes("auto", False) == ((1, 0, 0, 0) if one_gpu() else (0, 0, 0, 0))
    assert passes("auto", True) == (1, 0, 0, 0)
    assert passes("pallas", True) == (1, 1, 1, 2)
    assert passes("auto", True, width=24) == (0, 0, 0, 0)  # a width the kernels cannot take: XLA
    with pytest.raises(ValueError, match="power of two"):
        P.permute(jnp.ones((T, 24)), dest, src, backend="pallas", interpret=True)
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(ValueError, match="NVIDIA GPU"):
            P.permute(x, dest, src, backend="pallas")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gated", [False, True])
def test_scatter_forward_matches_reference(monkeypatch, dtype, gated):
    """FORWARD_KERNEL="scatter" (`permute_kernel.scatter_rows`, token-major) on a covered buffer (no
    capacity: every row holds an assignment, the dropped ones included): the reference's rows and
    gradients (x and the gates), and the kernel is the one traced."""
    monkeypatch.setattr(P, "FORWARD_KERNEL", "scatter")
    dest, src, kept = _maps(jax.random.key(13))
    ks = jax.random.split(jax.random.key(14), 3)
    x = jax.random.normal(ks[0], (T, D)).astype(dtype)
    w = jnp.where(kept, jax.random.uniform(ks[1], (T, K), minval=0.2), 0.0) if gated else None
    ct = jax.random.normal(ks[2], (src.shape[0], D)).astype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-2

    def loss(x, w, backend, interp=False, covered=False):
        rows = P.permute(x, dest, src, w, backend=backend, interpret=interp, covered=covered)
        return jnp.sum(rows.astype(jnp.float32) * ct.astype(jnp.float32))

    want_rows = P.permute(x, dest, src, w, backend="reference")
    argnums = (0, 1) if gated else (0,)
    want = jax.grad(loss, argnums=argnums)(x, w, "reference")
    for backend in ("pallas", "auto"):
        assert "permute_scatter_rows" in str(jax.make_jaxpr(
            lambda x: P.permute(x, dest, src, w, backend=backend, interpret=True, covered=True))(x))
        rows = P.permute(x, dest, src, w, backend=backend, interpret=True, covered=True)
        assert rows.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(rows, np.float32), np.asarray(want_rows, np.float32),
                                   rtol=tol, atol=tol)
        got = jax.grad(loss, argnums=argnums)(x, w, backend, True, True)
        for g, r in zip(got, want):
            assert float(jnp.abs(r.astype(jnp.float32)).max()) > 0.1
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)
    # not covered (the default): the gather, whatever FORWARD_KERNEL says
    assert "permute_scatter_rows" not in str(jax.make_jaxpr(
        lambda x: P.permute(x, dest, src, w, backend="pallas", interpret=True))(x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scatter_unpermute_backward_matches_reference(monkeypatch, dtype):
    """UNPERMUTE_BACKWARD="scatter" (`permute_kernel.scatter_dots`: dy's rows token-major with the gate dots)
    on a covered buffer: the reference's gradients for y and the gates; the kernel is the one traced, and
    only where the buffer is covered and permute's kernel could run."""
    monkeypatch.setattr(P, "UNPERMUTE_BACKWARD", "scatter")
    dest, src, kept = _maps(jax.random.key(15))
    ks = jax.random.split(jax.random.key(16), 3)
    y = jax.random.normal(ks[0], (src.shape[0], D)).astype(dtype)
    w = jnp.where(kept, jax.random.uniform(ks[1], (T, K), minval=0.2), 0.0)
    ct = jax.random.normal(ks[2], (T, D)).astype(dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2

    def loss(y, w, backend, interp=False, covered=False):
        out = P.unpermute(y, dest, src, w, backend=backend, interpret=interp, covered=covered)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

    want = jax.grad(loss, argnums=(0, 1))(y, w, "reference")
    for backend in ("pallas", "auto"):
        grad = jax.grad(loss, argnums=(0, 1))
        assert "permute_scatter_dots" in str(jax.make_jaxpr(grad, static_argnums=(2, 3, 4))(y, w, backend, True, True))
        got = grad(y, w, backend, True, True)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype and float(jnp.abs(r.astype(jnp.float32)).max()) > 0.1
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)
    for backend, interp, covered in (("pallas", True, False), ("xla", False, True)):
        assert "permute_scatter_dots" not in str(jax.make_jaxpr(
            jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3, 4))(y, w, backend, interp, covered))


def test_dispatch_marks_only_uncapped_buffers_covered(monkeypatch):
    """moe_jax.dispatch.sort_rows lets the permutation write token-major only without a capacity (a capped
    buffer has padding rows no assignment writes); both give the reference's rows."""
    from moe_jax import dispatch
    from moe_jax.routing import Assignment
    monkeypatch.setattr(P, "FORWARD_KERNEL", "scatter")
    k1, k2, k3 = jax.random.split(jax.random.key(21), 3)
    experts = jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(jax.random.split(k1, T))
    kept = jax.random.uniform(k2, (T, K)) > 0.2
    a = Assignment.of(jnp.where(kept, 0.5, 0.0), experts, kept, E)
    x = jax.random.normal(k3, (T, D), jnp.float32)
    for capacity, scatter in ((None, True), (3, False)):
        fn = lambda x: dispatch.sort_rows(x, a, capacity=capacity, kernels="interpret")[0]  # noqa: E731
        assert ("permute_scatter_rows" in str(jax.make_jaxpr(fn)(x))) == scatter
        want = dispatch.sort_rows(x, a, capacity=capacity, kernels="reference")[0]
        np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_kernels_lower_for_cuda(monkeypatch):
    dest, src, kept = _maps(jax.random.key(4))
    x = jax.random.normal(jax.random.key(5), (T, D), jnp.bfloat16)
    w = jnp.where(kept, 0.5, 0.0)

    def f(x, w):
        rows = P.permute(x, dest, src, backend="pallas", interpret=False)
        return P.unpermute(rows, dest, src, w, backend="pallas")

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))(x, w)

    import ops.pallas_triton as pt
    monkeypatch.setattr(pt, "on_nvidia_gpu", lambda: True)  # lower as for a GPU (Triton IR is built at lowering)
    text = jax.jit(grads).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 5, text.count("__gpu$xla.gpu.triton")
    # the token-major forward lowers too (a store per slot through an index map)
    monkeypatch.setattr(P, "FORWARD_KERNEL", "scatter")
    text = jax.jit(lambda x: P.permute(x, dest, src, backend="pallas", covered=True)).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "permute_scatter_rows" in text
    monkeypatch.setattr(P, "UNPERMUTE_BACKWARD", "scatter")
    w = jnp.where(kept, 0.5, 0.0)
    text = jax.jit(jax.grad(lambda y, w: jnp.sum(P.unpermute(y, dest, src, w, backend="pallas", covered=True)
                                                 .astype(jnp.float32)), argnums=(0, 1))).trace(
        jnp.ones((src.shape[0], D), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
    assert "permute_scatter_dots" in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t,k,e,d", [(16384, 2, 8, 2048), (16384, 6, 64, 2048)])
def test_kernels_on_gpu_match_xla(t, k, e, d, dtype):
    """The kernels against the XLA gathers at the benchmark shapes: float32 to summation order; bf16 to
    its rounding of each sum (the loss adds 33M rounded terms, so it is compared in float32 only)."""
    if not jax.devices()[0].platform == "gpu":
        pytest.skip("needs an NVIDIA GPU")
    key = jax.random.key(9)
    experts = jax.random.randint(key, (t * k,), 0, e)
    order = jnp.argsort(experts, stable=True)
    dest = jnp.zeros((t * k,), jnp.int32).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    dest = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), (t * k,)) < 0.02, t * k, dest)
    src = P.inverse(dest, t * k)
    dest = dest.reshape(t, k)
    x = jax.random.normal(jax.random.fold_in(key, 2), (t, d), dtype)
    w = jax.random.uniform(jax.random.fold_in(key, 3), (t, k))
    ct = jax.random.normal(jax.random.fold_in(key, 4), (t, d), jnp.float32)

    def run(backend):
        def loss(x, w):
            rows = P.permute(x, dest, src, backend=backend)
            return jnp.sum(P.unpermute(rows * 1.5, dest, src, w, backend=backend).astype(jnp.float32) * ct)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

    l2, (gx2, gw2) = run("xla")
    f32 = dtype == "float32"
    tol = 1e-5 if f32 else 2e-2
    for backend in ("pallas", "auto"):  # every pass a kernel; the default's mix
        l1, (gx1, gw1) = run(backend)
        if f32:
            np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gx1, np.float32), np.asarray(gx2, np.float32), rtol=tol, atol=tol)
        # the gate gradients are dots over D = 2048 terms of size ~3 (|dot| ~ 130): float32 summation order
        # moves them by ~sqrt(D)·130·6e-8 ≈ 4e-4 (2.3e-5 seen on the H200, 2026-12-03)
        np.testing.assert_allclose(np.asarray(gw1), np.asarray(gw2), rtol=1e-4 if f32 else 1e-2,
                                   atol=1e-3 if f32 else tol)


def test_run_log_line_says_when_the_permutation_kernels_run(monkeypatch):
    from moe_jax import kernels
    from moe_jax.kernels import kernels_note
    from moe_jax.presets import load_config
    from ops.pallas_triton import one_gpu
    assert "every pass of the MoE permutation" in kernels_note(
        load_config("tiny_moe", ["model.fused_kernels=interpret"]).model)
    auto = kernels_note(load_config("tiny_moe", []).model)
    assert ("the MoE permutation's forward" in auto) == one_gpu()  # else XLA's gathers
    assert ("unpermute's backward" in auto) == one_gpu()  # no capacity: the token-major backward too
    monkeypatch.setattr(kernels, "one_gpu", lambda: True)  # the note as one GPU gets it
    assert "forward and unpermute's backward" in kernels_note(load_config("tiny_moe", []).model)
    capped = kernels_note(load_config("tiny_moe", ["moe.expert_capacity_factor=1.25"]).model)
    assert "the MoE permutation's forward" in capped and "unpermute's backward" not in capped
    assert "permutation" not in kernels_note(load_config("tiny_moe", ["model.fused_kernels=reference"]).model)


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,d", [(16384, 2, 8, 2048), (16384, 6, 64, 2048)])
def test_scatter_kernel_on_gpu_matches_gather(t, k, e, d):
    """`permute_kernel.scatter_rows` (token-major) against `gather_rows` at the benchmark shapes, bf16, on a
    covered buffer (every row one assignment): the same rows bit for bit, with and without gates."""
    if not jax.devices()[0].platform == "gpu":
        pytest.skip("needs an NVIDIA GPU")
    from ops import permute_kernel as PK
    key = jax.random.key(19)
    experts = jax.random.randint(key, (t * k,), 0, e)
    dest = P.stable_rank(experts, e)  # assignment -> row, every row covered
    src = P.inverse(dest, t * k)
    x = jax.random.normal(jax.random.fold_in(key, 1), (t, d), jnp.bfloat16)
    w = jax.random.uniform(jax.random.fold_in(key, 2), (t, k))
    for gate in (None, w):
        got = jax.jit(lambda x: PK.scatter_rows(x, dest.reshape(t, k), t * k, gate))(x)
        want = jax.jit(lambda x: PK.gather_rows(x, src // k, None if gate is None else gate.reshape(-1)[src]))(x)
        assert bool(jnp.array_equal(got, want))


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,d", [(16384, 2, 8, 2048), (16384, 6, 64, 2048)])
def test_scatter_dots_on_gpu_matches_xla(t, k, e, d):
    """`permute_kernel.scatter_dots` against the XLA backward (dy's rows gathered row-major, the gate dots) at
    the benchmark shapes, bf16, on a covered buffer: dy bit for bit, the dots to float32 summation order."""
    if not jax.devices()[0].platform == "gpu":
        pytest.skip("needs an NVIDIA GPU")
    from ops import permute_kernel as PK
    key = jax.random.key(23)
    dest = P.stable_rank(jax.random.randint(key, (t * k,), 0, e), e)
    src = P.inverse(dest, t * k)
    dest = dest.reshape(t, k)
    y = jax.random.normal(jax.random.fold_in(key, 1), (t * k, d), jnp.bfloat16)
    dout = jax.random.normal(jax.random.fold_in(key, 2), (t, d), jnp.bfloat16)
    w = jax.random.uniform(jax.random.fold_in(key, 3), (t, k))
    dy, dw = jax.jit(PK.scatter_dots)(y, dest, w, dout)
    want_dy = jax.jit(lambda dout: PK.gather_rows(dout, src // k, w.reshape(-1)[src]))(dout)
    want_dw = jnp.einsum("tkd,td->tk", y[dest].astype(jnp.float32), dout.astype(jnp.float32))
    assert bool(jnp.array_equal(dy, want_dy))
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want_dw), rtol=1e-4, atol=2e-3)
