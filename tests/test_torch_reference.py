"""experiments/torch_reference.py (the PyTorch reference of BENCHMARKS.md §3) builds the same model as
moe_jax: equal parameter counts (full-size presets on torch's meta device, and a toy run on CPU), and the
same loss from the same weights."""
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
from moe_jax.train import cross_entropy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import torch_reference as tr  # noqa: E402


def _configs(preset, *flags):
    m, c, _, used = tr.resolve(tr.load_preset(preset), tr.parse_args(["--config", preset, *flags]))
    return m, c, build_config(used)


def _jax_counts(cfg):
    return metrics.param_counts(nnx.eval_shape(lambda: GPT(cfg.model, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("preset", ["mixtral_small", "deepseek_small", "tiny_moe"])
def test_full_size_param_counts_match_moe_jax(preset):
    m, c, cfg = _configs(preset)
    assert tr.param_counts(tr.build_model(m, c, device="meta"), c) == _jax_counts(cfg)


def test_tiny_run_on_cpu(tmp_path):
    out = tmp_path / "ref.json"
    res = tr.main(["--config", "deepseek_small", "--tiny", "--layers", "2", "--batch", "2", "--seq", "32",
                   "--steps", "3", "--warmup", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens_per_s"] > 0 and saved["step_time_s"] > 0 and len(saved["step_times_ms"]) == 3
    assert all(np.isfinite(saved["losses"])) and saved["losses"][-1] < saved["losses"][0]  # same batch
    assert saved["experts"] == "loop" and saved["param_dtype"] == "fp32" and not saved["compile"]
    # the shapes it trained are moe_jax's shapes for the config it recorded
    assert saved["params"] == _jax_counts(build_config(saved["config"])) == res["params"]
    assert saved["config"]["model"]["num_layers"] == 2 and saved["flops_per_token"] > 0


def _copy_jax_weights(model, tmodel):
    """moe_jax GPT parameters (and expert biases) -> the torch GPT, reshaped to its 2-D/3-D layout."""
    def put(dst, src):
        assert dst.numel() == src.size, (dst.shape, src.shape)
        dst.data.copy_(torch.from_numpy(np.array(src, np.float32).reshape(dst.shape)))

    put(tmodel.embed, model.embed_VD[...])
    put(tmodel.head, model.head_DV[...])
    put(tmodel.final_norm.scale, model.final_norm.scale[...])
    for jb, tb in zip(model.layers(), tmodel.blocks):
        for name in ("attn_norm", "mlp_norm"):
            put(getattr(tb, name).scale, getattr(jb, name).scale[...])
        for w in ("wq_DNH", "wk_DKH", "wv_DKH", "wo_NHD"):
            put(getattr(tb.attn, w[:2]), getattr(jb.attn, w)[...])
        if jb.is_moe:
            put(tb.mlp.router, jb.mlp.router.w_DE[...])
            put(tb.mlp.w1_exp, jb.mlp.experts.w1_EDnF[...])
            put(tb.mlp.w2_exp, jb.mlp.experts.w2_EFD[...])
            if jb.mlp.router.expert_bias is not None:
                put(tb.mlp.expert_bias, jb.mlp.router.expert_bias[...])
            if jb.mlp.shared is not None:
                put(tb.mlp.shared.w1, jb.mlp.shared.mlp.w1_DnF[...])
                put(tb.mlp.shared.w2, jb.mlp.shared.mlp.w2_FD[...])
        else:
            put(tb.mlp.w1, jb.mlp.w1_DnF[...])
            put(tb.mlp.w2, jb.mlp.w2_FD[...])


@pytest.mark.parametrize("preset,flags", [("tiny_moe", []), ("deepseek_small", ["--tiny", "--layers", "2"])])
def test_same_loss_as_moe_jax_from_the_same_weights(preset, flags):
    """Routing (softmax top-k, aux + z losses, dense first layer; sigmoid group-limited top-k with an
    expert bias, seq aux loss, shared expert), attention, norms and the LM head agree in fp32."""
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
    logits, aux = nnx.jit(lambda mdl, x: mdl(x))(model, jnp.asarray(tokens[:, :-1]))
    ce = cross_entropy(logits, jnp.asarray(tokens[:, 1:]))
    want = float(ce + sum(aux["losses"].values()))
    with torch.no_grad():
        loss, ce_t, counts = tmodel(torch.from_numpy(tokens[:, :-1]).long(), torch.from_numpy(tokens[:, 1:]).long())
    assert float(ce_t) == pytest.approx(float(ce), rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(counts.numpy(), np.asarray(aux["routed_counts"]))
