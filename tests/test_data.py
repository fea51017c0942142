"""Token-file format, byte tokenizer, prepare, embedded corpus, deterministic batches."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax import data
from moe_jax.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def stream():
    return np.random.default_rng(0).integers(0, data.BYTE_VOCAB, size=5000).astype(np.uint16)


# ---- format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,dtype", [(257, "uint16"), (65536, "uint16"), (100_000, "uint32")])
def test_format_round_trip(tmp_path, vocab, dtype):
    toks = np.random.default_rng(1).integers(0, vocab, size=1000)
    p = data.write_tokens(tmp_path / "d.bin", toks, vocab, tokenizer="bytes", sources=["a", "b"])
    f = data.TokenFile(p)
    assert f.header == {"format": "moe_jax.tokens", "version": 1, "dtype": dtype, "num_tokens": 1000,
                        "vocab_size": vocab, "max_token": int(toks.max()), "tokenizer": "bytes",
                        "sources": ["a", "b"]}
    assert isinstance(f.tokens, np.memmap) and not f.tokens.flags.writeable
    np.testing.assert_array_equal(f.tokens, toks)
    assert p.stat().st_size == 1000 * np.dtype(dtype).itemsize
    assert {q.name for q in tmp_path.iterdir()} == {"d.bin", "d.json"}  # no temp files left behind
    np.testing.assert_array_equal(data.TokenFile(tmp_path / "d").tokens, toks)  # stem also works


def test_truncated_file_raises(tmp_path, stream):
    p = data.write_tokens(tmp_path / "d.bin", stream, data.BYTE_VOCAB)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.TokenFile(p)


def test_bad_header_raises(tmp_path, stream):
    p = data.write_tokens(tmp_path / "d.bin", stream, data.BYTE_VOCAB)
    hp = tmp_path / "d.json"
    good = json.loads(hp.read_text())
    for change, match in [({"format": "npy"}, "format"), ({"version": 2}, "version"),
                          ({"dtype": "int8"}, "dtype"), ({"num_tokens": -1}, "num_tokens")]:
        hp.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            data.TokenFile(p)
    hp.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.TokenFile(p)
    hp.unlink()
    with pytest.raises(ValueError, match="header .* not found"):
        data.TokenFile(p)


def test_write_rejects_out_of_vocab(tmp_path):
    with pytest.raises(ValueError, match="300 is out of range for vocab_size=257"):
        data.write_tokens(tmp_path / "d.bin", np.array([1, 300, 2]), 257)
    assert list(tmp_path.iterdir()) == []  # temp file removed


# ---- tokenizer ------------------------------------------------------------------------------

def test_tokenizer_round_trip():
    text = "héllo wörld — 你好 🙂\n\tdef f(): return 1"
    t = data.encode(text)
    assert t.max() < 256 and len(t) == len(text.encode("utf-8"))
    assert data.decode(t) == text
    two = np.concatenate([data.encode("a"), [data.EOS], data.encode("ü")])
    assert data.decode(two) == "a\n<|eos|>\nü"
    assert data.decode(two, eos="") == "aü"
    assert data.decode([0xC3]) == "\ufffd"  # broken UTF-8 is replaced, never raises


# ---- prepare --------------------------------------------------------------------------------

def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.py").write_text("print('b')\n")
    (root / "a.txt").write_text("ünïcode a\n")
    (root / "sub" / "c.md").write_text("# c\n")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    (root / ".git" / "x.py").write_text("hidden")
    return root


def test_prepare_deterministic(tmp_path):
    root = _tree(tmp_path / "src")
    p1 = data.prepare([root], tmp_path / "o1.bin", progress=False)
    p2 = data.prepare([str(root)], tmp_path / "o2.bin", progress=False)
    assert p1.read_bytes() == p2.read_bytes()
    f = data.TokenFile(p1)
    assert [Path(s).name for s in f.sources] == ["a.txt", "b.py", "c.md"]
    assert data.decode(f.tokens, eos="|") == "ünïcode a\n|print('b')\n|# c\n|"
    capped = data.TokenFile(data.prepare([root], tmp_path / "o3", max_bytes=5, progress=False))
    assert data.decode(capped.tokens, eos="") == "ünïcode a\n".encode()[:5].decode()
    with pytest.raises(ValueError, match="does not exist"):
        data.prepare([tmp_path / "nope"], tmp_path / "o4", progress=False)


def test_prepare_cli(tmp_path):
    root = _tree(tmp_path / "src")
    r = subprocess.run([sys.executable, str(REPO / "experiments" / "prepare_data.py"),
                        str(root / "*.py"), str(root / "sub"), "--out", str(tmp_path / "o.bin"),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 files" in r.stderr
    assert data.decode(data.TokenFile(tmp_path / "o.bin").tokens, eos="|") == "print('b')\n|# c\n|"


# ---- embedded corpus ------------------------------------------------------------------------

def test_embedded_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_JAX_CACHE", str(tmp_path / "cache"))
    p = data.embedded_corpus(max_bytes=50_000)
    assert p.parent == tmp_path / "cache" and f"{sys.version_info.minor}." in p.name
    f = data.TokenFile(p)
    assert 50_000 < f.num_tokens < 52_000 and f.vocab_size == data.BYTE_VOCAB
    assert int(f.tokens.max()) < f.vocab_size
    assert not any(part in ("test", "tests", "idlelib", "site-packages")
                   for s in f.sources for part in Path(s).parts)
    mtime = p.stat().st_mtime_ns
    assert data.embedded_corpus(max_bytes=50_000) == p and p.stat().st_mtime_ns == mtime  # cached
    ds = data.make_dataset(TrainConfig(data="embedded", seq_len=32, batch_size=2), vocab_size=512)
    assert ds.batch(0)["inputs"].shape == (2, 32)


# ---- batches --------------------------------------------------------------------------------

def test_batches_deterministic_and_resumable(tmp_path, stream):
    p = data.write_tokens(tmp_path / "d.bin", stream, data.BYTE_VOCAB)
    a = data.TokenDataset(p, seq_len=16, batch_size=4, seed=3)
    b = data.TokenDataset(str(p), seq_len=16, batch_size=4, seed=3)
    from_zero = [batch for _, batch in a.iterate(stop=6)]
    for i, batch in b.iterate(start=4, stop=6):
        for k in ("inputs", "targets"):
            np.testing.assert_array_equal(batch[k], from_zero[i][k])
    np.testing.assert_array_equal(a.batch(2)["inputs"], b.batch(2)["inputs"])
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
    c = data.TokenDataset(p, seq_len=16, batch_size=4, seed=4)
    assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])
    # targets = inputs shifted by one, against the raw token stream
    x = a.batch(5)
    assert x["inputs"].dtype == np.int32 and x["targets"].dtype == np.int32
    for row, off in zip(range(4), a.offsets(5)):
        np.testing.assert_array_equal(x["inputs"][row], stream[off:off + 16])
        np.testing.assert_array_equal(x["targets"][row], stream[off + 1:off + 17])
    # process sharding: each process gets its rows of the same global batch
    halves = [data.TokenDataset(p, 16, 4, seed=3, process_index=r, process_count=2).batch(5)
              for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), x["inputs"])


def test_train_val_disjoint(stream):
    tr = data.TokenDataset(stream, seq_len=8, batch_size=64, seed=0, split="train", val_fraction=0.1)
    va = data.TokenDataset(stream, seq_len=8, batch_size=64, seed=0, split="val", val_fraction=0.1)
    assert (tr.start, tr.stop, va.start, va.stop) == (0, 4500, 4500, 5000)
    for i in range(5):
        assert tr.offsets(i).max() + 9 <= 4500 and va.offsets(i).min() >= 0
        assert va.offsets(i).max() + 9 <= 500
        np.testing.assert_array_equal(va.batch(i)["inputs"][0], stream[4500 + va.offsets(i)[0]:][:8])
    with pytest.raises(ValueError, match="val split .* has 50 tokens .* seq_len\\+1 = 65"):
        data.TokenDataset(stream, seq_len=64, batch_size=1, split="val", val_fraction=0.01)


def test_synthetic_dataset():
    a = data.SyntheticDataset(vocab_size=50, seq_len=8, batch_size=3, seed=1)
    b = data.SyntheticDataset(vocab_size=50, seq_len=8, batch_size=3, seed=1)
    x, y = a.batch(7), b.batch(7)
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
    assert x["inputs"].shape == (3, 8) and x["inputs"].max() < 50 and x["inputs"].dtype == np.int32
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
    val = data.SyntheticDataset(50, 8, 3, seed=1, split="val")
    assert not np.array_equal(val.batch(7)["inputs"], x["inputs"])
    assert next(a.iterate(start=7))[0] == 7


def test_make_dataset(tmp_path, stream):
    cfg = TrainConfig(data="synthetic", seq_len=8, batch_size=2, seed=0)
    assert isinstance(data.make_dataset(cfg, 100), data.SyntheticDataset)
    with pytest.raises(ValueError, match="no token file"):
        data.make_dataset(TrainConfig(data=str(tmp_path / "missing.bin")), 512)
    p = data.write_tokens(tmp_path / "d.bin", stream, data.BYTE_VOCAB)
    with pytest.raises(ValueError, match="vocab_size=257 .* model's vocab_size=200"):
        data.make_dataset(TrainConfig(data=str(p), seq_len=8, batch_size=2), 200)
    ds = data.make_dataset(TrainConfig(data=str(p), seq_len=8, batch_size=2), 257, split="val")
    assert ds.split == "val" and ds.num_tokens == 100
    with pytest.raises(ValueError, match="needs at least seq_len\\+1"):
        data.make_dataset(TrainConfig(data=str(p), seq_len=200, batch_size=2), 257, split="val")


def test_embedded_corpus_concurrent_builds(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as ex:
        paths = list(ex.map(lambda _: data.embedded_corpus(tmp_path, max_bytes=20_000), range(3)))
    assert len(set(paths)) == 1 and data.TokenFile(paths[0]).num_tokens > 20_000
    lock = f".{paths[0].name}.lock"  # kept: the builders serialise on it
    assert sorted(q.name for q in tmp_path.iterdir() if q.name != lock) == [paths[0].name, paths[0].stem + ".json"]


# ---- issue 15: token ids range-checked at open; prepare_data refuses bad values -------------

def test_max_token_is_recorded_and_checked_against_the_model(tmp_path, stream):
    p = data.write_tokens(tmp_path / "d.bin", stream, data.BYTE_VOCAB)
    assert data.TokenFile(p).header["max_token"] == int(stream.max())
    # a header that claims a small vocab while the ids go past the model's (hand-made, or damaged)
    h = json.loads((tmp_path / "d.json").read_text())
    (tmp_path / "d.json").write_text(json.dumps({**h, "vocab_size": 100, "max_token": 300}))
    with pytest.raises(ValueError, match=r"d.json: max_token=300 must be an int in \[0, vocab_size=100\)"):
        data.TokenFile(p)
    legacy = {k: v for k, v in h.items() if k != "max_token"}  # files written before max_token: a scan
    (tmp_path / "d.json").write_text(json.dumps({**legacy, "vocab_size": 100}))
    with pytest.raises(ValueError, match=rf"d.bin holds token id {int(stream.max())}, outside the model's "
                                         r"vocab_size=200 .* raise model.vocab_size"):
        data.make_dataset(TrainConfig(data=str(p), seq_len=8, batch_size=2), 200)


def _prepare_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO / "experiments" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main


@pytest.mark.parametrize("extra,match", [
    (["--max-mb", "-1"], "--max-mb -1 is invalid: must be > 0"),
    (["--max-mb", "0"], "--max-mb 0 is invalid"),
    (["--max-mb", "nan"], "--max-mb nan is invalid"),
])
def test_prepare_cli_refuses_bad_values(tmp_path, capsys, extra, match):
    root = _tree(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        _prepare_cli()([str(root), "--out", str(tmp_path / "o.bin"), "--no-progress", *extra])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.json").exists()


def test_prepare_cli_out_paths(tmp_path, capsys):
    root = _tree(tmp_path / "src")
    main = _prepare_cli()
    with pytest.raises(SystemExit) as e:  # a directory, not a file name
        main([str(root), "--out", str(tmp_path / "newdir") + "/", "--no-progress"])
    assert e.value.code == 2 and "is a directory; name the token file" in capsys.readouterr().err
    main([str(root), "--out", str(tmp_path / "a" / "b" / "o.bin"), "--no-progress"])  # created
    assert "creating" in capsys.readouterr().err
    f = data.TokenFile(tmp_path / "a" / "b" / "o.bin")
    assert f.num_tokens > 0 and (f.bin_path.stat().st_mode & 0o044) == 0o044  # readable, like any file
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:  # a file where a directory should be: one line
        main([str(root), "--out", str(tmp_path / "file" / "o.bin"), "--no-progress"])
    assert "prepare_data: error: cannot write" in str(e.value.code) and "\n" not in str(e.value.code)
