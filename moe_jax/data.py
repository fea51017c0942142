"""Deterministic, resumable batches over token files (`TokenDataset`), random tokens
(`SyntheticDataset`), and `make_dataset`, which picks one from a `TrainConfig`.

Batches are numpy (`{"inputs": int32[B,S], "targets": int32[B,S]}`); batch `i` depends only on
(seed, i), so resuming at step i reproduces the run exactly. The token-file format, the tokenizer and
corpus preparation live in `moe_jax.tokens` and `moe_jax.prepare` and are re-exported here.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from moe_jax.prepare import collect_files, prepare  # noqa: F401
from moe_jax.tokenizer import describe
from moe_jax.tokens import (BYTE_VOCAB, EOS, EOS_TEXT, TokenFile, TokenFileError, TokenWriter,  # noqa: F401
                            decode, embedded_corpus, encode, resolve_cache_dir, token_paths, write_tokens)


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
            raise TokenFileError(f"the {split} split of {src} has {self.stop - self.start} tokens "
                             f"(of {n}, val_fraction={val_fraction}); it needs at least "
                             f"seq_len+1 = {self.seq_len + 1}: use more text or a smaller train.seq_len")

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
        bin_path, json_path = token_paths(data)
        if not (bin_path.exists() or json_path.exists()):
            raise TokenFileError(f"TrainConfig.data={data!r} is invalid: no token file at {bin_path}; "
                             f"use 'embedded', 'synthetic', or a file made by "
                             f"experiments/prepare_data.py")
        path = bin_path
    f = TokenFile(path)
    if f.vocab_size > vocab_size:
        raise TokenFileError(f"TrainConfig.data={data!r}: the token file's vocab_size={f.vocab_size} is larger "
                         f"than the model's vocab_size={vocab_size} (its tokenizer: "
                         f"{describe(f.tokenizer_meta)}); raise model.vocab_size to at least {f.vocab_size}")
    top = f.max_token()
    if top is not None and top >= vocab_size:
        raise TokenFileError(f"TrainConfig.data={data!r}: {f.bin_path} holds token id {top}, outside the "
                         f"model's vocab_size={vocab_size} (its header claims vocab_size={f.vocab_size}); "
                         f"raise model.vocab_size above {top} or re-create the file")
    return TokenDataset(f, **kw)
