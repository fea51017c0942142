"""Expert-parallel dispatchers (shard_map over 8 fake CPU devices) against the single-device layer:
outputs and gradients (params and input), fp32, rel. err < 1e-5. Variants are chosen through
`MoEConfig.dispatcher` (a `DispatchConfig`)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import ep, parallel
from moe_jax.config import DispatchConfig, ModelConfig, MoEConfig, ParallelConfig, with_dispatcher
from moe_jax.experts import SequentialExperts
from moe_jax.moe import MoELayer


def _cfg(**moe):
    m = dict(num_experts=8, router_topk=2, ffn_hidden_size=32, grouped_gemm_backend="xla")
    m.update(moe)
    return ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                       moe=MoEConfig(**m))


def _with_dispatcher(cfg, **kw):
    """cfg with moe.dispatcher fields set (`dispatcher=` names the type, `chunks=` overlap_chunks)."""
    names = {"dispatcher": "type", "chunks": "overlap_chunks"}
    return with_dispatcher(cfg, **{names.get(k, k): v for k, v in kw.items()})


def _loss_fn(gd, layout=None):
    def loss(params, x):
        y, aux = nnx.merge(gd, params)(x, layout=layout)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * w) + sum(aux["losses"].values()), (y, aux)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _run(cfg, x, layout=None, experts_cls=None, **kw):
    cfg = _with_dispatcher(cfg, **kw)
    extra = {} if experts_cls is None else {"experts_cls": experts_cls}
    gd, params = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(0), **extra))
    (_, (y, aux)), grads = jax.jit(_loss_fn(gd, layout))(params, x)
    return y, aux, grads


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


@functools.lru_cache(maxsize=None)
def _reference(cfg, tokens):
    x = jax.random.normal(jax.random.key(1), tokens + (cfg.d_model,), jnp.float32)
    return x, _run(cfg, x)


def _check(cfg, ep, etp=1, chunks=1, tokens=(4, 8), **kw):
    x, (y0, aux0, g0) = _reference(cfg, tokens)
    layout = parallel.make_layout(ParallelConfig(data=-1, expert=ep, expert_tensor=etp),
                                  _with_dispatcher(cfg, chunks=chunks))
    y1, aux1, g1 = _run(cfg, x, layout, chunks=chunks, **kw)
    assert _rel(y1, y0) < 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 1e-5
    assert int(aux1["dropped"]) == int(aux0["dropped"])
    return aux1


@pytest.mark.devices(8)
@pytest.mark.parametrize("ep,etp", [(2, 1), (8, 1), (4, 2), (1, 2)])
def test_alltoall_matches_single_device(ep, etp):
    aux = _check(_cfg(), ep, etp, dispatcher="alltoall")
    assert int(aux["dropped"]) == 0  # dropless: the worst-case buffer never drops


@pytest.mark.devices(8)
@pytest.mark.parametrize("ep,etp", [(4, 1), (2, 2), (1, 2)])
def test_allgather_matches_single_device(ep, etp):
    _check(_cfg(), ep, etp, dispatcher="allgather")


@pytest.mark.devices(8)
@pytest.mark.parametrize("ep,etp", [(2, 1), (8, 1), (4, 2), (1, 2)])
def test_ragged_plan_matches_single_device(ep, etp):
    """The ragged dispatcher's offsets/sizes plan, run through the all_gather emulation on CPU."""
    _check(_cfg(), ep, etp, dispatcher="alltoall_ragged", ragged_impl="emulate")


@pytest.mark.devices(8)
@pytest.mark.parametrize("ep,etp,chunks", [(2, 1, 1), (8, 1, 1), (4, 2, 2), (1, 2, 1)])
def test_expert_major_ragged_matches_single_device(ep, etp, chunks):
    """Segments per (destination, local expert): rows arrive grouped by expert, no re-sort; exact
    through the segment exchange's emulation (outputs and gradients, fast buffer)."""
    _check(_cfg(), ep, etp, chunks=chunks, dispatcher="alltoall_ragged", ragged_impl="emulate",
           expert_major=True)


@pytest.mark.parametrize("impl,want", [("pallas", True), ("emulate", False)])
def test_expert_major_is_the_default_on_the_pallas_exchange(impl, want):
    """expert_major=None picks the expert-major plan exactly where the Pallas exchange runs (decided
    by `ep.resolve`; the kernel itself needs GPUs)."""
    row = jax.ShapeDtypeStruct((1, 16), jnp.float32)
    dc = DispatchConfig(type="alltoall_ragged", ragged_impl=impl)
    assert ep.resolve(dc, row, 2) == ("alltoall_ragged", impl, want)
    assert ep._dispatcher("alltoall_ragged", 64, impl, want, False).__class__ is (
        ep.ExpertMajorAllToAll if want else ep.RaggedAllToAll)


@pytest.mark.devices(8)
def test_expert_major_fallback_and_probs_on_input():
    _check(_cfg(router_topk=1, apply_probs_on_input=True), 4, dispatcher="alltoall_ragged",
           ragged_impl="emulate", expert_major=True, buffer_factor=0.25)  # worst-case branch
    with pytest.raises(ValueError, match="expert_major"):
        _check(_cfg(), 2, dispatcher="alltoall", expert_major=True)
    with pytest.raises(ValueError, match="expert_major"):  # the XLA exchange has no segments
        ep.resolve(DispatchConfig(type="alltoall_ragged", ragged_impl="xla", expert_major=True),
                   jax.ShapeDtypeStruct((1, 16), jnp.float32), 1)


@pytest.mark.devices(8)
def test_overlap_chunks_and_probs_on_input():
    _check(_cfg(router_topk=1, apply_probs_on_input=True), 4, chunks=2, dispatcher="alltoall")


@pytest.mark.devices(8)
def test_capacity_routing_and_shared_experts():
    cfg = _cfg(expert_capacity_factor=1.0, shared_expert_intermediate_size=16,
               shared_expert_gate=True, router_score_function="sigmoid")
    # the per-(source, destination) buffer drops by policy on top of the router's capacity; with
    # the allgather dispatcher nothing is buffered, so it must equal one device exactly
    _check(cfg, 4, dispatcher="allgather")


def test_fixed_capacity_sizes():
    m = MoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=8)
    assert ep.fixed_capacity(16, m, 4) == 16 * 2          # worst case: k <= E/EP
    assert ep.fixed_capacity(16, m, 8) == 16              # one expert per device
    m = MoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=8, expert_capacity_factor=1.0)
    assert ep.fixed_capacity(16, m, 4) == 8


@pytest.mark.devices(8)
def test_alltoall_capacity_drops_are_counted():
    cfg = _cfg(expert_capacity_factor=0.25, router_topk=2)
    x = jax.random.normal(jax.random.key(3), (4, 8, 16), jnp.float32)
    layout = parallel.make_layout(ParallelConfig(expert=4), cfg)
    _, aux0, _ = _run(cfg, x)
    _, aux1, _ = _run(cfg, x, layout, dispatcher="alltoall")
    assert int(aux1["dropped"]) >= int(aux0["dropped"]) > 0


@pytest.mark.devices(8)
def test_ragged_on_cpu_fails_clearly():
    cfg = _cfg(dispatcher=DispatchConfig(type="alltoall_ragged"))
    with pytest.raises(ValueError, match="ragged_all_to_all"):
        parallel.make_layout(ParallelConfig(expert=2), cfg)


@pytest.mark.devices(8)
def test_buffer_factor_comes_from_the_config():
    """moe.dispatcher.buffer_factor sizes the dropless fast buffer: a factor past the worst case
    leaves no fallback branch (no cond); a tiny one overflows into it and stays exact."""
    cfg = _cfg()
    x = jax.random.normal(jax.random.key(1), (8, 32, cfg.d_model), jnp.float32)  # 32 tokens/device
    layout = parallel.make_layout(ParallelConfig(expert=4), cfg)

    def jaxpr(factor):
        gd, params = nnx.split(MoELayer(_with_dispatcher(cfg, buffer_factor=factor), rngs=nnx.Rngs(0)))
        return str(jax.make_jaxpr(lambda p, x: nnx.merge(gd, p)(x, layout=layout))(params, x))
    assert "cond[" in jaxpr(2.0) and "cond[" not in jaxpr(100.0)
    x0, (y0, _, _) = _reference(cfg, (8, 32))
    y1, _, _ = _run(cfg, x0, layout, dispatcher="alltoall", buffer_factor=0.25)
    assert _rel(y1, y0) < 1e-5


@pytest.mark.devices(8)
def test_auto_dispatcher_resolves_per_platform():
    row = jax.ShapeDtypeStruct((1, 64), jnp.bfloat16)
    assert ep.resolve_type("allgather", row) == "allgather"
    # the Pallas exchange needs Hopper GPUs: on CPU `auto` is the portable fixed-buffer all-to-all
    assert ep.resolve_type("auto", row) == "alltoall"
    with pytest.raises(ValueError, match="dispatcher.type='ragged'.*auto"):
        DispatchConfig(type="ragged")
    assert MoEConfig(num_experts=2, router_topk=1, ffn_hidden_size=8).token_dispatcher_type == "auto"
    _check(_cfg(), 4, dispatcher="auto")  # the default runs where CI runs, and is exact


@pytest.mark.devices(8)
@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_alltoall_dropless_fast_buffer_and_fallback(factor):
    """2.0: every (source, dest) count fits the fast buffer; 0.5: it overflows and the worst-case
    branch runs. Both are exact and drop nothing."""
    m = MoEConfig(num_experts=8, router_topk=2, ffn_hidden_size=8)
    t = 256 // 8 // 2  # tokens per shard and chunk below (EP=4, edata=2, 2 chunks)
    assert ep.round_up(t * 2 / 4 * factor, 8) < ep.fixed_capacity(t, m, 4)
    aux = _check(_cfg(), 4, chunks=2, tokens=(8, 32), dispatcher="alltoall", buffer_factor=factor)
    assert int(aux["dropped"]) == 0


@pytest.mark.devices(8)
def test_alltoall_fast_buffer_without_fallback_counts_drops():
    """With the fallback off, a fast buffer too small for some (source, dest) count drops rows, and
    `dropped` counts them over every shard (the dropless paths skip that collective)."""
    cfg = _cfg()
    x = jax.random.normal(jax.random.key(3), (8, 32, 16), jnp.float32)
    layout = parallel.make_layout(ParallelConfig(data=-1, expert=4), cfg)
    _, aux, _ = _run(cfg, x, layout, dispatcher="alltoall", buffer_factor=0.5, fallback=False)
    _, aux_dropless, _ = _run(cfg, x, layout, dispatcher="alltoall", buffer_factor=0.5)
    assert int(aux["dropped"]) > 0 and int(aux_dropless["dropped"]) == 0


@pytest.mark.devices(8)
@pytest.mark.parametrize("factor", [1.5, 0.25, None])
def test_ragged_fast_buffer_and_fallback(factor):
    """The ragged dispatcher's packed receive buffer: 1.5x T·k (usually fits), 0.25x (some device
    must overflow: the worst-case branch runs), None (always the worst case). All exact, nothing
    dropped."""
    t, k = 256 // 8 // 2, 2  # tokens per shard and chunk below (EP=4, edata=2, 2 chunks)
    fast, worst = ep.buffer_rows("alltoall_ragged", t, _cfg().moe, 4, 2, factor)
    if factor == 0.25:  # devices receive t·k rows on average, so one receives at least that many
        assert fast < t * k < worst
    aux = _check(_cfg(), 4, chunks=2, tokens=(8, 32), dispatcher="alltoall_ragged",
                 ragged_impl="emulate", buffer_factor=factor)
    assert int(aux["dropped"]) == 0


@pytest.mark.devices(8)
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_no_collectives_over_single_device_groups(dispatcher):
    """Size-1 mesh axes (edata, etensor here) get no psum: XLA keeps an all-reduce over singleton
    groups, which on GPU is a NCCL launch over the expert weight gradients for nothing."""
    import re
    cfg = _cfg()
    layout = parallel.make_layout(ParallelConfig(data=2, expert=2), cfg, devices=jax.devices()[:2])
    assert layout.moe_mesh.shape["edata"] == layout.moe_mesh.shape["etensor"] == 1
    gd, params = nnx.split(MoELayer(_with_dispatcher(cfg, dispatcher=dispatcher), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 8, cfg.d_model), jnp.float32)
    hlo = jax.jit(_loss_fn(gd, layout)).lower(params, x).compile().as_text()
    singleton = re.compile(r"replica_groups=\{\{\d+\}(,\{\d+\})*\}")
    bad = [ln.strip()[:160] for ln in hlo.splitlines() if "all-reduce" in ln and singleton.search(ln)]
    assert not bad, bad


@pytest.mark.gpu
@pytest.mark.skipif(len([d for d in jax.devices() if d.platform == "gpu"]) < 2, reason="needs >= 2 GPUs")
def test_bf16_pallas_gemm_gradients_match_single_device_on_gpus():
    """bf16 with the default grouped GEMM (the Pallas kernels on Hopper) on both sides: every
    dispatcher's outputs and gradients match one GPU's to bf16 accuracy. The kernels' outputs are
    typed invariant inside shard_map; a cast differentiated outside their custom_vjp once summed
    every device's cotangent here (O(1) errors) while the fp32 checks, on XLA's GEMM, stayed exact."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import bench_ep
    n = min(4, len([d for d in jax.devices() if d.platform == "gpu"]))
    rows = bench_ep.check(["alltoall", "alltoall_ragged", "ragged_sorted"], [(n, 1), (1, 2)], "bfloat16")
    assert all(r["ok"] for r in rows), rows


@pytest.mark.devices(8)
@pytest.mark.parametrize("dispatcher,ep_size,etp", [("alltoall", 4, 1), ("allgather", 2, 2),
                                                     ("alltoall_ragged", 4, 1)])
def test_sequential_experts_run_under_ep(dispatcher, ep_size, etp):
    """The layer's own experts module runs on every device under EP: a layer built with the
    reference `SequentialExperts` gives the single-device outputs and gradients through each
    dispatcher (its per-expert loop, not the grouped GEMM, runs there)."""
    kw = {"ragged_impl": "emulate"} if dispatcher == "alltoall_ragged" else {}
    _check(_cfg(), ep_size, etp, dispatcher=dispatcher, experts_cls=SequentialExperts, **kw)


@pytest.mark.devices(8)
def test_sequential_experts_are_what_runs_under_ep():
    """Traced under EP, a SequentialExperts layer has no ragged_dot (the grouped GEMM) at all."""
    cfg = _cfg()
    layout = parallel.make_layout(ParallelConfig(expert=4), cfg)
    x = jax.random.normal(jax.random.key(1), (4, 8, cfg.d_model), jnp.float32)
    for cls, want in ((SequentialExperts, False), (None, True)):
        extra = {} if cls is None else {"experts_cls": cls}
        gd, params = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(0), **extra))
        text = str(jax.make_jaxpr(lambda p, x: nnx.merge(gd, p)(x, layout=layout))(params, x))
        assert ("ragged_dot" in text) == want


@pytest.mark.devices(8)
def test_active_mesh_without_layout_is_refused():
    cfg = _cfg()
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 8, cfg.d_model), jnp.float32)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="active 8-device mesh.*without a layout"):
            layer(x)



@pytest.mark.devices(8)
def test_swiglu_kernel_is_refused_under_ep():
    """The SwiGLU backward kernel runs on one device: inside the EP shard_map, `fused_kernels=pallas`
    (here its interpret mode) is refused naming why, and `auto` takes XLA's SwiGLU there."""
    fused = dataclasses.replace(_cfg(), fused_kernels="interpret")
    x = jax.random.normal(jax.random.key(1), (4, 8, 16), jnp.float32)
    layout = parallel.make_layout(ParallelConfig(data=-1, expert=4), _with_dispatcher(fused))
    with pytest.raises(ValueError, match="inside shard_map"):
        _run(fused, x, layout, dispatcher="alltoall")
