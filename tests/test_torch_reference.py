"""experiments/torch_reference.py (the PyTorch reference of BENCHMARKS.md §3) builds the same model as
moe_jax: equal parameter counts (full-size presets on torch's meta device, and a toy run on CPU), and the
same loss from the same weights (moe_jax's training loss: MTP and router losses included), and the same
model FLOPs per token."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import metrics  # noqa: E402
from moe_jax.model import GPT  # noqa: E402
from moe_jax.presets import build_config  # noqa: E402
from moe_jax.mtp import mtp_loss  # noqa: E402
from moe_jax.train import cross_entropy, init_state, make_train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import torch_reference as tr  # noqa: E402


def _configs(preset, *flags):
    m, c, _, used = tr.resolve(tr.load_preset(preset), tr.parse_args(["--config", preset, *flags]))
    return m, c, build_config(used)


def _jax_counts(cfg):
    return metrics.param_counts(nnx.eval_shape(lambda: GPT(cfg.model, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("preset", ["mixtral_small", "deepseek_small", "deepseek_v3_small", "tiny_moe"])
def test_full_size_param_counts_and_flops_match_moe_jax(preset):
    m, c, cfg = _configs(preset)
    counts = tr.param_counts(tr.build_model(m, c, device="meta"), c)
    assert counts == _jax_counts(cfg)
    seq = cfg.train.seq_len  # the MFU numerator: moe_jax.metrics.flops_per_token
    assert tr.flops_per_token(m, counts["active"], seq) == metrics.flops_per_token(cfg.model, counts["active"], seq)


@pytest.mark.parametrize("preset,flags", [("deepseek_small", ["--tiny", "--layers", "2"]),
                                          ("tiny_deepseek_v3", []),
                                          pytest.param("deepseek_v3_small", ["--tiny", "--layers", "2"],
                                                       marks=pytest.mark.slow)])  # tiny_deepseek_v3 covers MLA+MTP
def test_tiny_run_on_cpu(tmp_path, preset, flags):
    out = tmp_path / "ref.json"
    res = tr.main(["--config", preset, *flags, "--batch", "2", "--seq", "32", "--steps", "3", "--warmup", "1",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens_per_s"] > 0 and saved["step_time_s"] > 0 and len(saved["step_times_ms"]) == 3
    assert all(np.isfinite(saved["losses"])) and saved["losses"][-1] < saved["losses"][0]  # same batch
    assert saved["experts"] == "loop" and saved["param_dtype"] == "fp32" and not saved["compile"]
    # the shapes it trained are moe_jax's shapes for the config it recorded, and its FLOPs ours
    cfg = build_config(saved["config"])
    assert saved["params"] == _jax_counts(cfg) == res["params"]
    assert saved["flops_per_token"] == metrics.flops_per_token(cfg.model, saved["params"]["active"], 32)
    if "--layers" in flags:
        assert saved["config"]["model"]["num_layers"] == 2


def _put(dst, src):
    assert dst.numel() == src.size, (dst.shape, src.shape)
    dst.data.copy_(torch.from_numpy(np.array(src, np.float32).reshape(dst.shape)))


def _copy_block(jb, tb):
    """One moe_jax Block -> a torch Block (attention GQA or MLA: torch's names are moe_jax's without the
    shape suffix, e.g. wq_a_DQ -> wq_a, wk_rope_DY -> wk_rope)."""
    for name in ("attn_norm", "mlp_norm"):
        _put(getattr(tb, name).scale, getattr(jb, name).scale[...])
    for name, w in vars(jb.attn).items():
        if name.startswith("w") and w is not None:
            _put(getattr(tb.attn, name.rsplit("_", 1)[0]), w[...])
    for name in ("q_norm", "kv_norm"):
        if getattr(jb.attn, name, None) is not None:
            _put(getattr(tb.attn, name).scale, getattr(jb.attn, name).scale[...])
    if jb.is_moe:
        _put(tb.mlp.router, jb.mlp.router.w_DE[...])
        _put(tb.mlp.w1_exp, jb.mlp.experts.w1_EDnF[...])
        _put(tb.mlp.w2_exp, jb.mlp.experts.w2_EFD[...])
        if jb.mlp.router.expert_bias is not None:
            _put(tb.mlp.expert_bias, jb.mlp.router.expert_bias[...])
        if jb.mlp.shared is not None:
            _put(tb.mlp.shared.w1, jb.mlp.shared.mlp.w1_DnF[...])
            _put(tb.mlp.shared.w2, jb.mlp.shared.mlp.w2_FD[...])
    else:
        _put(tb.mlp.w1, jb.mlp.w1_DnF[...])
        _put(tb.mlp.w2, jb.mlp.w2_FD[...])


def _copy_jax_weights(model, tmodel):
    """moe_jax GPT parameters (and expert biases) -> the torch GPT, reshaped to its 2-D/3-D layout."""
    _put(tmodel.embed, model.embed_VD[...])
    _put(tmodel.head, model.head_DV[...])
    _put(tmodel.final_norm.scale, model.final_norm.scale[...])
    for jb, tb in zip(model.layers(), tmodel.blocks, strict=True):
        _copy_block(jb, tb)
    for jm, tm in zip(model.mtp or [], tmodel.mtp.layers if tmodel.mtp is not None else [], strict=True):
        for name in ("enorm", "hnorm", "final_norm"):
            _put(getattr(tm, name).scale, getattr(jm, name).scale[...])
        _put(tm.eh_proj, jm.eh_proj_nDD[...])  # [2, D, D] -> [2D, D]: the embedding's rows first
        _copy_block(jm.block, tm.block)


@pytest.mark.parametrize("preset,flags", [("tiny_moe", []), ("deepseek_small", ["--tiny", "--layers", "2"]),
                                          ("tiny_deepseek_v3", [])])
def test_same_loss_as_moe_jax_from_the_same_weights(preset, flags):
    """Routing (softmax top-k, aux + z losses, dense first layer; sigmoid group-limited top-k with an
    expert bias, seq aux loss, shared expert), attention (GQA; MLA with a query latent), norms, the LM
    head and the MTP module (an MoE block) agree in fp32: CE, the training loss of moe_jax.train's step
    (CE + router losses, the MTP block's included, + mtp_loss_scaling_factor · MTP loss) and the routed
    counts of every MoE layer, the MTP block's included."""
    m, c, cfg = _configs(preset, *flags)
    mc = cfg.model.__class__(**{**cfg.model.__dict__, "dtype": "float32", "param_dtype": "float32"})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(mc, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)  # random everything, norm scales and expert biases included
    state = jax.tree.map_with_path(lambda path, x: jnp.asarray(
        ("scale" in jax.tree_util.keystr(path)) + rng.normal(0, 0.05, x.shape), jnp.float32), state)
    model = nnx.merge(graphdef, state)
    tmodel = tr.build_model(m, c, device="cpu")
    _copy_jax_weights(model, tmodel)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, (2, 33)).astype(np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    with torch.no_grad():
        ti, tt = torch.from_numpy(tokens[:, :-1]).long(), torch.from_numpy(tokens[:, 1:]).long()
        loss, ce_t, counts = tmodel(ti, tt)
    if not mc.mtp_num_layers:  # moe_jax's training loss without MTP: CE + the router losses
        logits, aux = nnx.jit(lambda mdl, x: mdl(x))(model, inputs)
        ce = cross_entropy(logits, targets)
        want = {"ce": ce, "loss": ce + sum(aux["losses"].values())}
        want_counts = np.asarray(aux["routed_counts"])
    else:  # its train step's own loss (one step; its metrics are computed before its update)
        @nnx.jit
        def mtp_reference(mdl, x, y):  # the MTP loss and router losses alone; every MoE layer's counts
            h, aux = mdl.trunk(x)
            mtp, mtp_aux = mtp_loss(mdl, h, y)
            return mtp, sum(mtp_aux["losses"].values()), jnp.concatenate([aux["routed_counts"],
                                                                          mtp_aux["routed_counts"]])

        mtp_want, mtp_router_want, want_counts = mtp_reference(model, inputs, targets)
        step_graphdef, train_state = init_state(model, cfg.train)
        _, want = make_train_step(step_graphdef, cfg.train)(train_state, {"inputs": inputs, "targets": targets})
        assert float(want["mtp_loss"]) == pytest.approx(float(mtp_want), rel=1e-6)
        np.testing.assert_array_equal(np.asarray(want["routed_counts"]), want_counts[:-mc.mtp_num_layers])
        with torch.no_grad():
            h, _, _, rope = tmodel.trunk(ti)
            mtp_t, mtp_router_t, _ = tmodel.mtp(h, tt, tmodel.embed, tmodel.head_weight(), *rope)
        assert float(mtp_t) == pytest.approx(float(mtp_want), rel=1e-5)
        assert float(mtp_router_t) == pytest.approx(float(mtp_router_want), rel=1e-5) and float(mtp_router_t) > 0
    assert float(ce_t) == pytest.approx(float(want["ce"]), rel=1e-5)
    assert float(loss) == pytest.approx(float(want["loss"]), rel=1e-5)
    np.testing.assert_array_equal(counts.numpy(), np.asarray(want_counts))
