"""Text in, text out (issue 16), through the scripts as a user runs them: a tokenizer built here →
prepare_data.py → train.py (with evaluation) → generate.py; and an HF checkpoint directory →
upcycle.py → prepare_data.py with its tokenizer → train.py --resume on that data → generate.py."""
import contextlib
import io
import json

import numpy as np
import pytest

from moe_jax import tokenizer as T
from test_evaluate import run_cli, script
from test_tokenizer import llama_dir_with_tokenizer, mini_encoding, random_text

TINY = ["--no-progress", "model.d_model=32", "model.num_layers=2", "moe.layer_freq=[0,1]", "model.num_heads=2",
        "model.num_kv_heads=1", "model.ffn_hidden_size=32", "moe.ffn_hidden_size=16", "moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=2", "train.seq_len=16", "train.heatmap=false",
        "train.tensorboard=false", "train.log_every=1", "train.checkpoint=true"]


def corpus(d, n_docs=12):
    rng = np.random.default_rng(0)
    d.mkdir()
    for i in range(n_docs):
        (d / f"{i}.txt").write_text(random_text(rng, 150))
    return d


def prepare(*args) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        script("prepare_data")([*args, "--no-progress", "--workers", "1"])
    return err.getvalue()


def bpe(path):
    """A byte-level BPE tokenizer.json trained on a few KB, EOS "<|endoftext|>" (id 0)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = np.random.default_rng(1)
    tok.train_from_iterator([random_text(rng, 200) for _ in range(20)], trainer)
    tok.save(str(path))
    return path


def train_generate(tmp_path, tok_spec, vocab: int, prompt: str):
    """prepare → train 2 steps (evaluated) → generate; returns generate's stdout."""
    tokens = tmp_path / "data" / "corpus.bin"
    prepare(str(corpus(tmp_path / "text")), "--out", str(tokens), "--tokenizer", str(tok_spec))
    out = tmp_path / "run"
    rc, text, err = run_cli(script("train"), *TINY, f"model.vocab_size={vocab}", f"train.data={tokens}",
                            "train.steps=2", "train.eval_every=2", "train.eval_batches=1", f"train.out_dir={out}")
    assert rc == 0 and "| val loss " in text, err
    kept = T.run_tokenizer(out)
    assert T.same_tokenizer(kept.meta(), T.load_tokenizer(tok_spec).meta())
    rc, text, err = run_cli(script("generate"), "--run", str(out), "--prompt", prompt, "--max-new-tokens", "8")
    assert rc == 0 and text.startswith(prompt) and len(text) > len(prompt) + 1, err
    return text


@pytest.mark.slow
def test_bpe_tokenizer_to_generated_text(tmp_path):
    pytest.importorskip("tokenizers")
    train_generate(tmp_path, bpe(tmp_path / "tokenizer.json"), 320, "the router")


@pytest.mark.slow
def test_tiktoken_to_generated_text(tmp_path):
    pytest.importorskip("tiktoken")
    d = T.save_tokenizer(T.TiktokenTokenizer(mini_encoding()), tmp_path / "tk")
    train_generate(tmp_path, d, 260, "the expert")


@pytest.mark.hf
@pytest.mark.slow
def test_hf_checkpoint_upcycled_trained_on_its_tokenizer_and_sampled(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    hf = tmp_path / "llama"
    llama_dir_with_tokenizer(hf, bpe(tmp_path / "tokenizer.json"), vocab=320, eos_token="<|endoftext|>", layers=2,
                             ffn=64)
    run = tmp_path / "run"
    rc, text, err = run_cli(script("upcycle"), "--hf", str(hf), "--config", "tiny_moe", "--out", str(run),
                            "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=32",
                            "moe.layer_freq=[0,1]", "train.batch_size=2", "train.seq_len=16",
                            "train.heatmap=false", "train.tensorboard=false", "train.log_every=1")
    assert rc == 0 and "tokenizer: hf " in text, err
    tokens = tmp_path / "data" / "corpus.bin"
    prepare(str(corpus(tmp_path / "text")), "--out", str(tokens), "--tokenizer", str(hf))
    rc, text, err = run_cli(script("train"), "--no-progress", "--config", str(run / "config.yaml"), "--resume",
                            f"train.data={tokens}", "train.steps=2", "train.eval_every=1", "train.eval_batches=1")
    assert rc == 0 and "resumed from" in text and "| val loss " in text, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["checkpoints"][-1] == 2
    rc, text, err = run_cli(script("generate"), "--run", str(run), "--prompt", "the token", "--max-new-tokens", "6")
    assert rc == 0 and text.startswith("the token"), err
    rc, text, err = run_cli(script("evaluate"), "--hf", str(hf), "--data", str(tokens), "--batches", "1",
                            "--seq-len", "16", "--batch-size", "2")
    assert rc == 0 and text.startswith("eval: loss "), err
