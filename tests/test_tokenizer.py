"""Real tokenizers (issue 16): a BPE tokenizer.json, tiktoken encodings and HF checkpoint directories
turn text, JSON Lines and Parquet into token files that record them; runs keep their tokenizer; every
refusal is one line. Tokenizers are built here from a few KB of text (no download)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax import data, prepare as P, tokenizer as T

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parent.parent
WORDS = ["mixture", "expert", "router", "token", "gradient", "über", "naïve", "日本語", "emoji 🙂", "the", "a"]


def random_text(rng, n_words=40) -> str:
    words = rng.choice(WORDS, size=n_words)
    return " ".join(words) + rng.choice([".", "!\n", "\n\n", "?"])


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here on a few KB of text, EOS "<|endoftext|>"."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    rng = np.random.default_rng(0)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(rng, 200) for _ in range(20)], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def mini_encoding(name="mini"):
    """A tiktoken Encoding from a small rank table: the 256 bytes and three merges."""
    ranks = {bytes([i]): i for i in range(256)} | {b"th": 256, b"he": 257, b"the": 258}
    return tiktoken.Encoding(name=name, pat_str=r"\s?\S+|\s+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 259})


def split_docs(ids, sep):
    """(documents, what follows the last separator)."""
    parts = np.split(ids, np.flatnonzero(ids == sep) + 1)
    return [p[:-1] for p in parts[:-1]], parts[-1]


def write_sources(d: Path, rng) -> list[str]:
    """a.txt (1 doc), b.jsonl (2 docs and a blank line), c.parquet (2 rows): 5 documents in order."""
    docs = [random_text(rng) for _ in range(5)]
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(docs[0])
    (d / "b.jsonl").write_text(json.dumps({"text": docs[1], "id": 1}) + "\n\n" + json.dumps({"text": docs[2]}) + "\n")
    pq.write_table(pa.table({"text": docs[3:], "n": [3, 4]}), d / "c.parquet")
    return docs


def prepare_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO / "experiments" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


# ---- prepare with each tokenizer kind ----------------------------------------------------------

def test_bpe_tokenizer_json_text_jsonl_parquet(bpe_path, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    docs = write_sources(tmp_path / "src", rng)
    srcs = [str(tmp_path / "src" / n) for n in ("a.txt", "b.jsonl", "c.parquet")]
    out = P.prepare(srcs, tmp_path / "o", tokenizer=bpe_path, workers=1, progress=False, verbose=False)
    f = data.TokenFile(out)
    meta, tok = f.tokenizer_meta, T.load_tokenizer(bpe_path)
    assert meta["kind"] == "hf" and meta["sha256"] == hashlib.sha256(bpe_path.read_bytes()).hexdigest()
    assert meta["vocab_size"] == f.vocab_size == tok.vocab_size <= 320 and meta["eos_id"] == 0
    assert meta["bos_id"] == 1 and f.sources == srcs
    ids = np.asarray(f.tokens).astype(np.int32)
    got, tail = split_docs(ids, meta["eos_id"])
    assert [tok.decode(g) for g in got] == docs and tail.size == 0
    x = random_text(rng, 30)
    assert tok.decode(tok.encode(x)) == x and tok.encode(x).dtype == np.int32
    # any number of worker processes writes the same file (many small tasks, in order)
    monkeypatch.setattr(P, "CHUNK_BYTES", 64)
    out2 = P.prepare(srcs, tmp_path / "o2", tokenizer=str(bpe_path), workers=2, progress=False, verbose=False)
    assert out2.read_bytes() == out.read_bytes()
    # the tokenizer is rebuilt from the record; a changed file is refused
    assert T.tokenizer_from_meta(meta).meta() == meta


def test_tiktoken_encoding_saved_and_prepared(tmp_path):
    tok = T.TiktokenTokenizer(mini_encoding())
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (260, 259, None)
    x = "the theme: naïve 日本語 🙂"
    assert tok.encode(x)[0] == 258 and tok.decode(tok.encode(x)) == x
    d = T.save_tokenizer(tok, tmp_path / "tk")
    (tmp_path / "t.txt").write_text(x)
    out = P.prepare([tmp_path / "t.txt"], tmp_path / "o", tokenizer=d, workers=1, progress=False, verbose=False)
    f = data.TokenFile(out)
    assert f.tokenizer_meta == {**tok.meta(), "path": str(d.resolve())}  # loaded from d: d recorded
    assert f.tokenizer_meta["kind"] == "tiktoken"
    assert np.array_equal(f.tokens, np.append(tok.encode(x), 259))
    back = T.tokenizer_from_meta(f.tokenizer_meta, base_dir=d)
    assert back.decode(f.tokens[:-1]) == x and back.decode([104, 9999]) == "h\ufffd"


def test_tiktoken_by_name_from_the_cache(monkeypatch):
    """A registered name loads when tiktoken has it cached; without it (and no network): one line."""
    import tiktoken.load

    def offline(url):
        raise ConnectionError(f"no network for {url}")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    try:
        tok = T.load_tokenizer("cl100k_base")
    except ValueError as e:
        assert "tiktoken encoding 'cl100k_base' is not in tiktoken's cache and could not be downloaded" in str(e)
        pytest.skip("cl100k_base is not cached here")
    assert tok.kind == "tiktoken" and tok.vocab_size == 100277 and tok.eos_id == 100257


def llama_dir_with_tokenizer(d, tokenizer_file, vocab: int, eos_token: str, layers: int = 1, ffn: int = 48):
    """A tiny random Llama checkpoint saved in `d` with a fast tokenizer made from `tokenizer_file`
    (BOS "<s>"); returns the tokenizer."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eos_token,
                                                bos_token="<s>")
    fast.save_pretrained(d)
    return fast


@pytest.mark.hf
def test_hf_checkpoint_directory(bpe_path, tmp_path):
    """`upcycle.py --hf DIR`'s directory: its tokenizer files give the tokenizer, EOS from its config."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    d = tmp_path / "ckpt"
    fast = llama_dir_with_tokenizer(d, bpe_path, vocab=384, eos_token="<s>")
    tok = T.load_tokenizer(d)
    assert tok.kind == "hf" and tok.eos_id == fast.eos_token_id == 1  # tokenizer_config.json's, not a guess
    x = "router über 日本語"
    assert tok.encode(x).tolist() == fast.encode(x, add_special_tokens=False) and tok.decode(tok.encode(x)) == x
    (tmp_path / "t.txt").write_text(x)
    out = P.prepare([tmp_path / "t.txt"], tmp_path / "o", tokenizer=d, workers=1, progress=False, verbose=False)
    hf_vocab = json.loads((d / "config.json").read_text())["vocab_size"]  # load_hf's model.vocab_size
    assert data.TokenFile(out).vocab_size <= hf_vocab  # the converted checkpoint trains on its own vocabulary


# ---- the token file appears only when complete ---------------------------------------------------

def test_a_killed_prepare_leaves_no_token_file(bpe_path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(random_text(np.random.default_rng(i), 400))
    out = tmp_path / "out" / "o"
    code = (f"import os, moe_jax.prepare as P; P.CHUNK_BYTES = 100; orig = P.encode_documents; n = [0]\n"
            f"def enc(*a):\n    n[0] += 1\n    if n[0] == 3: os._exit(9)  # killed mid-way\n    return orig(*a)\n"
            f"P.encode_documents = enc\n"
            f"P.prepare([{str(src)!r}], {str(out)!r}, tokenizer={str(bpe_path)!r}, workers=1, progress=False)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 9
    assert not (out.parent / "o.bin").exists() and not (out.parent / "o.json").exists()
    with pytest.raises(data.TokenFileError, match="not found"):
        data.TokenFile(out)
    left = [p.name for p in out.parent.iterdir()]  # the killed run's hidden temporary file only
    assert len(left) == 1 and left[0].startswith(".o.bin.") and left[0].endswith(".tmp"), left
    # an error (not a kill) after some data was written removes its temporary file
    (src / "9.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="9.jsonl:2: no field 'text'"):
        P.prepare([src], out, tokenizer=bpe_path, workers=1, progress=False)
    assert [p.name for p in out.parent.iterdir()] == left


# ---- refusals: one line each -------------------------------------------------------------------

@pytest.mark.parametrize("case,match", [
    ("unknown_name", r"unknown tokenizer 'gpt7': not a file or directory; use 'bytes', a tokenizer.json, "
                     r".*cl100k_base"),
    ("unknown_path", r"unknown tokenizer '.*/nope/tokenizer.json': not a file or directory"),
    ("not_json", r"tokenizer '.*a.txt' is a file but not a tokenizer.json"),
    ("bad_json", r"tokenizer .*bad.json is not a valid Hugging Face tokenizer.json"),
    ("empty_dir", r"tokenizer directory .*src has no tokenizer.json and no meta.json"),
    ("jsonl_field", r"b.jsonl:4: no field 'text' \(its keys: body\); name the text field with --field"),
    ("jsonl_bad", r"b.jsonl:2: not valid JSON"),
    ("parquet_bad", r"cannot read Parquet file .*c.parquet: "),
    ("parquet_column", r"Parquet file .*c.parquet has no column 'body' \(its columns: text, n\); name the text"),
])
def test_refusals_are_one_line(bpe_path, tmp_path, capsys, case, match):
    src = tmp_path / "src"
    write_sources(src, np.random.default_rng(2))
    args, tok = [str(src)], str(bpe_path)
    if case == "unknown_name":
        tok = "gpt7"
    elif case == "unknown_path":
        tok = str(tmp_path / "nope" / "tokenizer.json")
    elif case == "not_json":
        tok = str(src / "a.txt")
    elif case == "bad_json":
        (tmp_path / "bad.json").write_text('{"model": 3}')
        tok = str(tmp_path / "bad.json")
    elif case == "empty_dir":
        tok = str(src)
    elif case == "jsonl_field":
        with open(src / "b.jsonl", "a") as f:
            f.write('{"body": "x"}\n')
    elif case == "jsonl_bad":
        (src / "b.jsonl").write_text('{"text": "x"}\n{"text": \n')
    elif case == "parquet_bad":
        (src / "c.parquet").write_bytes(b"PAR1 not really parquet")
    elif case == "parquet_column":
        args = [str(src / "c.parquet"), "--field", "body"]
    with pytest.raises(SystemExit) as e:
        prepare_cli()([*args, "--out", str(tmp_path / "o"), "--tokenizer", tok, "--workers", "1", "--no-progress"])
    msg = str(e.value.code)
    assert msg.startswith("prepare_data: error: ") and "\n" not in msg and "Traceback" not in msg
    assert __import__("re").search(match, msg), msg
    assert not (tmp_path / "o.bin").exists()


def test_a_tokenizer_without_eos_or_bos_is_refused(tmp_path):
    from tokenizers import models
    t = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    t.save(str(tmp_path / "w.json"))
    (tmp_path / "t.txt").write_text("a")
    with pytest.raises(ValueError, match=r"tokenizer hf '.*w.json' \(vocab 2, sha256 \w+\) has neither an EOS "
                                         r"nor a BOS token"):
        P.prepare([tmp_path / "t.txt"], tmp_path / "o", tokenizer=tmp_path / "w.json", progress=False)


def test_a_changed_tokenizer_file_is_refused(bpe_path, tmp_path):
    meta = T.load_tokenizer(bpe_path).meta()
    changed = tmp_path / "tokenizer.json"
    changed.write_text(bpe_path.read_text().replace('"<s>"', '"<S>"'))
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json has changed since it was recorded as hf"):
        T.tokenizer_from_meta({**meta, "path": str(changed)})


# ---- training: vocabulary fits the model; a run keeps its tokenizer --------------------------------

def test_training_refuses_a_vocab_too_big_and_a_resume_with_another_tokenizer(bpe_path, tmp_path, capsys):
    from test_runs import cli
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    (src / "t.txt").write_text(" ".join(random_text(rng) for _ in range(30)))
    bpe_copy = tmp_path / "bpe.json"
    bpe_copy.write_bytes(bpe_path.read_bytes())
    hf_file = P.prepare([src], tmp_path / "hf", tokenizer=bpe_copy, workers=1, progress=False, verbose=False)
    byte_file = P.prepare([src], tmp_path / "by", workers=1, progress=False, verbose=False)
    out = tmp_path / "run"
    assert cli(f"train.data={hf_file}", f"train.out_dir={out}") == 1  # BASE has model.vocab_size=257
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "vocab_size=" in err and "hf '" in err, err
    assert not out.exists()

    assert cli(f"train.data={hf_file}", "model.vocab_size=320", "train.steps=1", "train.checkpoint=true",
               f"train.out_dir={out}") == 0
    bpe_copy.unlink()  # the run keeps its own copy
    tok = T.run_tokenizer(out)
    assert tok.meta()["sha256"] == data.TokenFile(hf_file).tokenizer_meta["sha256"]
    assert tok.decode(tok.encode("router 日本語")) == "router 日本語"
    assert T.load_tokenizer(out).meta() == T.load_tokenizer(out / "tokenizer").meta() == tok.meta()
    assert T.record_run_tokenizer(out, data.TokenFile(hf_file).tokenizer_meta) is None  # a resume: kept as is
    capsys.readouterr()
    assert cli("--resume", f"train.data={byte_file}", "train.steps=2", f"train.out_dir={out}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: train.data={byte_file} uses tokenizer bytes 'bytes' (vocab 257), not run "
                          f"{out}'s tokenizer hf '{bpe_copy}' (vocab "), err
    assert "\n" not in err and T.run_tokenizer(out).kind == "hf"


@pytest.mark.parametrize("module,spec", [("tokenizers", "bpe"), ("tiktoken", "cl100k_base"),
                                         ("pyarrow", "bytes")])
def test_a_missing_extra_is_named(bpe_path, tmp_path, monkeypatch, capsys, module, spec):
    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, m, None)  # `import module` now raises ImportError
    src = tmp_path / "src"
    write_sources(src, np.random.default_rng(4))
    with pytest.raises(SystemExit) as e:
        prepare_cli()([str(src / "c.parquet"), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress",
                       "--tokenizer", str(bpe_path) if spec == "bpe" else spec])
    msg = str(e.value.code)
    assert msg.startswith("prepare_data: error: ") and f"`{module}`" in msg and 'pip install -e ".[data]"' in msg


def test_tiktoken_saved_locally_is_rebuilt_from_its_record(tmp_path):
    """A tiktoken encoding built here and saved: a token file's record (no base dir) finds the files."""
    pytest.importorskip("tiktoken")
    d = T.save_tokenizer(T.TiktokenTokenizer(mini_encoding()), tmp_path / "tk")
    meta = T.load_tokenizer(d).meta()
    assert meta["path"] == str(d.resolve())
    tok = T.tokenizer_from_meta(meta)
    text = "the expert routes the token"
    assert tok.decode(tok.encode(text)) == text and T.same_tokenizer(tok.meta(), meta)
    (d / T.TIKTOKEN_FILE).unlink()
    with pytest.raises(ValueError, match="is gone"):
        T.tokenizer_from_meta(meta)
