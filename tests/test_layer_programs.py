"""`train.programs="layers"` (moe_jax/layer_programs.py): the step run as per-layer programs gives the
one-program step's numbers, and compiles one forward/backward per kind of layer whatever the depth."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import ModelConfig, MoEConfig, TrainConfig
from moe_jax.layer_update import LayerUpdate
from moe_jax.model import GPT
from moe_jax.train import init_state, make_train_step


def model_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16, aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                    layer_freq=(0, 1, 1))
    return ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1, ffn_hidden_size=32,
                       max_seq_len=32, moe=moe, **kw)


def batch(seed):
    t = jax.random.randint(jax.random.key(seed), (4, 17), 0, 64)
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def run(cfg, tc, steps=2):
    graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc)
    step = make_train_step(graphdef, tc)
    out = []
    for i in range(steps):
        state, m = step(state, batch(i))
        out.append(m)
    return state, out, step


@pytest.mark.parametrize("model_kw,train_kw,tol", [
    ({}, {}, 1e-5),
    ({}, {"grad_accum": 2}, 1e-5),
    ({"remat": "selective"}, {}, 1e-5),
    # bf16 compute on fp32 master weights: the layers differentiate the experts' bf16 copies
    ({"dtype": "bfloat16", "param_dtype": "float32"}, {}, 2e-2),
    # the per-layer update's clip (by a norm it sums over the layers first) and the expert-bias update
    ({"moe": {"router_enable_expert_bias": True, "router_score_function": "sigmoid"}}, {"grad_clip": 0.05}, 1e-5),
])
def test_layer_programs_match_the_one_program_step(model_kw, train_kw, tol):
    moe_kw = model_kw.pop("moe", {})
    cfg = model_cfg(**model_kw)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_kw))
    tc = TrainConfig(batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, **train_kw)
    want_state, want, _ = run(cfg, tc)
    got_state, got, step = run(cfg, dataclasses.replace(tc, programs="layers"))
    assert isinstance(step.programs.apply, LayerUpdate)  # the default optimizer: a layer at a time
    if tc.grad_clip < 1:
        assert float(want[0]["grad_norm"]) > tc.grad_clip  # the clip acts
    assert set(got[-1]) == set(want[-1])
    for m_got, m_want in zip(got, want):
        for k in m_want:
            np.testing.assert_allclose(np.asarray(m_got[k], np.float32), np.asarray(m_want[k], np.float32),
                                       rtol=tol, atol=tol, err_msg=k)
    for a, b in zip(jax.tree.leaves((got_state.params, got_state.opt_state, got_state.model_state,
                                     got_state.compute_params)),
                    jax.tree.leaves((want_state.params, want_state.opt_state, want_state.model_state,
                                     want_state.compute_params))):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    assert int(got_state.step) == 2 and int(got_state.data_pos) == 2


def test_one_forward_and_backward_program_per_kind_of_layer(monkeypatch):
    """Six layers (one dense, five MoE) compile two forward programs, each once."""
    traced = []  # the update's own sum of squares, traced once per signature (jit caches are per function)

    def sumsq(grads, params, _f=LayerUpdate._sumsq):
        traced.append(len(grads))
        return _f(grads, params)
    monkeypatch.setattr(LayerUpdate, "_sumsq", staticmethod(sumsq))
    cfg = dataclasses.replace(model_cfg(), num_layers=6,
                              moe=dataclasses.replace(model_cfg().moe, layer_freq=(0, 1, 1, 1, 1, 1)))
    tc = TrainConfig(batch_size=4, seq_len=16, programs="layers")
    _, metrics, step = run(cfg, tc)
    programs = step.programs
    assert len(programs.forward) == 2
    assert all(f._cache_size() == 1 for f in programs.forward.values())
    assert programs.backward._cache_size() == 2  # a dense layer's closure and an MoE layer's
    # each layer's backward sums its gradients' squares: the update's own sum runs for the rest alone
    assert len(traced) == 1 and programs.apply.sumsq._cache_size() == 1
    assert np.isfinite(float(metrics[-1]["loss"]))


def test_programs_compile_ahead_of_time_on_abstract_state():
    """compile_all (bench_compile.py's measure) compiles what a real step would: at 6 layers as at 3, one
    forward per kind of layer and one backward per closure, with grad_accum 2's accumulator; nothing runs."""
    tc = TrainConfig(batch_size=4, seq_len=16, programs="layers", grad_accum=2)
    counts = {}
    for layers, freq in ((3, (0, 1, 1)), (6, (0, 1, 1, 1, 1, 1))):
        cfg = dataclasses.replace(model_cfg(), num_layers=layers, moe=dataclasses.replace(model_cfg().moe,
                                                                                           layer_freq=freq))
        box = {}

        def make():
            box["graphdef"], state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc)
            return state
        state = jax.eval_shape(make)
        b = {k: jax.ShapeDtypeStruct((4, 16), np.int32) for k in ("inputs", "targets")}
        step = make_train_step(box["graphdef"], tc)
        counts[layers] = {k: n for k, (n, s) in step.build(state).compile_all(state, b).items()}
        assert all(f._cache_size() == 0 for f in step.programs.forward.values())  # traced, never dispatched
    assert counts[3] == counts[6] == {"split": 1, "embed": 1, "forward": 2, "head": 1, "backward": 2,
                                      "accumulate": 2, "embed_backward": 1, "stack": 1,
                                      # the update: one sum of squares and one update per kind of group
                                      # (dense layer, MoE layer, the rest), one finish
                                      "apply.sumsq": 3, "apply.update": 3, "apply.finish": 1}
    # grad_accum 1: each layer's backward sums its squares (a static dtypes argument): one sum for the rest
    one = dataclasses.replace(tc, grad_accum=1)
    step = make_train_step(box["graphdef"], one)
    counts = {k: n for k, (n, s) in step.build(state).compile_all(state, b).items()}
    assert counts["backward"] == 2 and counts["apply.sumsq"] == 1 and "accumulate" not in counts


def test_auto_runs_per_layer_programs_on_one_device_and_one_program_otherwise():
    """train.programs=auto (the default): per-layer programs for unscanned layers without a mesh; a scanned
    model falls back to the one program at its first step; under a mesh layout the step is one program."""
    from moe_jax.train import step_programs
    tc = TrainConfig(batch_size=4, seq_len=16)
    assert tc.programs == "auto" and step_programs(tc, False, None) == "layers"
    layout = object()  # step_programs only asks whether there is a mesh layout
    assert step_programs(tc, True, None) == "one" and step_programs(tc, False, layout) == "one"
    graphdef, state = init_state(GPT(model_cfg(), rngs=nnx.Rngs(0)), tc)
    step = make_train_step(graphdef, tc)
    step(state, batch(0))
    assert step.programs is not None and step.one is None
    graphdef, state = init_state(GPT(model_cfg(scan_layers=True), rngs=nnx.Rngs(0)), tc)
    step = make_train_step(graphdef, tc)
    new, m = step(state, batch(0))
    assert step.programs is None and step.one is not None and np.isfinite(float(m["loss"]))
    assert step.build(state) is None


def test_layer_programs_need_one_layer_per_stack():
    tc = TrainConfig(batch_size=4, seq_len=16, programs="layers")
    graphdef, state = init_state(GPT(model_cfg(scan_layers=True), rngs=nnx.Rngs(0)), tc)
    with pytest.raises(ValueError, match="scan_layers=false"):
        make_train_step(graphdef, tc)(state, batch(0))


def test_unknown_programs_value_is_refused():
    with pytest.raises(ValueError, match="programs"):
        TrainConfig(programs="per_layer")


def test_a_given_optimizer_is_applied_in_one_program():
    """An optimizer passed in (any optax transformation) is applied whole, as the one-program step does."""
    import optax
    cfg, tc = model_cfg(), TrainConfig(batch_size=4, seq_len=16, programs="layers")
    sgd = optax.sgd(0.1)
    graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc, sgd)
    want, _ = make_train_step(graphdef, dataclasses.replace(tc, programs="one"), sgd)(state, batch(0))
    graphdef, state = init_state(GPT(cfg, rngs=nnx.Rngs(0)), tc, sgd)
    step = make_train_step(graphdef, tc, sgd)
    got, _ = step(state, batch(0))
    assert not isinstance(step.programs.apply, LayerUpdate)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_the_residual_policy_keeps_a_named_value_once():
    """A value both saved by a custom_vjp (as cuDNN attention saves its output) and named for the remat
    policy (`checkpoint_name`, as attention's output is) is one residual, not two: returned twice from a
    layer's forward program it would be a second buffer and a copy."""
    from jax.ad_checkpoint import checkpoint_name

    from moe_jax.layer_programs import _residual_policy

    @jax.custom_vjp
    def op(x):
        return jax.numpy.tanh(x)

    def op_fwd(x):
        y = jax.numpy.tanh(x)
        return y, y  # its output is its residual

    op.defvjp(op_fwd, lambda y, dy: (dy * (1 - y * y),))

    def f(x, w):
        return checkpoint_name(op(x), "attn_out") @ w

    x, w = jax.random.normal(jax.random.key(0), (8, 4)), jax.random.normal(jax.random.key(1), (4, 3))
    for base, saved in ((..., 1), (None, 0)):
        g = jax.checkpoint(f, policy=_residual_policy(base))
        _, vjp = jax.vjp(g, x, w)
        residuals = [v for v in jax.tree.leaves(vjp) if v.shape == (8, 4) and v is not x]
        assert len(residuals) == saved, (base, [v.shape for v in jax.tree.leaves(vjp)])
        dx, dw = vjp(jax.random.normal(jax.random.key(2), (8, 3)))
        want = jax.grad(lambda x, w: (f(x, w) * jax.random.normal(jax.random.key(2), (8, 3))).sum(), (0, 1))(x, w)
        np.testing.assert_allclose(dx, want[0], rtol=1e-5)
        np.testing.assert_allclose(dw, want[1], rtol=1e-5)


def test_experts_sums_of_squares_come_from_the_probes(monkeypatch):
    """Each MoE layer's backward takes its experts' weight-gradient sums of squares from the sumsq probes'
    cotangents (moe_jax/sumsq_probes.py) and sums the other gradients itself: the step's gradient norm and
    clipped update equal those of the plain sums (probes off), and every MoE layer's probes were taken."""
    from moe_jax import layer_programs
    monkeypatch.setattr(layer_programs, "EXPERT_SUMSQ_PROBES", True)
    cfg = model_cfg()
    tc = TrainConfig(batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, grad_clip=0.05, programs="layers")
    got_state, got, step = run(cfg, tc)
    programs = step.programs
    moe_kind = programs.kind[1]
    assert programs.probes[moe_kind] == 2 and programs.probes[programs.kind[0]] == 0  # w1, w2; the dense layer none
    assert [c[2] for k, c in programs.closures.items() if k[0] == moe_kind] == [True]
    monkeypatch.setattr(layer_programs, "EXPERT_SUMSQ_PROBES", False)
    want_state, want, plain = run(cfg, tc)
    assert not any(plain.programs.probes) and not any(c[2] for c in plain.programs.closures.values())
    assert float(want[0]["grad_norm"]) > tc.grad_clip  # the clip acts, so the sums decide the update
    for m_got, m_want in zip(got, want):
        np.testing.assert_allclose(float(m_got["grad_norm"]), float(m_want["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sumsq_probes_record_is_incomplete_without_takers():
    """A layer whose experts do not take their probes (or take them twice) leaves the record incomplete,
    so the backward sums those gradients itself."""
    import jax.numpy as jnp
    from moe_jax import sumsq_probes
    owner, other = object(), object()
    assert sumsq_probes.take(owner) == (None, None)  # outside `collecting`
    with sumsq_probes.collecting(jnp.zeros((2,))) as record:
        pass
    assert not record.complete
    with sumsq_probes.collecting(jnp.zeros((4,))) as record:
        sumsq_probes.take(owner), sumsq_probes.take(owner)
    assert not record.complete
    with sumsq_probes.collecting(jnp.zeros((2,))) as record:
        assert all(p is not None for p in sumsq_probes.take(owner))
        assert sumsq_probes.take(other) == (None, None)  # more takers than probes
    assert not record.complete
    with sumsq_probes.collecting(jnp.zeros((4,))) as record:
        sumsq_probes.take(owner), sumsq_probes.take(other)
    assert record.complete
