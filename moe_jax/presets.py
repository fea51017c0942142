"""YAML presets (experiments/configs/*.yaml) and `section.key=value` overrides -> a validated `Config`."""
from __future__ import annotations

import ast
import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml

from moe_jax.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"

SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "train": TrainConfig, "parallel": ParallelConfig}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(section: str, key: str, known: Sequence[str]) -> ValueError:
    hint = difflib.get_close_matches(key, known, n=1)
    dym = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {sorted(known)}"
    return ValueError(f"unknown key {section}.{key!s}{dym}")


def _check_keys(section: str, values: dict) -> None:
    known = [k for k in _field_names(SECTIONS[section]) if k != "moe"]
    for k in values:
        if k not in known:
            raise _unknown(section, k, known)


def _parse_value(text: str) -> Any:
    """Parse an override value: YAML scalars/lists (`true`, `null`, `1e-3`, `[0,1,1]`) or Python
    expressions of literals, e.g. Megatron's `([0]*3+[1]*5)`."""
    try:
        value = yaml.safe_load(text) if text.strip() else text
        if not isinstance(value, str):
            return value
    except yaml.YAMLError:
        pass
    try:
        node = ast.parse(text, mode="eval")
        allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.List, ast.Tuple, ast.Constant,
                   ast.Load, ast.UnaryOp, ast.USub)
        if all(isinstance(n, allowed) for n in ast.walk(node)):
            return eval(compile(node, "<override>", "eval"), {"__builtins__": {}})  # literals only
    except SyntaxError:
        pass
    return text


def _coerce_layer_freq(v: Any) -> Any:
    if isinstance(v, str):
        v = _parse_value(v)
    return tuple(v) if isinstance(v, list) else v


def apply_overrides(raw: dict[str, dict], overrides: Sequence[str]) -> dict[str, dict]:
    """Apply `section.key=value` (or unambiguous bare `key=value`) strings to a raw section dict."""
    raw = {s: dict(v or {}) for s, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. moe.router_topk=4)")
        key, text = item.split("=", 1)
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise _unknown("<section>", section, list(SECTIONS))
        else:
            owners = [s for s, cls in SECTIONS.items() if key in _field_names(cls) and key != "moe"]
            if not owners:
                all_keys = sorted({k for cls in SECTIONS.values() for k in _field_names(cls)})
                raise _unknown("<any>", key, all_keys)
            if len(owners) > 1:
                raise ValueError(f"override key {key!r} is ambiguous; write one of "
                                 f"{[o + '.' + key for o in owners]}")
            section, name = owners[0], key
        _check_keys(section, {name: None})
        raw.setdefault(section, {})[name] = _parse_value(text)
    return raw


def build_config(raw: dict[str, dict]) -> Config:
    """Build a validated `Config` from section dicts (`model`, `moe`, `train`, `parallel`)."""
    for s in raw:
        if s not in SECTIONS:
            raise _unknown("<section>", s, list(SECTIONS))
    for s, values in raw.items():
        _check_keys(s, values or {})
    moe_raw = raw.get("moe")
    moe = None
    if moe_raw is not None:
        moe_raw = dict(moe_raw)
        if "layer_freq" in moe_raw:
            moe_raw["layer_freq"] = _coerce_layer_freq(moe_raw["layer_freq"])
        moe = MoEConfig(**moe_raw)
    model = ModelConfig(**(raw.get("model") or {}), moe=moe)
    return Config(model=model, train=TrainConfig(**(raw.get("train") or {})),
                  parallel=ParallelConfig(**(raw.get("parallel") or {})))


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(name, names, n=1)
        raise ValueError(f"unknown preset {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f"; available: {names}")
    return p


def load_raw(name: str) -> dict[str, dict]:
    with open(preset_path(name)) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"preset {name!r} must be a mapping of sections {list(SECTIONS)}")
    return raw


def load_config(name: str = "tiny_moe", overrides: Sequence[str] = ()) -> Config:
    """Load a preset (name under experiments/configs/ or a .yaml path) and apply overrides."""
    raw = load_raw(name)
    for s in raw:
        if s not in SECTIONS:
            raise _unknown("<section>", s, list(SECTIONS))
    return build_config(apply_overrides(raw, overrides))


def to_dict(cfg: Config) -> dict[str, dict]:
    """Inverse of `build_config` (for saving a run's config next to its outputs)."""
    model = dataclasses.asdict(cfg.model)
    moe = model.pop("moe")
    if moe is not None and isinstance(moe.get("layer_freq"), tuple):
        moe["layer_freq"] = list(moe["layer_freq"])
    out = {"model": model, "train": dataclasses.asdict(cfg.train),
           "parallel": dataclasses.asdict(cfg.parallel)}
    if moe is not None:
        out["moe"] = moe
    return out
