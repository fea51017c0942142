"""Tokenizers behind one interface: the byte tokenizer (`moe_jax.tokens`), a Hugging Face
`tokenizer.json` (the `tokenizers` library) and a `tiktoken` encoding; `load_tokenizer` picks one from
a spec, `meta()` is what token files and runs record, and a run keeps a copy in `<run>/tokenizer/`.

    tok = load_tokenizer("bytes" | "path/tokenizer.json" | "hf_checkpoint_dir" | "cl100k_base")
    ids = tok.encode(text)          # int32, no special tokens added
    text = tok.decode(ids)

`tokenizers` and `tiktoken` are optional (`pip install -e ".[data]"`), imported when needed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moe_jax import tokens

META_NAME = "meta.json"          # a saved tokenizer directory: meta.json + tokenizer.json | ranks.tiktoken
HF_FILE = "tokenizer.json"
TIKTOKEN_FILE = "ranks.tiktoken"
RUN_SUBDIR = "tokenizer"
# special tokens tried, in order, when nothing names the EOS / BOS token (a bare tokenizer.json)
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|bos|>")
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base")  # without tiktoken


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this tokenizer needs the `{module}` package: pip install -e \".[data]\" "
                          f"(or pip install {module})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """text <-> int32 ids. Attributes: kind ("bytes" | "hf" | "tiktoken"), name, vocab_size,
    eos_id, bos_id (None where the tokenizer has no such token)."""

    kind: str
    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str | bytes) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        """ids -> text; ids outside [0, vocab_size) (a larger model vocabulary) become U+FFFD."""
        t = np.asarray(ids).reshape(-1).astype(np.int64)
        out, start = [], 0
        for j in np.flatnonzero((t < 0) | (t >= self.vocab_size)):
            out += [self._decode(t[start:j].tolist()), "\ufffd"]
            start = j + 1
        out.append(self._decode(t[start:].tolist()))
        return "".join(out)

    def meta(self) -> dict:
        """What token files and runs record: kind, name, vocab_size, eos_id, bos_id, sha256 (of the
        tokenizer's file; None for bytes), plus what it takes to rebuild it."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "sha256": None}

    def separator(self, doc_ids: np.ndarray) -> np.ndarray:
        """A document's ids followed by EOS, or (no EOS token) preceded by BOS."""
        if self.eos_id is not None:
            return np.append(doc_ids, np.int32(self.eos_id)).astype(np.int32)
        if self.bos_id is not None:
            return np.insert(doc_ids, 0, np.int32(self.bos_id)).astype(np.int32)
        raise ValueError(f"tokenizer {describe(self.meta())} has neither an EOS nor a BOS token to separate "
                         f"documents with")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 0..255) and EOS = 256: `moe_jax.tokens`' tokenizer."""

    kind, name, vocab_size, eos_id, bos_id = "bytes", "bytes", tokens.BYTE_VOCAB, tokens.EOS, None

    def encode(self, text: str | bytes) -> np.ndarray:
        return tokens.encode(text).astype(np.int32)

    def _decode(self, ids: list[int]) -> str:
        return tokens.decode(ids)

    def meta(self) -> dict:
        return dict(tokens.BYTES_TOKENIZER)


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`, run by the `tokenizers` library)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, eos: str | int | None = None,
                 bos: str | int | None = None):
        lib = _need("tokenizers")
        self.path = Path(path).resolve()
        raw = self.path.read_bytes()
        self.sha256 = sha256_bytes(raw)
        try:
            self.tok = lib.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exception
            raise ValueError(f"tokenizer {self.path} is not a valid Hugging Face tokenizer.json: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.name = name or str(path)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_id, self.bos_id = self._special(eos, EOS_NAMES), self._special(bos, BOS_NAMES)

    def _special(self, given: str | int | None, names: tuple[str, ...]) -> int | None:
        if isinstance(given, int):
            return given
        for t in ([given] if given is not None else names):
            i = self.tok.token_to_id(t)
            if i is not None:
                return i
        return None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def meta(self) -> dict:
        return {**super().meta(), "sha256": self.sha256, "path": str(self.path)}


def _ranks_bytes(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's own `.tiktoken` format: `base64(token) rank` per line, by rank."""
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))


class TiktokenTokenizer(Tokenizer):
    """A `tiktoken.Encoding` (a registered name such as "cl100k_base", or one built locally)."""

    kind = "tiktoken"

    def __init__(self, enc: Any, path: str | os.PathLike | None = None):
        self.enc, self.name = enc, enc.name
        self.path = None if path is None else Path(path).resolve()  # a saved directory it came from
        self.vocab_size = enc.n_vocab
        special = enc._special_tokens  # noqa: SLF001 - tiktoken exposes no public getter for the mapping
        self.eos_id = next((special[t] for t in EOS_NAMES if t in special), None)
        self.bos_id = next((special[t] for t in BOS_NAMES if t in special), None)
        self._ranks = None

    def ranks_file(self) -> bytes:
        if self._ranks is None:
            self._ranks = _ranks_bytes(self.enc._mergeable_ranks)  # noqa: SLF001
        return self._ranks

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.int32)

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def meta(self) -> dict:
        meta = {**super().meta(), "sha256": sha256_bytes(self.ranks_file()), "pat_str": self.enc._pat_str,  # noqa: SLF001
                "special_tokens": dict(self.enc._special_tokens)}  # noqa: SLF001
        return meta if self.path is None else {**meta, "path": str(self.path)}

    def __getstate__(self):  # pickled into worker processes without the cached ranks file
        return {**self.__dict__, "_ranks": None}


def describe(meta: dict) -> str:
    """One phrase naming a recorded tokenizer: `hf 'tok.json' (vocab 293, sha256 1a2b3c4d5e6f)`."""
    h = meta.get("sha256")
    return (f"{meta.get('kind')} {meta.get('name')!r} (vocab {meta.get('vocab_size')}"
            + (f", sha256 {h[:12]}" if h else "") + ")")


def _tiktoken_names() -> list[str]:
    try:
        import tiktoken
    except ImportError:
        return []
    return tiktoken.list_encoding_names()


def _tiktoken(name: str) -> TiktokenTokenizer:
    tiktoken = _need("tiktoken")
    try:
        return TiktokenTokenizer(tiktoken.get_encoding(name))
    except Exception as e:  # noqa: BLE001 - a failed download raises whatever `requests` raises
        raise ValueError(f"tiktoken encoding {name!r} is not in tiktoken's cache and could not be downloaded "
                         f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a cache that holds it") from None


def _special_token(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _hf_dir(d: Path, spec: str) -> HFTokenizer:
    """An HF checkpoint directory: tokenizer.json; EOS/BOS from tokenizer_config.json,
    special_tokens_map.json or config.json, else the usual token names."""
    if not (d / HF_FILE).is_file():
        slow = [p.name for p in d.glob("*") if p.name in ("tokenizer.model", "vocab.json", "spiece.model")]
        hint = (f" (it has {', '.join(slow)}: save a fast tokenizer with transformers' "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir))" if slow else "")
        raise ValueError(f"tokenizer directory {d} has no {HF_FILE} and no {META_NAME}{hint}")
    special: dict[str, Any] = {}
    for fname in ("config.json", "special_tokens_map.json", "tokenizer_config.json"):  # later wins
        try:
            cfg = json.loads((d / fname).read_text())
        except (OSError, ValueError):
            continue
        for k in ("eos", "bos"):
            tok = _special_token(cfg.get(f"{k}_token"))
            tid = cfg.get(f"{k}_token_id")
            if tok is not None:
                special[k] = tok
            elif isinstance(tid, int) and k not in special:
                special[k] = tid
            elif isinstance(tid, list) and tid and isinstance(tid[0], int) and k not in special:
                special[k] = tid[0]
    return HFTokenizer(d / HF_FILE, name=spec, eos=special.get("eos"), bos=special.get("bos"))


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """"bytes", a tokenizer.json, an HF checkpoint directory, a saved tokenizer directory (meta.json,
    e.g. `<run>/tokenizer`, or the run directory), or a tiktoken encoding name. Else one ValueError."""
    s = str(spec)
    if s == "bytes":
        return ByteTokenizer()
    p = Path(s).expanduser()
    if p.is_dir():
        for d in (p, p / RUN_SUBDIR):  # a saved tokenizer, or a run directory holding one
            if (d / META_NAME).is_file():
                return tokenizer_from_meta(_read_meta(d / META_NAME), base_dir=d)
        return _hf_dir(p, s)
    if p.is_file():
        if p.suffix == ".json":
            return HFTokenizer(p, name=s)
        raise ValueError(f"tokenizer {s!r} is a file but not a tokenizer.json")
    names = _tiktoken_names()
    if s in names or s in TIKTOKEN_NAMES:
        return _tiktoken(s)
    kinds = f"a tiktoken encoding name ({', '.join(names)})" if names else \
        "a tiktoken encoding name (tiktoken is not installed: pip install -e \".[data]\")"
    raise ValueError(f"unknown tokenizer {s!r}: not a file or directory; use 'bytes', a tokenizer.json, a "
                     f"directory holding a Hugging Face checkpoint's tokenizer files, or {kinds}")


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer record {path} cannot be read: {e}") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ValueError(f"tokenizer record {path} has no 'kind'")
    return meta


def tokenizer_from_meta(meta: dict, base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Rebuild a recorded tokenizer: from the files in `base_dir` (a saved tokenizer directory) when
    given, else from where the record says (the tokenizer.json path, the tiktoken name); its sha256
    must match the record."""
    kind, base = meta.get("kind"), Path(base_dir) if base_dir is not None else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        path = base / HF_FILE if base is not None and (base / HF_FILE).is_file() else Path(meta.get("path", ""))
        if not path.is_file():
            raise ValueError(f"the tokenizer file of {describe(meta)} is gone: {path} not found")
        tok = HFTokenizer(path, name=meta.get("name"))
        tok.eos_id, tok.bos_id = meta.get("eos_id"), meta.get("bos_id")  # the record's, even if None
    elif kind == "tiktoken":
        if base is None and meta.get("path"):  # built locally and saved: rebuild from that directory
            base = Path(meta["path"])
            if not (base / TIKTOKEN_FILE).is_file():
                raise ValueError(f"the tokenizer file of {describe(meta)} is gone: {base / TIKTOKEN_FILE} not found")
        if base is not None and (base / TIKTOKEN_FILE).is_file():
            tiktoken = _need("tiktoken")
            from tiktoken.load import load_tiktoken_bpe
            enc = tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"],
                                    mergeable_ranks=load_tiktoken_bpe(str(base / TIKTOKEN_FILE)),
                                    special_tokens=meta.get("special_tokens", {}))
            tok = TiktokenTokenizer(enc, path=base)
        else:
            tok = _tiktoken(meta.get("name"))
        path = base / TIKTOKEN_FILE if base is not None else meta.get("name")
    else:
        raise ValueError(f"tokenizer record has kind={kind!r}; this code knows 'bytes', 'hf', 'tiktoken'")
    if meta.get("sha256") and tok.meta()["sha256"] != meta["sha256"]:
        raise ValueError(f"tokenizer {path} has changed since it was recorded as {describe(meta)} "
                         f"(now sha256 {tok.meta()['sha256'][:12]})")
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write `tok` into `directory` (meta.json + tokenizer.json | ranks.tiktoken), so that
    `load_tokenizer(directory)` rebuilds it without the original files. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {META_NAME: json.dumps(tok.meta(), indent=1).encode()}
    if isinstance(tok, HFTokenizer):
        files[HF_FILE] = tok.path.read_bytes()
    elif isinstance(tok, TiktokenTokenizer):
        files[TIKTOKEN_FILE] = tok.ranks_file()
    (d / META_NAME).unlink(missing_ok=True)  # meta.json goes last: present means complete
    for name in sorted(files, key=lambda n: n == META_NAME):
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, d / name)
    return d


def save_run_tokenizer(run_dir: str | os.PathLike, tok: Tokenizer) -> None:
    """Keep the run's tokenizer in `<run_dir>/tokenizer/` (generate/evaluate read it from there)."""
    save_tokenizer(tok, Path(run_dir) / RUN_SUBDIR)


def record_run_tokenizer(run_dir: str | os.PathLike, meta: dict) -> str | None:
    """Save the tokenizer a token file records (`meta`) as the run's. Where its files cannot be found
    any more, only the record is kept; the returned warning says so (else None). A run that keeps this
    tokenizer already (a resume) is left as it is."""
    recorded = run_tokenizer_meta(run_dir)
    if recorded is not None and same_tokenizer(recorded, meta):
        try:
            run_tokenizer(run_dir)
            return None
        except (ValueError, ImportError):
            pass  # its files are damaged: save it again
    try:
        tok = tokenizer_from_meta(meta)
    except (ValueError, ImportError) as e:
        d = Path(run_dir) / RUN_SUBDIR
        d.mkdir(parents=True, exist_ok=True)
        (d / META_NAME).write_text(json.dumps(meta, indent=1))
        return (f"warning: {e}; {d} keeps the tokenizer's record only (generate/evaluate will need the "
                f"tokenizer's files)")
    save_run_tokenizer(run_dir, tok)
    return None


def run_tokenizer_meta(run_dir: str | os.PathLike) -> dict | None:
    """The tokenizer record of a run, or None when it has none (synthetic data; runs before records)."""
    p = Path(run_dir) / RUN_SUBDIR / META_NAME
    return _read_meta(p) if p.is_file() else None


def run_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    """The run's tokenizer: the one saved in `<run_dir>/tokenizer/`, else bytes (embedded or
    synthetic data, or a run from before tokenizers were recorded)."""
    d = Path(run_dir) / RUN_SUBDIR
    meta = run_tokenizer_meta(run_dir)
    return ByteTokenizer() if meta is None else tokenizer_from_meta(meta, base_dir=d)


def same_tokenizer(a: dict, b: dict) -> bool:
    """Same kind, vocabulary size, EOS/BOS ids and (where both record one) file hash."""
    keys = ("kind", "vocab_size", "eos_id", "bos_id")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    return not (a.get("sha256") and b.get("sha256")) or a["sha256"] == b["sha256"]


def check_same_tokenizer(expected: dict, got: dict, what: str, expected_what: str = "the expected") -> None:
    """ValueError naming both when `got` is not the `expected` tokenizer: "`what` uses tokenizer <got>,
    not `expected_what` <expected>"."""
    if not same_tokenizer(expected, got):
        raise ValueError(f"{what} uses tokenizer {describe(got)}, not {expected_what} {describe(expected)}")
