"""ops.all_to_all.ragged_all_to_all: the plan semantics (emulation, CPU, 8 fake devices) against a
numpy model, and the Pallas peer-memory kernel against the emulation and XLA on >= 2 GPUs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ops import all_to_all


def _plan(counts):
    """counts[s, d]: rows device s sends to d, packed (the EP dispatcher's layout)."""
    in_off = np.cumsum(counts, 1) - counts                  # [s, d] where s's rows for d start
    out_off = np.cumsum(counts, 0) - counts                 # [s, d] where they land on d
    return in_off, counts, out_off, counts.T.copy()


def _expected(xs, counts, out_rows):
    n = counts.shape[0]
    in_off, _, out_off, _ = _plan(counts)
    out = np.zeros((n, out_rows) + xs.shape[2:], xs.dtype)
    for s in range(n):
        for d in range(n):
            c = counts[s, d]
            out[d, out_off[s, d]:out_off[s, d] + c] = xs[s, in_off[s, d]:in_off[s, d] + c]
    return out


def _run(xs, counts, out_rows, backend, n):
    mesh = jax.make_mesh((n,), ("expert",), devices=jax.devices()[:n])
    plan = [jnp.asarray(a, jnp.int32) for a in _plan(counts)]

    def f(x, in_off, send, out_off, recv):
        return all_to_all.ragged_all_to_all(x[0], out_rows, in_off[0], send[0], out_off[0], recv[0],
                                            axis_name="expert", backend=backend, packed=True)[None]
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    sh = NamedSharding(mesh, P("expert"))
    return np.asarray(g(*(jax.device_put(a, sh) for a in [jnp.asarray(xs)] + plan)))


def _case(n, rows_in, out_rows, d, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    counts = np.zeros((n, n), np.int64)
    for s in range(n):  # random split of at most rows_in rows, some pairs empty
        cut = np.sort(rng.integers(0, rows_in + 1, size=n))
        counts[s] = np.diff(np.concatenate([[0], cut]))
        counts[s, rng.integers(0, n)] = 0
    while counts.sum(0).max() > out_rows:
        counts //= 2
    xs = rng.standard_normal((n, rows_in, d)).astype(dtype)
    return xs, counts


@pytest.mark.devices(8)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_emulation_matches_numpy_plan(n):
    xs, counts = _case(n, rows_in=40, out_rows=64, d=16, seed=n)
    got = _run(xs, counts, 64, "emulate", n)
    np.testing.assert_array_equal(got, _expected(xs, counts, 64))


def _segment_case(n, S, d, seed, max_rows=8):
    """A random segment plan: device s sends segment j (random size, random destination) from
    in_off[s, j]; each destination packs what it receives in (segment, source) order, the order the
    EP dispatcher uses for (local expert, source)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_rows + 1, size=(n, S))
    sizes[rng.random((n, S)) < 0.2] = 0
    dst = rng.integers(0, n, size=(n, S))
    in_off = np.cumsum(sizes, 1) - sizes
    out_off = np.zeros((n, S), np.int64)
    recv = np.zeros(n, np.int64)
    for j in range(S):
        for s in range(n):
            out_off[s, j] = recv[dst[s, j]]
            recv[dst[s, j]] += sizes[s, j]
    out_rows = int(recv.max()) + 5
    xs = rng.standard_normal((n, int(sizes.sum(1).max()) + 3, d)).astype(np.float32)
    want = np.zeros((n, out_rows, d), np.float32)
    for s in range(n):
        for j in range(S):
            want[dst[s, j], out_off[s, j]:out_off[s, j] + sizes[s, j]] = \
                xs[s, in_off[s, j]:in_off[s, j] + sizes[s, j]]
    return xs, (in_off, sizes, dst, out_off, recv[:, None]), out_rows, want


def _run_segments(xs, plan, out_rows, n, backend):
    mesh = jax.make_mesh((n,), ("expert",), devices=jax.devices()[:n])

    def f(x, a, b, c, e, r):
        return all_to_all.ragged_all_to_all_segments(x[0], out_rows, a[0], b[0], c[0], e[0], r[0, 0],
                                                     axis_name="expert", backend=backend)[None]
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
    sh = NamedSharding(mesh, P("expert"))
    args = [jnp.asarray(xs)] + [jnp.asarray(a, jnp.int32) for a in plan]
    return np.asarray(g(*(jax.device_put(a, sh) for a in args)))


@pytest.mark.devices(8)
@pytest.mark.parametrize("n,S", [(2, 3), (4, 8), (8, 5)])
def test_segment_plan_emulation(n, S):
    xs, plan, out_rows, want = _segment_case(n, S, d=8, seed=n + S)
    np.testing.assert_array_equal(_run_segments(xs, plan, out_rows, n, "auto"), want)


def test_pallas_backend_rejects_cpu_and_unpacked():
    x = jnp.ones((8, 16), jnp.float32)
    z = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="packed=True"):
        all_to_all.ragged_all_to_all(x, 8, z, z, z, z, axis_name="expert", backend="pallas")
    with pytest.raises(ValueError, match="needs GPUs"):
        all_to_all.ragged_all_to_all(x, 8, z, z, z, z, axis_name="expert", backend="pallas",
                                     packed=True)
    assert not all_to_all.pallas_supported(x)


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


@pytest.mark.gpu
@pytest.mark.skipif(len([d for d in jax.devices() if d.platform == "gpu"]) < 2,
                    reason="needs >= 2 GPUs")
@pytest.mark.parametrize("rows_in,out_rows,d,dtype", [
    (1000, 1500, 2048, np.float32),   # chunks of 4 rows, ragged tails
    (4099, 8200, 512, np.float32),
    (333, 2000, 64, np.float32),      # one chunk holds many rows; big zero tail
])
def test_pallas_matches_plan_on_gpus(rows_in, out_rows, d, dtype):
    n = len(_gpus())
    for seed in range(3):
        xs, counts = _case(n, rows_in, out_rows, d, seed, dtype)
        want = _expected(xs, counts, out_rows)
        np.testing.assert_array_equal(_run(xs, counts, out_rows, "pallas", n), want)
        np.testing.assert_array_equal(_run(xs, counts, out_rows, "xla", n), want)
    xs = np.asarray(jnp.asarray(xs, jnp.bfloat16))  # bf16 rows too (half the row bytes)
    np.testing.assert_array_equal(_run(xs, counts, out_rows, "pallas", n).astype(np.float32),
                                  _expected(xs, counts, out_rows).astype(np.float32))


def _lowered_kernel(n: int, segments: int = 0) -> str:
    """The kernel's CUDA lowering: the peer plan, or a plan of `segments` segments per device."""
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])

    def f(x, a, b, c, d):
        if segments:
            return all_to_all._pallas_segments(x, 72, a[0], b[0], c[0], d[0], b[0, 0],
                                               axis_name="expert", num_sms=4)
        return all_to_all._pallas(x, 72, a[0], b[0], c[0], d[0], axis_name="expert", num_sms=4)
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"),
                              check_vma=False))
    x = jnp.ones((n * 40, 128), jnp.bfloat16)
    i = jnp.zeros((n, segments or n), jnp.int32)
    return jax.export.export(g, platforms=["cuda"])(x, i, i, i, i).mlir_module()


@pytest.mark.devices(8)
def test_pallas_kernel_lowers_for_cuda():
    """The peer-memory kernel goes through the Pallas → Mosaic-GPU lowering for CUDA here (jax.export
    needs no GPU): catches lowering errors before device time is spent. Its code must not grow with
    the number of devices: Mosaic's layout inference is superlinear in the op count, and a kernel
    with per-peer branches took minutes to compile in a 4-GPU train step (JAX 0.11.2)."""
    small, large = _lowered_kernel(2), _lowered_kernel(8)
    assert "mosaic_gpu" in small and "mosaic_gpu" in large
    assert len(large) < 1.3 * len(small), (len(small), len(large))
    seg8, seg64 = _lowered_kernel(2, segments=8), _lowered_kernel(2, segments=64)
    assert "mosaic_gpu" in seg8 and len(seg64) < 1.3 * len(seg8), (len(seg8), len(seg64))


@pytest.mark.gpu
@pytest.mark.skipif(len([d for d in jax.devices() if d.platform == "gpu"]) < 2,
                    reason="needs >= 2 GPUs")
@pytest.mark.parametrize("S,d", [(8, 2048), (33, 512), (64, 64)])
def test_pallas_segments_match_plan_on_gpus(S, d):
    """The segment plan (one segment per (destination, expert)) through the Pallas kernel."""
    n = len(_gpus())
    for seed in range(2):
        xs, plan, out_rows, want = _segment_case(n, S, d, seed, max_rows=300)
        np.testing.assert_array_equal(_run_segments(xs, plan, out_rows, n, "pallas"), want)


@pytest.mark.gpu
@pytest.mark.skipif(len([d for d in jax.devices() if d.platform == "gpu"]) < 2,
                    reason="needs >= 2 GPUs")
def test_train_steps_with_pallas_exchange(tmp_path):
    """A few sharded train steps with `alltoall_ragged` (the Pallas peer exchange) give the losses of
    the `alltoall` dispatcher: the check to make before it becomes the default on Hopper."""
    from moe_jax.presets import load_config
    from moe_jax.runner import train
    base = [f"parallel.expert={len(_gpus())}", "train.steps=4", "train.log_every=1",
            "train.batch_size=8", "train.seq_len=64", "train.heatmap=false", "train.tensorboard=false"]
    losses = {}
    for disp in ("alltoall", "alltoall_ragged"):
        cfg = load_config("tiny_moe", base + [f"moe.token_dispatcher_type={disp}",
                                              f"train.out_dir={tmp_path / disp}"])
        train(cfg, progress=False, log=lambda *_: None)
        hist = json.loads((tmp_path / disp / "history.json").read_text())
        losses[disp] = [h["loss"] for h in hist]
    assert len(losses["alltoall"]) == 4
    np.testing.assert_allclose(losses["alltoall_ragged"], losses["alltoall"], rtol=1e-4)
