"""YAML presets (package data: `moe_jax/configs/*.yaml`) and `section.key=value` overrides -> a
validated `Config`.

Sections: `model`, `moe`, `train`, `parallel`; `moe.dispatcher` and `model.rope_scaling` are nested
mappings (`moe.dispatcher.type=alltoall`, `model.rope_scaling.factor=4`, `model.rope_scaling=null`).
Megatron's and earlier spellings are accepted and moved to their place: `moe.token_dispatcher_type` ->
`moe.dispatcher.type`, `parallel.moe_overlap_chunks` -> `moe.dispatcher.overlap_chunks`,
`parallel.moe_buffer_factor` -> `moe.dispatcher.buffer_factor`.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml

from moe_jax.config import (Config, DispatchConfig, ModelConfig, MoEConfig, ParallelConfig,
                            RopeScalingConfig, TrainConfig)
from moe_jax.config_checks import describe_kinds, field_kinds

PRESET_DIR = Path(__file__).resolve().parent / "configs"

SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "train": TrainConfig, "parallel": ParallelConfig}
# (section, field) -> the dataclass of its mapping (a field that may be None also takes `field=null`)
NESTED = {("moe", "dispatcher"): DispatchConfig, ("model", "rope_scaling"): RopeScalingConfig}
# other spellings of a field -> (section, its path there)
ALIASES = {("moe", "token_dispatcher_type"): ("moe", "dispatcher.type"),
           ("parallel", "moe_overlap_chunks"): ("moe", "dispatcher.overlap_chunks"),
           ("parallel", "moe_buffer_factor"): ("moe", "dispatcher.buffer_factor")}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _keys(section: str) -> list[str]:
    """Every key a section takes: its fields, `field.sub` for nested ones, and the aliases."""
    out = []
    for f in dataclasses.fields(SECTIONS[section]):
        name = f.name
        if name == "moe":
            continue
        nested = NESTED.get((section, name))
        out += [f"{name}.{sub}" for sub in _field_names(nested)] if nested else [name]
        if nested and "None" in field_kinds(f):
            out.append(name)
    return out + [k for s, k in ALIASES if s == section]


def _unknown(section: str, key: str, known: Sequence[str]) -> ValueError:
    hint = difflib.get_close_matches(key, known, n=1)
    dym = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {sorted(known)}"
    return ValueError(f"unknown key {section}.{key!s}{dym}")


def _check_keys(section: str, values: dict) -> None:
    known = _keys(section)
    for k, v in values.items():
        nested = NESTED.get((section, k))
        if nested is not None:
            if v is None and k in known:
                continue
            if not isinstance(v, dict):
                raise ValueError(f"{section}.{k} must be a mapping of {_field_names(nested)}, "
                                 f"got {v!r}")
            for sub in v:
                if f"{k}.{sub}" not in known:
                    raise _unknown(section, f"{k}.{sub}", known)
        elif k not in known:
            raise _unknown(section, k, known)


def _set(raw: dict, section: str, key: str, value: Any) -> None:
    """raw[section][key] = value, with `key` a field or `field.sub` of a nested mapping."""
    sec = raw.setdefault(section, {})
    if sec is None:
        sec = raw[section] = {}
    head, _, sub = key.partition(".")
    if sub:
        sec[head] = dict(sec.get(head) or {})
        sec[head][sub] = value
    else:
        sec[key] = value


def locate(key: str) -> tuple[str, str]:
    """(section, key there) of an override key: `section.key`, `section.field.sub`, or a bare key
    (or `field.sub`) that exactly one section has; an alias resolves to its field."""
    head, _, rest = key.partition(".")
    if head in SECTIONS and rest:
        section, name = head, rest
    else:
        owners = {s: k for s in SECTIONS for k in _keys(s) if k == key or k.endswith("." + key)}
        if not owners:
            if rest:
                raise _unknown("<section>", head, list(SECTIONS))
            raise _unknown("<any>", key, sorted({k for s in SECTIONS for k in _keys(s)}))
        if len(owners) > 1:
            raise ValueError(f"override key {key!r} is ambiguous; write one of "
                             f"{[s + '.' + k for s, k in owners.items()]}")
        section, name = next(iter(owners.items()))
    if name not in _keys(section):
        raise _unknown(section, name, _keys(section))
    return ALIASES.get((section, name), (section, name))


def _resolve_aliases(raw: dict) -> dict:
    """Move aliased keys to their field (a clash with the field itself is an error)."""
    raw = {s: (dict(v) if isinstance(v, dict) else v) for s, v in raw.items()}
    for (section, key), (to_section, path) in ALIASES.items():
        values = raw.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        head, _, sub = path.partition(".")
        if sub in ((raw.get(to_section) or {}).get(head) or {}):
            raise ValueError(f"{section}.{key} and {to_section}.{path} name the same setting; "
                             f"give only {to_section}.{path}")
        if to_section not in raw or raw[to_section] is None:
            default = getattr(DispatchConfig(), sub)
            if value == default:  # an earlier dense run's saved default: nothing to move
                continue
            raise ValueError(f"{section}.{key}={value!r} needs a `{to_section}` section "
                             f"(it sets {to_section}.{path})")
        _set(raw, to_section, path, value)
    return raw


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


def _field(section: str, name: str) -> tuple[str, dataclasses.Field]:
    """(`Class.field` as errors name it, the dataclass field) of a located override key."""
    cls, (head, _, sub) = SECTIONS[section], name.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if sub:
        nested = NESTED[(section, head)]
        return f"{cls.__name__}.{head}.{sub}", {f.name: f for f in dataclasses.fields(nested)}[sub]
    return f"{cls.__name__}.{name}", fields[name]


_NULLS = ("null", "none", "~")


def parse_typed(text: str, kinds: Sequence[str], where: str) -> Any:
    """An override's text as a value of the field's type (`kinds`, from `config.field_kinds`):
    booleans only `true`/`false` (any case), strings as written, `null` where None is allowed, numbers
    and lists through `_parse_value`; the config's own validation checks the rest."""
    t = text.strip()
    if "None" in kinds and t.lower() in _NULLS:
        return None
    if "bool" in kinds and t.lower() in ("true", "false"):
        return t.lower() == "true"
    if "bool" in kinds and "str" not in kinds:
        raise ValueError(f"{where}={text!r} is invalid: must be {describe_kinds(kinds)}")
    if set(kinds) <= {"str", "bool", "None"}:  # e.g. remat: str | bool takes `selective`
        quoted = len(t) >= 2 and t[0] == t[-1] and t[0] in "'\""
        return t[1:-1] if quoted else text
    return _parse_value(text)


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
        section, name = locate(key)
        where, field = _field(section, name)
        _set(raw, section, name, parse_typed(text, field_kinds(field), where))
    return raw


def _check_sections(raw: dict) -> None:
    for s, values in raw.items():
        if s not in SECTIONS:
            raise _unknown("<section>", s, list(SECTIONS))
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"section {s!r} must be a mapping of its keys (e.g. {s}: {{key: value}}), "
                             f"got {values!r}")


def build_config(raw: dict[str, dict]) -> Config:
    """Build a validated `Config` from section dicts (`model`, `moe`, `train`, `parallel`)."""
    _check_sections(raw)
    raw = _resolve_aliases(raw)
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


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    return sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        names = preset_names()
        hint = difflib.get_close_matches(name, names, n=1)
        raise ValueError(f"unknown preset {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f"; available: {names}")
    return p


def load_raw(name: str) -> dict[str, dict]:
    path = preset_path(name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ValueError(f"preset {str(path)!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"preset {str(path)!r} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"preset {str(path)!r} is not valid YAML{at}: {what}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"preset {str(path)!r} must be a mapping of sections {list(SECTIONS)}, "
                         f"got a {type(raw).__name__}")
    _check_sections(raw)
    return raw


def load_config(name: str = "tiny_moe", overrides: Sequence[str] = ()) -> Config:
    """Load a preset (a name from `preset_names()` or a .yaml path) and apply overrides."""
    return build_config(apply_overrides(load_raw(name), overrides))


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
