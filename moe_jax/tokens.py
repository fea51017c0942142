"""Token files: a memmapped token-file format, a byte-level tokenizer, and an embedded default corpus
(Python's own stdlib sources, no network). Batches live in `data.py`, corpus preparation in
`prepare.py`, the other tokenizers in `tokenizer.py`.

Token file `<name>.bin` + `<name>.json`: the .bin holds raw little-endian tokens (uint16 when
vocab_size <= 65536, else uint32); the .json header is
`{"format": "moe_jax.tokens", "version": 1, "dtype": "uint16", "num_tokens": N, "vocab_size": V,
"max_token": M, "tokenizer": {...}, "sources": [...]}` (`max_token`, the largest id in the file, lets
a reader range-check the ids without a scan; files written before it existed get a scan). "tokenizer" is
the tokenizer's record (`moe_jax.tokenizer`: kind, name, vocab_size, eos_id, bos_id, sha256); older files
say "bytes" there, which means the byte tokenizer. Both are written to temporary names and renamed into
place.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "moe_jax.tokens"
VERSION = 1

# ---------------------------------------------------------------------------------------------
# Byte-level tokenizer: token = byte value (0..255); EOS (256) ends every document.

EOS = 256
BYTE_VOCAB = 257
EOS_TEXT = "\n<|eos|>\n"
# what a token file records for this tokenizer (`moe_jax.tokenizer.ByteTokenizer().meta()`)
BYTES_TOKENIZER = {"kind": "bytes", "name": "bytes", "vocab_size": BYTE_VOCAB, "eos_id": EOS, "bos_id": None,
                   "sha256": None}


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

def token_paths(path: str | os.PathLike) -> tuple[Path, Path]:
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

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer: str | dict = "bytes"):
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0 or vocab_size > 1 << 32:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: must be an int in [1, 2**32]")
        self.bin_path, self.json_path = token_paths(path)
        self.vocab_size, self.tokenizer = int(vocab_size), tokenizer
        self.dtype = _dtype_for(self.vocab_size)
        self.num_tokens, self.sources, self.max_token = 0, [], None
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
            self.max_token = hi if self.max_token is None else max(self.max_token, hi)
        if source is not None:
            self.sources.append(str(source))

    def close(self) -> Path:
        """Finish: rename the .bin into place, then write the header. Returns the .bin path."""
        self._f.close()
        header = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                  "num_tokens": self.num_tokens, "vocab_size": self.vocab_size,
                  "max_token": self.max_token, "tokenizer": self.tokenizer, "sources": self.sources}
        fd, tmp_json = tempfile.mkstemp(dir=self.json_path.parent,
                                        prefix=f".{self.json_path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(header, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        for tmp in (self._tmp, tmp_json):  # mkstemp makes 0600 files; give them the usual mode
            os.chmod(tmp, 0o666 & ~umask)
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


def write_tokens(path: str | os.PathLike, tokens: Any, vocab_size: int, tokenizer: str | dict = "bytes",
                 sources: Sequence[str] = ()) -> Path:
    """Write a token file (`<name>.bin` + `<name>.json`); returns the .bin path."""
    with TokenWriter(path, vocab_size, tokenizer) as w:
        w.write(tokens)
        w.sources.extend(str(s) for s in sources)
    return w.bin_path


REMAKE = "re-create it with experiments/prepare_data.py (or moe_jax.data.write_tokens)"


class TokenFileError(ValueError):
    """A token file that cannot be used: missing, damaged, or not matching the model."""


class TokenFile:
    """A token file opened read-only: `.tokens` is a 1-D `np.memmap`; `.header` the parsed .json.

    Opening checks the header (format, version, counts, dtype, `max_token` < vocab_size) and the
    .bin's size against it; every failure is a ValueError naming the file and what to do.
    """

    def __init__(self, path: str | os.PathLike):
        self.bin_path, self.json_path = token_paths(path)
        jp = self.json_path
        if not jp.exists():
            raise TokenFileError(f"token file header {jp} not found: {REMAKE}")
        try:
            h = json.loads(jp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenFileError(f"token file header {jp} is not valid JSON ({e}): {REMAKE}") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            got = h.get("format") if isinstance(h, dict) else type(h).__name__
            raise TokenFileError(f"token file header {jp}: format={got!r}, expected {FORMAT!r}: {REMAKE}")
        if h.get("version") != VERSION:
            raise TokenFileError(f"token file header {jp}: version={h.get('version')!r}, this code reads "
                             f"version {VERSION}: {REMAKE}")
        for k in ("num_tokens", "vocab_size"):
            if not isinstance(h.get(k), int) or isinstance(h[k], bool) or h[k] < 0:
                raise TokenFileError(f"token file header {jp}: {k}={h.get(k)!r} must be a non-negative int: "
                                 f"{REMAKE}")
        if h.get("dtype") not in ("uint16", "uint32"):
            raise TokenFileError(f"token file header {jp}: dtype={h.get('dtype')!r}, expected 'uint16' or "
                             f"'uint32': {REMAKE}")
        if h["dtype"] == "uint16" and h["vocab_size"] > 1 << 16:
            raise TokenFileError(f"token file header {jp}: vocab_size={h['vocab_size']} does not fit uint16: "
                             f"{REMAKE}")
        mt = h.get("max_token")
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or not 0 <= mt < h["vocab_size"]):
            raise TokenFileError(f"token file header {jp}: max_token={mt!r} must be an int in "
                             f"[0, vocab_size={h['vocab_size']}): {REMAKE}")
        self.header = h
        dtype = np.dtype("<u2" if h["dtype"] == "uint16" else "<u4")
        if not self.bin_path.exists():
            raise TokenFileError(f"token data {self.bin_path} not found (its header {jp} exists): {REMAKE}")
        size, want = self.bin_path.stat().st_size, h["num_tokens"] * dtype.itemsize
        if size != want:
            raise TokenFileError(f"token data {self.bin_path} is {size} bytes, but its header says "
                             f"{h['num_tokens']} tokens x {dtype.itemsize} bytes ({h['dtype']}) = {want} "
                             f"bytes (truncated or corrupt): {REMAKE}")
        self.tokens = (np.memmap(self.bin_path, dtype=dtype, mode="r") if want
                       else np.zeros(0, dtype))

    def max_token(self, chunk: int = 1 << 24) -> int | None:
        """The largest token id: the header's `max_token`, or (older files) a chunked scan."""
        if "max_token" in self.header:
            return self.header["max_token"]
        t = self.tokens
        return max((int(t[i:i + chunk].max()) for i in range(0, len(t), chunk)), default=None)

    vocab_size = property(lambda self: self.header["vocab_size"])
    num_tokens = property(lambda self: self.header["num_tokens"])
    tokenizer = property(lambda self: self.header.get("tokenizer"))

    @property
    def tokenizer_meta(self) -> dict:
        """The tokenizer record (`moe_jax.tokenizer`); files without one (or with "bytes") are bytes."""
        t = self.header.get("tokenizer")
        return dict(t) if isinstance(t, dict) else dict(BYTES_TOKENIZER)
    sources = property(lambda self: self.header.get("sources", []))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        t = self.tokenizer_meta
        return (f"TokenFile({str(self.bin_path)!r}, num_tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size}, tokenizer={t['kind']}:{t['name']})")


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
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (e.g. the processes of a multi-host run on a fresh machine): the others wait
    # here and then find the file complete; without the lock one builder's rename of the header could
    # land while another process is opening the file
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(out):
            return out
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        if not stdlib.is_dir():
            raise ValueError(f"no Python standard library sources at {stdlib} for the embedded corpus; "
                             f"use data='synthetic' or a token file from experiments/prepare_data.py")
        print(f"moe_jax: building the embedded corpus from {stdlib} into {out} (once)", file=sys.stderr)
        from moe_jax.prepare import prepare  # prepare imports this module
        return prepare([stdlib], out, glob="*.py", max_bytes=max_bytes, skip_dirs=STDLIB_SKIP_DIRS,
                       progress=progress, verbose=True, workers=1)


def _complete(path: Path) -> bool:
    """Whether a whole token file (header and data) is at `path`."""
    try:
        TokenFile(path)
        return True
    except ValueError:
        return False
