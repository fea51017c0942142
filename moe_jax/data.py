"""Token datasets: a memmapped token-file format, a byte-level tokenizer, `prepare` for local text,
an embedded default corpus (Python's own stdlib sources, no network), and deterministic, resumable
batches (`TokenDataset`, `SyntheticDataset`, `make_dataset`).

Token file `<name>.bin` + `<name>.json`: the .bin holds raw little-endian tokens (uint16 when
vocab_size <= 65536, else uint32); the .json header is
`{"format": "moe_jax.tokens", "version": 1, "dtype": "uint16", "num_tokens": N, "vocab_size": V,
"tokenizer": "bytes", "sources": [...]}`. Both are written to temporary names and renamed into place.

Batches are numpy (`{"inputs": int32[B,S], "targets": int32[B,S]}`); batch `i` depends only on
(seed, i), so resuming at step i reproduces the run exactly.
"""
from __future__ import annotations

import fnmatch
import glob as globlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FORMAT = "moe_jax.tokens"
VERSION = 1

# ---------------------------------------------------------------------------------------------
# Byte-level tokenizer: token = byte value (0..255); EOS (256) ends every document.

EOS = 256
BYTE_VOCAB = 257
EOS_TEXT = "\n<|eos|>\n"


def encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of `text` as uint16 tokens (no EOS appended)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def decode(tokens: Any, eos: str = EOS_TEXT) -> str:
    """Tokens back to text: bytes decoded as UTF-8 with errors="replace"; EOS rendered as `eos`
    (pass eos="" to skip it); ids outside the byte vocabulary (a larger model vocab) become U+FFFD."""
    t = np.asarray(tokens).reshape(-1).astype(np.int64)
    out, start = [], 0
    for j in np.flatnonzero((t < 0) | (t > 255)):
        out.append(t[start:j].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        out.append(eos if t[j] == EOS else "\ufffd")
        start = j + 1
    out.append(t[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Token file format.

def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """`x`, `x.bin` or `x.json` -> (x.bin, x.json)."""
    p = Path(path)
    if p.suffix in (".bin", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".json")


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class TokenWriter:
    """Streams tokens into `<name>.bin`, then writes `<name>.json`; both land atomically on close.

    with TokenWriter("data.bin", vocab_size=257) as w:
        w.write(tokens, source="a.txt")
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer: str = "bytes"):
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0 or vocab_size > 1 << 32:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: must be an int in [1, 2**32]")
        self.bin_path, self.json_path = _paths(path)
        self.vocab_size, self.tokenizer = int(vocab_size), tokenizer
        self.dtype = _dtype_for(self.vocab_size)
        self.num_tokens, self.sources = 0, []
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.bin_path.parent, prefix=f".{self.bin_path.name}.",
                                         suffix=".tmp")
        self._f = os.fdopen(fd, "wb")

    def write(self, tokens: Any, source: str | None = None) -> None:
        t = np.asarray(tokens).reshape(-1)
        if t.size:
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"tokens must be integers, got dtype {t.dtype}")
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token {hi if hi >= self.vocab_size else lo} is out of range for "
                                 f"vocab_size={self.vocab_size} (tokens must be in [0, vocab_size))")
            self._f.write(t.astype(self.dtype).tobytes())
            self.num_tokens += t.size
        if source is not None:
            self.sources.append(str(source))

    def close(self) -> Path:
        """Finish: rename the .bin into place, then write the header. Returns the .bin path."""
        self._f.close()
        header = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                  "num_tokens": self.num_tokens, "vocab_size": self.vocab_size,
                  "tokenizer": self.tokenizer, "sources": self.sources}
        fd, tmp_json = tempfile.mkstemp(dir=self.json_path.parent,
                                        prefix=f".{self.json_path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(header, f, indent=1)
        # Remove a stale header first: a reader never pairs an old header with a new .bin.
        self.json_path.unlink(missing_ok=True)
        os.replace(self._tmp, self.bin_path)
        os.replace(tmp_json, self.json_path)
        return self.bin_path

    def abort(self) -> None:
        self._f.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tokens(path: str | os.PathLike, tokens: Any, vocab_size: int, tokenizer: str = "bytes",
                 sources: Sequence[str] = ()) -> Path:
    """Write a token file (`<name>.bin` + `<name>.json`); returns the .bin path."""
    with TokenWriter(path, vocab_size, tokenizer) as w:
        w.write(tokens)
        w.sources.extend(str(s) for s in sources)
    return w.bin_path


class TokenFile:
    """A token file opened read-only: `.tokens` is a 1-D `np.memmap`; `.header` the parsed .json."""

    def __init__(self, path: str | os.PathLike):
        self.bin_path, self.json_path = _paths(path)
        if not self.json_path.exists():
            raise ValueError(f"token file header {self.json_path} not found (write token files with "
                             f"moe_jax.data.write_tokens or experiments/prepare_data.py)")
        try:
            h = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"token file header {self.json_path} is not valid JSON: {e}") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            got = h.get("format") if isinstance(h, dict) else type(h).__name__
            raise ValueError(f"{self.json_path}: format={got!r}, expected {FORMAT!r}")
        if h.get("version") != VERSION:
            raise ValueError(f"{self.json_path}: version={h.get('version')!r}, this code reads "
                             f"version {VERSION}")
        for k in ("num_tokens", "vocab_size"):
            if not isinstance(h.get(k), int) or h[k] < 0:
                raise ValueError(f"{self.json_path}: {k}={h.get(k)!r} must be a non-negative int")
        if h.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"{self.json_path}: dtype={h.get('dtype')!r}, expected 'uint16' or "
                             f"'uint32'")
        if h["dtype"] == "uint16" and h["vocab_size"] > 1 << 16:
            raise ValueError(f"{self.json_path}: vocab_size={h['vocab_size']} does not fit uint16")
        self.header = h
        dtype = np.dtype("<u2" if h["dtype"] == "uint16" else "<u4")
        if not self.bin_path.exists():
            raise ValueError(f"token data {self.bin_path} not found (header {self.json_path} exists)")
        size, want = self.bin_path.stat().st_size, h["num_tokens"] * dtype.itemsize
        if size != want:
            raise ValueError(f"{self.bin_path} is {size} bytes, but the header says "
                             f"{h['num_tokens']} tokens x {dtype.itemsize} bytes = {want} bytes "
                             f"(truncated or corrupt)")
        self.tokens = (np.memmap(self.bin_path, dtype=dtype, mode="r") if want
                       else np.zeros(0, dtype))

    vocab_size = property(lambda self: self.header["vocab_size"])
    num_tokens = property(lambda self: self.header["num_tokens"])
    tokenizer = property(lambda self: self.header.get("tokenizer"))
    sources = property(lambda self: self.header.get("sources", []))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenFile({str(self.bin_path)!r}, num_tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size}, tokenizer={self.tokenizer!r})")


# ---------------------------------------------------------------------------------------------
# prepare: local text files -> token file.

DEFAULT_GLOB = "*.py,*.txt,*.md"
DEFAULT_SKIP_DIRS = ("__pycache__", "node_modules")  # plus every hidden dir (.git, .venv, ...)


def _walk(root: Path, patterns: Sequence[str], skip_dirs: Sequence[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if any(fnmatch.fnmatch(f, p) for p in patterns)]
    return found


def collect_files(inputs: Sequence[str | os.PathLike], glob: str = DEFAULT_GLOB,
                  skip_dirs: Sequence[str] = DEFAULT_SKIP_DIRS) -> list[Path]:
    """Expand files, directories (walked in sorted order, files matching `glob`, a comma-separated
    list of name patterns) and glob patterns, in input order, without duplicates."""
    patterns = [p.strip() for p in glob.split(",") if p.strip()]
    out: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(c in s for c in "*?["):
            matches = [Path(m) for m in sorted(globlib.glob(s, recursive=True))]
            if not matches:
                raise ValueError(f"input pattern {s!r} matched nothing")
        elif Path(s).exists():
            matches = [Path(s)]
        else:
            raise ValueError(f"input {s!r} does not exist")
        for m in matches:
            out += _walk(m, patterns, skip_dirs) if m.is_dir() else [m] if m.is_file() else []
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def prepare(inputs: Sequence[str | os.PathLike], out_path: str | os.PathLike, *,
            glob: str = DEFAULT_GLOB, max_bytes: int | None = None,
            skip_dirs: Sequence[str] = DEFAULT_SKIP_DIRS, progress: bool = True,
            verbose: bool = True) -> Path:
    """Tokenize local text files (byte tokenizer, EOS after each file) into a token file.

    `max_bytes` caps the text taken: the corpus is the first `max_bytes` bytes of the files in
    order (the last file may be cut). Returns the .bin path.
    """
    from tqdm.auto import tqdm

    files = collect_files(inputs, glob, skip_dirs)
    if not files:
        raise ValueError(f"no input files matched {glob!r} under {[str(i) for i in inputs]}")
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes) if max_bytes is None else min(sum(sizes), max_bytes)
    taken = 0
    with TokenWriter(out_path, BYTE_VOCAB, "bytes") as w, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                 disable=not progress) as bar:
        for f, size in zip(files, sizes):
            if max_bytes is not None and taken >= max_bytes:
                break
            data = f.read_bytes()
            if max_bytes is not None:
                data = data[:max_bytes - taken]
            w.write(np.append(encode(data), np.uint16(EOS)), source=str(f))
            taken += len(data)
            bar.update(len(data))
    if verbose:
        mb = w.num_tokens * w.dtype.itemsize / 1e6
        print(f"prepared {w.bin_path}: {len(w.sources)} files, {w.num_tokens:,} tokens, "
              f"{mb:.1f} MB", file=sys.stderr)
    return w.bin_path


# ---------------------------------------------------------------------------------------------
# Embedded default corpus: the Python standard library's own sources.

EMBEDDED_MAX_BYTES = 8 * 1024 * 1024
STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MOE_JAX_CACHE, else ~/.cache/moe_jax."""
    return Path(cache_dir or os.environ.get("MOE_JAX_CACHE") or Path.home() / ".cache" / "moe_jax")


def embedded_corpus(cache_dir: str | os.PathLike | None = None, *,
                    max_bytes: int = EMBEDDED_MAX_BYTES, progress: bool = False) -> Path:
    """Path of a token file built (once, then cached) from this Python's stdlib *.py sources."""
    v = sys.version_info
    key = f"stdlib_{sys.implementation.name}{v.major}.{v.minor}.{v.micro}_{max_bytes}B"
    out = resolve_cache_dir(cache_dir) / f"{key}.bin"
    try:
        TokenFile(out)
        return out
    except ValueError:
        pass  # missing or incomplete: (re)build; the rename makes concurrent builds safe
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise ValueError(f"no Python standard library sources at {stdlib} for the embedded corpus; "
                         f"use data='synthetic' or a token file from experiments/prepare_data.py")
    print(f"moe_jax: building the embedded corpus from {stdlib} into {out} (once)", file=sys.stderr)
    return prepare([stdlib], out, glob="*.py", max_bytes=max_bytes, skip_dirs=STDLIB_SKIP_DIRS,
                   progress=progress, verbose=True)


# ---------------------------------------------------------------------------------------------
# Batches.

def _check_seed(seed: int, i: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: must be a non-negative int")
    if not isinstance(i, (int, np.integer)) or i < 0:
        raise ValueError(f"batch index {i!r} is invalid: must be a non-negative int")


class _Batches:
    """Shared iteration; subclasses define `batch(i)`."""

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict]]:
        """Yield (i, batch(i)) for i = start, start+1, ... (endless unless `stop`)."""
        i = start
        while stop is None or i < stop:
            yield i, self.batch(i)
            i += 1

    def __iter__(self):
        return (b for _, b in self.iterate())

    def _local(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        n = rows.shape[0] // self.process_count
        rows = rows[self.process_index * n:(self.process_index + 1) * n].astype(np.int32)
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def _check_shape(self, seq_len: int, batch_size: int, process_index: int,
                     process_count: int) -> None:
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size),
                        ("process_count", process_count)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: must be a positive int")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)


class TokenDataset(_Batches):
    """Random windows of a token stream, deterministic per batch index.

    `batch(i)` draws `batch_size` window offsets from `np.random.default_rng([seed, i])` (stateless:
    resuming at i is exact) and returns `{"inputs": int32[B,S], "targets": int32[B,S]}` with
    targets = inputs shifted by one. split="val" is the contiguous tail of `ceil(N*val_fraction)`
    tokens, "train" the rest. With process_count > 1 each process gets its rows
    [process_index*B/P, (process_index+1)*B/P) of the same global batch.
    """

    def __init__(self, path_or_tokens: Any, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "train", val_fraction: float = 0.02, *, process_index: int = 0,
                 process_count: int = 1):
        self._check_shape(seq_len, batch_size, process_index, process_count)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is invalid: must be 'train' or 'val'")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        _check_seed(seed, 0)
        if isinstance(path_or_tokens, TokenFile):
            self.file = path_or_tokens
        elif isinstance(path_or_tokens, (str, os.PathLike)):
            self.file = TokenFile(path_or_tokens)
        else:
            self.file = None
        if self.file is not None:
            tokens, self.vocab_size = self.file.tokens, self.file.vocab_size
        else:
            tokens = np.asarray(path_or_tokens).reshape(-1)
            self.vocab_size = int(tokens.max()) + 1 if tokens.size else 0
        n = tokens.shape[0]
        n_val = int(np.ceil(n * val_fraction))
        self.start, self.stop = (0, n - n_val) if split == "train" else (n - n_val, n)
        self.tokens = tokens[self.start:self.stop]
        self.seed, self.split = int(seed), split
        if self.stop - self.start < self.seq_len + 1:
            src = self.file.bin_path if self.file is not None else "the token array"
            raise ValueError(f"the {split} split of {src} has {self.stop - self.start} tokens "
                             f"(of {n}, val_fraction={val_fraction}); it needs at least "
                             f"seq_len+1 = {self.seq_len + 1}")

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    def offsets(self, i: int) -> np.ndarray:
        """Window starts of global batch i, relative to this split."""
        _check_seed(self.seed, i)
        rng = np.random.default_rng([self.seed, int(i)])
        return rng.integers(0, self.num_tokens - self.seq_len, size=self.batch_size)

    def batch(self, i: int) -> dict[str, np.ndarray]:
        idx = self.offsets(i)[:, None] + np.arange(self.seq_len + 1)
        return self._local(np.asarray(self.tokens[idx]))

    def __repr__(self) -> str:
        return (f"TokenDataset(split={self.split!r}, tokens=[{self.start}, {self.stop}), "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}, seed={self.seed})")


class SyntheticDataset(_Batches):
    """Uniformly random tokens with the `TokenDataset` interface; deterministic per (seed, i)."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "train", *, process_index: int = 0, process_count: int = 1):
        self._check_shape(seq_len, batch_size, process_index, process_count)
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: must be a positive int")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is invalid: must be 'train' or 'val'")
        _check_seed(seed, 0)
        self.vocab_size, self.seed, self.split = int(vocab_size), int(seed), split

    def batch(self, i: int) -> dict[str, np.ndarray]:
        _check_seed(self.seed, i)
        key = [self.seed, int(i)] if self.split == "train" else [self.seed, int(i), 1]
        rows = np.random.default_rng(key).integers(0, self.vocab_size,
                                                   size=(self.batch_size, self.seq_len + 1))
        return self._local(rows)


def make_dataset(train_cfg: Any, vocab_size: int, split: str = "train", *,
                 process_index: int = 0, process_count: int = 1) -> TokenDataset | SyntheticDataset:
    """The dataset `TrainConfig.data` names: "embedded" (stdlib corpus), "synthetic", or a path to
    a token file whose vocab_size must be <= the model's `vocab_size`."""
    data = train_cfg.data
    kw = dict(seq_len=train_cfg.seq_len, batch_size=train_cfg.batch_size, seed=train_cfg.seed,
              split=split, process_index=process_index, process_count=process_count)
    if data == "synthetic":
        return SyntheticDataset(vocab_size, **kw)
    if data == "embedded":
        path = embedded_corpus()
    else:
        bin_path, json_path = _paths(data)
        if not (bin_path.exists() or json_path.exists()):
            raise ValueError(f"TrainConfig.data={data!r} is invalid: no token file at {bin_path}; "
                             f"use 'embedded', 'synthetic', or a file made by "
                             f"experiments/prepare_data.py")
        path = bin_path
    f = TokenFile(path)
    if f.vocab_size > vocab_size:
        raise ValueError(f"TrainConfig.data={data!r}: the token file's vocab_size={f.vocab_size} "
                         f"is larger than the model's vocab_size={vocab_size}; raise "
                         f"model.vocab_size to at least {f.vocab_size}")
    return TokenDataset(f, **kw)
