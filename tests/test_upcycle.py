"""Dense -> MoE upcycling: the derived scale rule, slice/round-robin layout, virtual-group router rows,
step-0 equivalence for the exact settings, clear errors, and the experiments/upcycle.py flow."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import checkpoint as C
from moe_jax.config import Config, MoEConfig, ModelConfig, TrainConfig
from moe_jax.presets import to_dict
from moe_jax.model import GPT
from moe_jax.runs import load_model
from moe_jax.train import init_state
from moe_jax.upcycle import plan, upcycle

DENSE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=64, max_seq_len=16)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)


def moe(**kw):
    return dataclasses.replace(DENSE, moe=MoEConfig(**kw))


@pytest.fixture(scope="module")
def dense():
    model = GPT(DENSE, rngs=nnx.Rngs(0))
    return model, model(TOKENS)[0]


def max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("kw", [
    dict(num_experts=4, router_topk=2, ffn_hidden_size=64),                       # G=1 (sparse upcycling)
    dict(num_experts=8, router_topk=4, ffn_hidden_size=32),                       # G=2, post-softmax
    dict(num_experts=8, router_topk=4, ffn_hidden_size=32, router_pre_softmax=True),  # G=2, pre-softmax
    dict(num_experts=8, router_topk=4, ffn_hidden_size=16, layer_freq=[0, 1]),    # G=4, one MoE layer
    dict(num_experts=8, router_topk=2, ffn_hidden_size=32, router_score_function="sigmoid"),
    dict(num_experts=4, router_topk=2, ffn_hidden_size=64, router_topk_scaling_factor=2.5),
], ids=["G1", "G2-post", "G2-pre", "G4-pattern", "G2-sigmoid", "G1-scaled"])
def test_step0_logits_match_dense(dense, kw):
    model, ref = dense
    cfg = moe(**kw)
    assert plan(DENSE, cfg).exact
    assert max_rel(upcycle(model, cfg)(TOKENS)[0], ref) < 1e-5


def test_megatron_scale_is_exact_for_squared_relu():
    dense_cfg = dataclasses.replace(DENSE, activation="squared_relu")
    model = GPT(dense_cfg, rngs=nnx.Rngs(0))
    cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(num_experts=8, router_topk=4, ffn_hidden_size=32,
                                                       activation="squared_relu"))
    assert plan(dense_cfg, cfg, "megatron").exact
    assert max_rel(upcycle(model, cfg, scale_mode="megatron")(TOKENS)[0], model(TOKENS)[0]) < 1e-5


def test_scale_rule():
    # post-softmax / normalised: each virtual group carries weight 1, slices 1/G -> c = G
    assert plan(DENSE, moe(num_experts=8, router_topk=4, ffn_hidden_size=16)).scale == 4
    # pre-softmax, zero router: k/G copies of each slice at weight 1/E -> c = E*G/k
    p = plan(DENSE, moe(num_experts=8, router_topk=4, ffn_hidden_size=32, router_pre_softmax=True))
    e, g, k = 8, 2, 4
    assert p.router_init == "zero" and p.scale == e * g / k == (e / g) * g ** 2 / k  # Megatron's E0*G^2/k
    # one sigmoid score (k=1): weight sigmoid(0) = 1/2 -> c = 2
    assert plan(DENSE, moe(num_experts=4, router_topk=1, ffn_hidden_size=64,
                           router_score_function="sigmoid")).scale == 2
    bad = plan(DENSE, moe(num_experts=8, router_topk=2, ffn_hidden_size=16))  # k=2 < G=4
    assert not bad.exact and "multiple of the granularity" in bad.why_not_exact


def test_layout_round_robin_and_router_groups(dense):
    model, ref = dense
    cfg = moe(num_experts=8, router_topk=4, ffn_hidden_size=16)  # G = 4
    for mode, (s1, s2) in {"exact": (1.0, 4.0), "megatron": (4 ** (1 / 3), 4 ** (1 / 3))}.items():
        up = upcycle(model, cfg, scale_mode=mode)
        for i in range(2):
            w1d, w2d = model.layer(i).mlp.w1_DnF[...], model.layer(i).mlp.w2_FD[...]
            ex = up.layer(i).mlp.experts
            for e in range(8):
                sl = slice((e % 4) * 16, (e % 4 + 1) * 16)  # gate and up split alike
                np.testing.assert_allclose(ex.w1_EDnF[...][e], w1d[:, :, sl] * s1, rtol=1e-6)
                np.testing.assert_allclose(ex.w2_EFD[...][e], w2d[sl] * s2, rtol=1e-6)
            w = up.layer(i).mlp.router.w_DE[...]
            for v in range(2):  # a virtual group's experts share one row; groups differ
                assert all(jnp.array_equal(w[:, 4 * v], w[:, 4 * v + j]) for j in range(4))
            assert not jnp.array_equal(w[:, 0], w[:, 4])
            np.testing.assert_array_equal(up.layer(i).attn.wq_DNH[...], model.layer(i).attn.wq_DNH[...])
        np.testing.assert_array_equal(up.embed_VD[...], model.embed_VD[...])
    # megatron's split scale is close (silu is nearly linear near 0) but not exact for SwiGLU
    err = max_rel(upcycle(model, cfg, scale_mode="megatron")(TOKENS)[0], ref)
    assert 1e-6 < err < 1e-1


@pytest.mark.parametrize("kw,field", [
    (dict(num_experts=8, router_topk=2, ffn_hidden_size=48), "must divide the dense"),
    (dict(num_experts=6, router_topk=2, ffn_hidden_size=16), "multiple of the granularity"),
    (dict(num_experts=4, router_topk=2, ffn_hidden_size=32, shared_expert_intermediate_size=32),
     "shared"),
    (dict(num_experts=4, router_topk=2, ffn_hidden_size=32, activation="gelu"), "activation"),
])
def test_errors(kw, field):
    with pytest.raises(ValueError, match=field):
        plan(DENSE, moe(**kw))
    with pytest.raises(ValueError, match=r"ModelConfig.d_model differs"):
        plan(DENSE, dataclasses.replace(moe(num_experts=4, router_topk=2, ffn_hidden_size=32), d_model=64))


def test_script_writes_a_resumable_checkpoint(dense, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "upcycle_cli", Path(__file__).parent.parent / "experiments" / "upcycle.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    model, ref = dense
    tc = TrainConfig(steps=1, batch_size=2, seq_len=16, data="synthetic", tensorboard=False,
                     heatmap=False, log_every=1)
    _, state = init_state(model, tc)
    ck = C.Checkpointer(tmp_path / "dense" / "checkpoints")
    ck.save(state, config=to_dict(Config(model=DENSE, train=tc)))
    ck.close()
    tiktoken = pytest.importorskip("tiktoken")
    from moe_jax.tokenizer import TiktokenTokenizer, run_tokenizer, same_tokenizer, save_run_tokenizer
    dense_tok = TiktokenTokenizer(tiktoken.Encoding(  # the dense run's tokenizer: 64 ids, EOS 63
        name="tiny", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i - 32 for i in range(32, 95)},
        special_tokens={"<|endoftext|>": 63}))
    save_run_tokenizer(tmp_path / "dense", dense_tok)

    out = tmp_path / "moe"
    args = ["--dense", str(tmp_path / "dense"), "--config", "tiny_moe", "--out", str(out),
            "moe.num_experts=8", "moe.router_topk=4", "moe.ffn_hidden_size=32",
            "moe.layer_freq=[1,1]", "moe.z_loss_coeff=null", "train.steps=1",
            "train.batch_size=2", "train.seq_len=16", "train.data=synthetic",
            "train.tensorboard=false", "train.heatmap=false"]
    rc = cli.main(args)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    diff = float(printed.split("logits = ")[1].split()[0])
    assert diff < 1e-5

    kept = run_tokenizer(out).meta()  # the upcycled run keeps it (the same files: same hash)
    assert same_tokenizer(kept, dense_tok.meta()) and kept["sha256"] == dense_tok.meta()["sha256"]
    cfg, up = load_model(out)
    assert cfg.model.moe.num_experts == 8 and C.Checkpointer(out / "checkpoints").all_steps() == [0]
    assert max_rel(up(TOKENS)[0], ref) < 1e-5

    from moe_jax.runner import train
    logs = []
    train(cfg, progress=False, log=logs.append, resume=True)  # = experiments/train.py --resume
    assert any("resumed from" in line for line in logs)
    assert C.Checkpointer(out / "checkpoints").all_steps() == [0, 1]

    # upcycling into an existing run is refused before anything is written (issue 15, finding 5)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(args[:-1] + ["moe.router_topk=2"]) == 2
    assert "--out " + str(out) + " already holds the checkpoints [0, 1]" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_mla_with_mtp_upcycles_exactly():
    """An MLA model with an MTP module: attention copied, the MTP block upcycled like the last layer;
    step-0 logits and MTP loss equal the dense model's."""
    from moe_jax.mtp import mtp_loss
    dense_cfg = dataclasses.replace(DENSE, attention_type="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                                    qk_rope_head_dim=4, v_head_dim=4, mtp_num_layers=1)
    model = GPT(dense_cfg, rngs=nnx.Rngs(0))
    cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(num_experts=8, router_topk=4, ffn_hidden_size=32))
    up = upcycle(model, cfg)
    assert up.mtp[0].block.is_moe

    def logits_and_mtp_loss(m):  # one jit per model
        graphdef, state = nnx.split(m)

        def f(state):
            m = nnx.merge(graphdef, state)
            return m(TOKENS)[0], mtp_loss(m, m.trunk(TOKENS[:, :-1])[0], TOKENS[:, 1:])[0]
        return jax.jit(f)(state)

    (logits, loss), (ref_logits, ref_loss) = logits_and_mtp_loss(up), logits_and_mtp_loss(model)
    assert max_rel(logits, ref_logits) < 1e-5
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
