"""Evaluation (issue 16): the jitted eval step against a plain forward, eval metrics on the step line,
in history.json and summary.json, experiments/evaluate.py and generate.py on a run, and their
refusals. One tiny MoE run (synthetic data, byte tokenizer, a vocabulary of 200 < 257) serves all."""
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import data
from moe_jax.config import ModelConfig, MoEConfig, TrainConfig
from moe_jax.evaluate import evaluate, for_inference, make_eval_step
from moe_jax.model import GPT
from moe_jax.train import cross_entropy, split_model

ROOT = Path(__file__).resolve().parent.parent


def script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def run_cli(main, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_eval_step_matches_a_plain_forward():
    """ce and router losses of the (fused, jitted) eval step = those of a plain forward of the model at
    inference settings; capacity and jitter of the trained config are off there."""
    moe = MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=16, layer_freq=(0, 1), z_loss_coeff=1e-3,
                    expert_capacity_factor=0.5, input_jitter_eps=0.1)
    mc = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                     max_seq_len=32, init_std=0.3, moe=moe)
    model = GPT(mc, rngs=nnx.Rngs(3))
    rows = np.random.default_rng(1).integers(0, 64, (2, 4, 13))
    ds = [{"inputs": r[:, :-1].astype(np.int32), "targets": r[:, 1:].astype(np.int32)} for r in rows]

    class Batches:
        batch = staticmethod(lambda i: ds[i])

    _, params, rest = split_model(model)
    got = evaluate(make_eval_step(mc), params, rest, Batches, 2, mc)
    ref = jax.jit(lambda t, m=for_inference(model): m(t))
    ces, zs = [], []
    for b in ds:
        logits, aux = ref(jnp.asarray(b["inputs"]))
        ces.append(float(cross_entropy(logits, jnp.asarray(b["targets"]))))
        zs.append(float(aux["losses"]["z_loss"]))
        assert int(aux["dropped"].sum()) == 0  # dropless at inference
    np.testing.assert_allclose(got["val_loss"], np.mean(ces), rtol=1e-5)
    np.testing.assert_allclose(got["val_ppl"], np.exp(np.mean(ces)), rtol=1e-5)
    np.testing.assert_allclose(got["val_z_loss"], np.mean(zs), rtol=1e-5)
    assert got["val_dropped"] > 0  # capacity 0.5 of the trained config would drop assignments


@pytest.mark.parametrize("kw,match", [
    (dict(eval_every=-1), r"TrainConfig.eval_every=-1 is invalid: must be an integer >= 0"),
    (dict(eval_every=5, eval_batches=0), r"TrainConfig.eval_batches=0 is invalid: must be >= 1 when eval_every=5"),
])
def test_eval_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """3 steps of a tiny MoE (capacity 1.0), evaluated after steps 2 and 3; (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    rc, text, err = run_cli(script("train"), "--no-progress", "model.d_model=32", "model.num_layers=2",
                            "moe.layer_freq=[0,1]", "model.num_heads=2", "model.num_kv_heads=1",
                            "model.ffn_hidden_size=32", "moe.ffn_hidden_size=16", "moe.num_experts=4",
                            "moe.expert_capacity_factor=1.0", "model.vocab_size=200", "model.max_seq_len=32",
                            "train.data=synthetic", "train.batch_size=2", "train.seq_len=16", "train.steps=3",
                            "train.eval_every=2", "train.eval_batches=2", "train.log_every=10",
                            "train.checkpoint=true", "train.heatmap=false", f"train.out_dir={out}")
    assert rc == 0, err
    return out, text


def test_eval_metrics_on_the_step_line_history_and_summary(eval_run):
    out, text = eval_run
    lines = [line for line in text.splitlines() if line.startswith("step")]
    assert [line.split("|")[0].split()[1] for line in lines] == ["2", "3"]  # log_every=10: eval steps only
    assert all(" | val loss " in line and " ppl " in line and " dropped " in line for line in lines)
    rows = json.loads((out / "history.json").read_text())
    assert [("val_loss" in r) for r in rows] == [False, True, True]
    s = json.loads((out / "summary.json").read_text())
    assert s["val_step"] == 3 and s["val_ppl"] == pytest.approx(np.exp(s["val_loss"]))
    assert {"val_aux_loss", "val_dropped", "val_imbalance"} <= set(s) and s["val_loss"] == rows[-1]["val_loss"]
    assert "val loss" in text.splitlines()[-1]
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())


def test_evaluate_script_on_the_run(eval_run, tmp_path):
    out, _ = eval_run
    rc, text, err = run_cli(script("evaluate"), "--run", str(out), "--json", str(tmp_path / "e.json"))
    assert rc == 0, err
    result = json.loads(text.splitlines()[-1])
    assert text.startswith("eval: loss ") and result == json.loads((tmp_path / "e.json").read_text())
    summary = json.loads((out / "summary.json").read_text())  # the same batches as training's evaluation
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    # a token file made with another tokenizer is refused, naming both
    other = {"kind": "tiktoken", "name": "mini", "vocab_size": 150, "eos_id": 149, "bos_id": None, "sha256": "ab" * 32}
    path = data.write_tokens(tmp_path / "other.bin", np.arange(400) % 150, 150, tokenizer=other)
    rc, _, err = run_cli(script("evaluate"), "--run", str(out), "--data", str(path))
    assert rc == 1 and err.count("\n") == 1, err
    assert f"error: --data {path} uses tokenizer tiktoken 'mini' (vocab 150" in err
    assert f"not run {out}'s tokenizer bytes 'bytes' (vocab 257)" in err
    # the same tokens recorded as bytes are accepted
    path = data.write_tokens(tmp_path / "mine.bin", np.arange(400) % 150, 257)
    rc, text, err = run_cli(script("evaluate"), "--run", str(out), "--data", str(path), "--batches", "1")
    assert rc == 0 and json.loads(text.splitlines()[-1])["batches"] == 1, err


def test_generate_script_and_refusals(eval_run, tmp_path):
    out, _ = eval_run
    gen = script("generate")
    rc, text, err = run_cli(gen, "--run", str(out), "--prompt", "ab", "--max-new-tokens", "4", "--seed", "1")
    assert rc == 0 and text.startswith("ab") and "4 tokens in" in err, err
    rc, _, err = run_cli(gen, "--run", str(out), "--prompt", "price: 5€")  # € = bytes 226 130 172
    assert rc == 1 and err.startswith("error: --prompt: token id 226 of tokenizer bytes 'bytes' (vocab 257) is "
                                       "outside the model's vocab_size=200"), err
    rc, _, err = run_cli(gen, "--run", str(tmp_path / "nope"), "--prompt", "ab")
    assert rc == 1 and err == f"error: --run {tmp_path / 'nope'}: no such directory (give a train.out_dir that " \
                              f"holds checkpoints/)\n"
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(gen, "--run", str(tmp_path / "empty"), "--prompt", "ab")
    assert rc == 1 and err.startswith("error: no checkpoint found in ") and err.count("\n") == 1, err


@pytest.mark.devices(8)
@pytest.mark.slow
def test_sharded_evaluation_matches_one_device(tmp_path):
    """Evaluation inside a run on 8 devices (data=8, expert=2: the eval step jitted with the state's
    shardings, the MoE layer across the expert axis) gives the single-device numbers."""
    args = ["--no-progress", "model.d_model=32", "model.num_layers=2", "moe.layer_freq=[0,1]", "model.num_heads=2",
            "model.num_kv_heads=1", "model.ffn_hidden_size=32", "moe.ffn_hidden_size=16", "moe.num_experts=4",
            "moe.expert_capacity_factor=1.0", "train.data=synthetic", "train.batch_size=8", "train.seq_len=16",
            "train.steps=1", "train.eval_every=1", "train.eval_batches=2", "train.tensorboard=false",
            "train.heatmap=false"]
    vals = []
    for name, extra in (("one", ["moe.recompute_rows=true"]),
                        ("eight", ["parallel.data=8", "parallel.expert=2", "moe.recompute_rows=true"])):
        rc, text, err = run_cli(script("train"), *args, *extra, f"train.out_dir={tmp_path / name}")
        assert rc == 0 and "val loss" in text, err
        vals.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert "mesh: 8 devices" in text
    assert "moe.recompute_rows applies to one device: the mesh's dispatchers keep their rows" in text
    for k in ("val_loss", "val_aux_loss", "val_z_loss"):
        assert vals[1][k] == pytest.approx(vals[0][k], rel=1e-5), k
    assert vals[1]["val_dropped"] == vals[0]["val_dropped"]
