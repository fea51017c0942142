"""Hugging Face import/export: `load_hf(path) -> (ModelConfig, GPT)` and `save_hf(model, cfg, path)`.

Local directories only (`config.json` + `model.safetensors`, or sharded with
`model.safetensors.index.json`), read and written with the `safetensors` library; no torch needed.
Architectures: Llama, Mistral, Qwen2, Qwen3 (dense); Mixtral; Qwen2-MoE (shared expert + sigmoid
gate); Qwen3-MoE; DeepSeek-V2/V3 (MLA, with V3's MTP modules, which transformers itself drops, read and
written straight from/to the safetensors). RoPE default, linear or YaRN. Anything else — another
`model_type` or rope type, sliding windows that bind, biases we do not have, unknown tensors — fails with
a ValueError that names the field or tensor. Config mapping: `hf_config.py` (`hf_deepseek.py`); tensor
names and layouts: `hf_tensors.py`.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from moe_jax.config import ModelConfig
from moe_jax.convert.hf_config import config_from_hf, config_to_hf, pick_arch
from moe_jax.convert.hf_tensors import mtp_tensor_map, tensor_map
from moe_jax.model import GPT, stack_layers, unstack_layers

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# reading / writing safetensors

class _Reader:
    """Tensors of a (possibly sharded) safetensors checkpoint, tracking which were used."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        self._open: dict[Path, Any] = {}
        if index.exists():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise ValueError(f"{index} has no 'weight_map' mapping of tensor names to files")
            self.where = {k: path / f for k, f in wm.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors (or model.safetensors.index.json) in {path}")
            self.where = {}
            for f in files:
                self.where.update({k: f for k in self._file(f).keys()})
        self.used: set[str] = set()

    def _file(self, f: Path):
        if f not in self._open:
            try:
                self._open[f] = safe_open(f, "flax")
            except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
                raise ValueError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                 f"re-download or re-export it") from None
        return self._open[f]

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
        """The tensor `name`; with `shape`, checked against it first (the one config.json implies)."""
        if name not in self.where:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint")
        f = self._file(self.where[name])
        self.used.add(name)
        try:
            if shape is not None:
                got = tuple(f.get_slice(name).get_shape())
                if got != tuple(shape):
                    raise ValueError(f"tensor {name} in {self.where[name]} has shape {got}, but config.json "
                                     f"implies {tuple(shape)} (hidden_size, heads, intermediate sizes, vocab)")
            return f.get_tensor(name)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 — a truncated or damaged file
            raise ValueError(f"tensor {name} in {self.where[name]} cannot be read ({type(e).__name__}: "
                             f"{e}); re-download or re-export the checkpoint") from None

    def unused(self) -> list[str]:
        return sorted(k for k in self.where if k not in self.used and not k.endswith(IGNORED_SUFFIXES))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} in {path.parent} (not a Hugging Face checkpoint directory?)") \
            from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


def _gate_up_down(r: _Reader, names: dict, d: int, f: int) -> tuple:
    """One MLP's HF gate [F, D], up [F, D], down [D, F]."""
    return r.get(names["gate"], (f, d)), r.get(names["up"], (f, d)), r.get(names["down"], (d, f))


def _read_experts(r: _Reader, names: list[dict], prefix: str, d: int, f: int):
    fused = prefix.rsplit(".experts.", 1)[0] + ".experts"
    if r.has(f"{fused}.gate_up_proj"):  # transformers >= 5 in-memory layout: [E, 2F, D], [E, D, F]
        e = len(names)
        gu, down = r.get(f"{fused}.gate_up_proj", (e, 2 * f, d)), r.get(f"{fused}.down_proj", (e, d, f))
        w1 = jnp.stack([gu[:, :f].transpose(0, 2, 1), gu[:, f:].transpose(0, 2, 1)], axis=2)
        return w1, down.transpose(0, 2, 1)
    gates, ups, downs = zip(*(_gate_up_down(r, n, d, f) for n in names))
    w1 = jnp.stack([jnp.stack(gates).transpose(0, 2, 1), jnp.stack(ups).transpose(0, 2, 1)], axis=2)
    return w1, jnp.stack(downs).transpose(0, 2, 1)


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value, dtype) -> None:
    d = tree
    for k in path[:-1]:
        d = d[k]
    old = d[path[-1]]
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"tensor for {'/'.join(map(str, path))} has shape {tuple(value.shape)}, "
                         f"the config implies {tuple(old.shape)}")
    d[path[-1]] = jnp.asarray(value, dtype)


def _paths(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _load_entries(r: _Reader, pure: dict, entries: list, dtype: str, filled: set) -> None:
    """Read `entries` (see `tensor_map`) from `r` into the pure state dict `pure`, noting what was filled."""
    for name, ours, conv in entries:
        if conv == "mlp":
            d, _, f = _get(pure, ours + ("w1_DnF",)).shape
            g, u, dn = _gate_up_down(r, name, d, f)
            _set(pure, ours + ("w1_DnF",), jnp.stack([g.T, u.T], axis=1), dtype)
            _set(pure, ours + ("w2_FD",), dn.T, dtype)
            filled.update({ours + ("w1_DnF",), ours + ("w2_FD",)})
        elif conv == "experts":
            _, d, _, f = _get(pure, ours + ("w1_EDnF",)).shape
            w1, w2 = _read_experts(r, name, name[0]["gate"], d, f)
            _set(pure, ours + ("w1_EDnF",), w1, dtype)
            _set(pure, ours + ("w2_EFD",), w2, dtype)
            filled.update({ours + ("w1_EDnF",), ours + ("w2_EFD",)})
        elif conv == "bias":  # router state: stays float32 whatever the weights' dtype
            _set(pure, ours, r.get(name, _get(pure, ours).shape), "float32")
            filled.add(ours)
        elif conv[0] == "copy":  # an MTP module's copy of the main embedding / head: must be equal
            if not np.array_equal(np.asarray(r.get(name)), np.asarray(r.get(conv[1]))):
                raise ValueError(f"tensor {name} differs from {conv[1]}: the MTP modules share the main "
                                 f"model's embedding and LM head here")
        elif conv[0] == "multi":  # one HF tensor <-> several of ours
            hf_shape = jax.eval_shape(conv[2], *(_get(pure, o) for o in ours)).shape
            for o, v in zip(ours, conv[1](r.get(name, hf_shape))):
                _set(pure, o, v, dtype)
                filled.add(o)
        else:
            hf_shape = jax.eval_shape(conv[1], _get(pure, ours)).shape  # what config.json implies
            _set(pure, ours, conv[0](r.get(name, hf_shape)), dtype)
            filled.add(ours)


def load_hf(path: str | Path, *, dtype: str = "float32") -> tuple[ModelConfig, GPT]:
    """Load a local Hugging Face checkpoint directory into our GPT (weights cast to `dtype`)."""
    path = Path(path)
    config_file = path / "config.json"
    hf = _read_json(config_file)
    try:
        cfg = config_from_hf(hf, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    arch, interleave = hf["model_type"], hf.get("rope_interleave", True)
    r = _Reader(path)
    if cfg.mtp_num_layers and not r.has(f"model.layers.{cfg.num_layers}.eh_proj.weight"):
        warnings.warn(f"{path}: config.json names {cfg.mtp_num_layers} MTP layers but the checkpoint holds none "
                      f"(transformers' save_pretrained drops them): loaded with mtp_num_layers=0", stacklevel=2)
        cfg = dataclasses.replace(cfg, mtp_num_layers=0)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = unstack_layers(state.to_pure_dict(), cfg)  # per-layer `blocks` view of the stacks
    filled: set = set()
    entries = tensor_map(cfg, arch, rope_interleave=interleave)
    _load_entries(r, pure, entries + mtp_tensor_map(cfg, arch, rope_interleave=interleave), dtype, filled)
    if r.unused():
        raise ValueError(f"{path}: {len(r.unused())} tensors have no place in a {arch} model as configured "
                         f"(an unsupported feature?): {r.unused()[:10]}")
    flat_paths = set(_paths(pure))
    missing = sorted("/".join(map(str, p)) for p in flat_paths if p not in filled)
    if missing:
        raise ValueError(f"{path}: no tensors for {missing[:10]}")
    state.replace_by_pure_dict(stack_layers(pure, cfg))
    return cfg, nnx.merge(graphdef, state)


def _save_entries(get, entries: list, tensors: dict) -> None:
    """HF tensors for `entries` (see `tensor_map`), reading ours with `get(path)`, into `tensors`."""
    for name, ours, conv in entries:
        if conv == "mlp":
            w1, w2 = get(ours + ("w1_DnF",)), get(ours + ("w2_FD",))
            tensors.update({name["gate"]: w1[:, 0].T, name["up"]: w1[:, 1].T, name["down"]: w2.T})
        elif conv == "experts":
            w1, w2 = get(ours + ("w1_EDnF",)), get(ours + ("w2_EFD",))
            for e, nm in enumerate(name):
                tensors.update({nm["gate"]: w1[e, :, 0].T, nm["up"]: w1[e, :, 1].T, nm["down"]: w2[e].T})
        elif conv == "bias":  # a model without expert bias exports zeros (the same routing)
            try:
                tensors[name] = get(ours)
            except KeyError:
                tensors[name] = np.zeros(get(ours[:-1] + ("w_DE",)).shape[-1], np.float32)
        elif conv[0] == "copy":
            tensors[name] = tensors[conv[1]]
        elif conv[0] == "multi":
            tensors[name] = np.asarray(conv[2](*(get(o) for o in ours)))
        else:
            tensors[name] = np.asarray(conv[1](get(ours)))


def save_hf(model: GPT, cfg: ModelConfig, path: str | Path, *, arch: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + safetensors, sharded past
    `max_shard_bytes`, per-expert tensor names that transformers 4 and 5 both load)."""
    arch = arch or pick_arch(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pure = unstack_layers(nnx.state(model).to_pure_dict(), cfg)

    def get(p):
        d = pure
        for k in p:
            d = d[k]
        return np.asarray(jax.device_get(d), np.float32)

    tensors: dict[str, np.ndarray] = {}
    _save_entries(get, tensor_map(cfg, arch) + mtp_tensor_map(cfg, arch), tensors)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nbytes
    shards.append(cur)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file({k: jnp.asarray(v) for k, v in shards[0].items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: jnp.asarray(v) for k, v in sh.items()}, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in sh})
        total = int(sum(v.nbytes for v in tensors.values()))
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, arch), indent=2))
    return path

