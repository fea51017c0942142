"""Corpus preparation: documents from text files, JSON Lines and Parquet files, tokenized by any
`moe_jax.tokenizer` (in worker processes, in input order) into one token file that records its
tokenizer. Each document ends with the tokenizer's EOS token (or, without one, starts with BOS).

A text file is one document; a JSON Lines file (`.jsonl`, `.ndjson`) one document per line (its
`field`); a Parquet file (`.parquet`, needs `pyarrow`) one per row (its `field` column). The token file
appears only when complete (`TokenWriter` writes under a temporary name and renames at the end).
"""
from __future__ import annotations

import fnmatch
import glob as globlib
import json
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from moe_jax.tokenizer import Tokenizer, describe, load_tokenizer
from moe_jax.tokens import TokenWriter

DEFAULT_GLOB = "*.py,*.txt,*.md,*.jsonl,*.parquet"
DEFAULT_SKIP_DIRS = ("__pycache__", "node_modules")  # plus every hidden dir (.git, .venv, ...)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CHUNK_BYTES = 1 << 20  # text per task sent to a worker


def default_workers() -> int:
    """Worker processes for tokenizing: the cores less one for reading, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


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


# ---------------------------------------------------------------------------------------------
# Sources: each yields (document, bytes of the file it stands for) — the second for the progress bar.

def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, float]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = f" (its keys: {', '.join(map(str, obj))})" if isinstance(obj, dict) else ""
                raise ValueError(f"{path}:{n}: no field {field!r}{keys}; name the text field with --field")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}:{n}: field {field!r} is {type(obj[field]).__name__}, not a string")
            yield obj[field], len(line)


def _read_parquet(path: Path, field: str) -> Iterator[tuple[str, float]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs `pyarrow`: pip install -e \".[data]\"") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"Parquet file {path} has no column {field!r} (its columns: {', '.join(names)}); "
                         f"name the text column with --field")
    per_row, row = path.stat().st_size / max(1, pf.metadata.num_rows), 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for v in batch.column(0).to_pylist():
                row += 1
                if not isinstance(v, str):
                    raise ValueError(f"Parquet file {path}, row {row}: column {field!r} is "
                                     f"{type(v).__name__}, not a string")
                yield v, per_row
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from None


def read_documents(path: Path, field: str = "text") -> Iterator[tuple[str | bytes, float]]:
    """The documents of one file: a text file's bytes, JSON Lines' `field`s, a Parquet `field` column."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, field)
    elif name.endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, field)
    else:
        data = path.read_bytes()
        yield data, len(data)


def _chunks(files: Sequence[Path], field: str, max_bytes: int | None, sources: list[str]
            ) -> Iterator[tuple[list[str | bytes], float]]:
    """Documents grouped into tasks of ~CHUNK_BYTES, the first `max_bytes` bytes of text only (the last
    document may be cut). Appends each file read to `sources`."""
    docs, size, progress, taken = [], 0, 0.0, 0
    for f in files:
        sources.append(str(f))
        for doc, nbytes in read_documents(f, field):
            n = len(doc) if isinstance(doc, bytes) else len(doc.encode("utf-8"))
            if max_bytes is not None and taken + n > max_bytes:
                rest = max_bytes - taken
                doc = doc[:rest] if isinstance(doc, bytes) else \
                    doc.encode("utf-8")[:rest].decode("utf-8", errors="ignore")
                n = rest
            docs.append(doc)
            size, taken, progress = size + n, taken + n, progress + nbytes
            if size >= CHUNK_BYTES:
                yield docs, progress
                docs, size, progress = [], 0, 0.0
            if max_bytes is not None and taken >= max_bytes:
                yield docs, progress
                return
    if docs:
        yield docs, progress


def encode_documents(tok: Tokenizer, docs: Sequence[str | bytes]) -> np.ndarray:
    """Documents -> one int32 array, each document ended by EOS (or started by BOS)."""
    parts = [tok.separator(tok.encode(d)) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _worker_encode(docs: list[str | bytes]) -> np.ndarray:
    return encode_documents(_WORKER_TOKENIZER, docs)


def _encoded(tok: Tokenizer, chunks: Iterator, workers: int) -> Iterator[tuple[np.ndarray, float]]:
    """Encode the chunks in order, in `workers` processes, at most 2 tasks per worker in flight. The
    workers are forked, or spawned where JAX is loaded (it runs threads a fork must not copy; spawned
    workers import the caller's main module, which must then guard its code with `__main__`)."""
    if workers <= 1 or tok.kind == "bytes":  # bytes: a copy, faster here than sending it to a worker
        for docs, progress in chunks:
            yield encode_documents(tok, docs), progress
        return
    method = "spawn" if "jax" in sys.modules else "fork"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (tok,)) as pool:
        pending: deque = deque()
        for docs, progress in chunks:
            pending.append((pool.apply_async(_worker_encode, (docs,)), progress))
            if len(pending) > 2 * workers:
                r, p = pending.popleft()
                yield r.get(), p
        while pending:
            r, p = pending.popleft()
            yield r.get(), p


def prepare(inputs: Sequence[str | os.PathLike], out_path: str | os.PathLike, *,
            tokenizer: str | os.PathLike | Tokenizer = "bytes", field: str = "text", workers: int | None = None,
            glob: str = DEFAULT_GLOB, max_bytes: int | None = None,
            skip_dirs: Sequence[str] = DEFAULT_SKIP_DIRS, progress: bool = True, verbose: bool = True) -> Path:
    """Tokenize local files (text, JSON Lines, Parquet; see the module docstring) into a token file.

    `tokenizer`: a `Tokenizer` or a spec for `load_tokenizer` ("bytes", tokenizer.json, HF checkpoint
    directory, tiktoken name). `workers`: tokenizing processes (default `default_workers()`; 1 = in
    this process); the output is the same for any number. `max_bytes` caps the text taken: the first
    `max_bytes` bytes of the documents in order. Returns the .bin path.
    """
    from tqdm.auto import tqdm

    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} is invalid: must be > 0 (None for no cap)")
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: must be an int >= 1")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    tok.separator(np.zeros(0, np.int32))  # a tokenizer with neither EOS nor BOS fails before any reading
    files = collect_files(inputs, glob, skip_dirs)
    if not files:
        raise ValueError(f"no input files matched {glob!r} under {[str(i) for i in inputs]}")
    total = sum(f.stat().st_size for f in files)
    total = total if max_bytes is None else min(total, max_bytes)
    with TokenWriter(out_path, tok.vocab_size, tok.meta()) as w, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for ids, nbytes in _encoded(tok, _chunks(files, field, max_bytes, w.sources), workers):
            w.write(ids)
            bar.update(nbytes)
    if verbose:
        mb = w.num_tokens * w.dtype.itemsize / 1e6
        print(f"prepared {w.bin_path}: {len(w.sources)} files, {w.num_tokens:,} tokens, {mb:.1f} MB, "
              f"tokenizer {describe(tok.meta())}", file=sys.stderr)
    return w.bin_path
