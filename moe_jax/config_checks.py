"""Validation helpers of the config dataclasses: every invalid value raises one `ValueError` naming the
field, the value and what would be valid; field types are read from the dataclass annotations."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence


def fail(cls: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


def choice(cls: str, field: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        fail(cls, field, value, f"must be one of {list(options)}")


# Field types, read from the annotations ("int", "float | None", "int | tuple[int, ...]", ...).
_TYPE_CHECKS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(_TYPE_CHECKS["int"](x) for x in v),
}
_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a finite number",
               "str": "a string", "tuple[int, ...]": "a list of integers", "None": "null"}


def field_kinds(field: dataclasses.Field) -> list[str]:
    """The alternatives of a field's annotation: `float | None` -> ["float", "None"]."""
    return [t.strip() for t in str(field.type).split("|")]


def describe_kinds(kinds: Sequence[str]) -> str:
    return " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)


def check_types(cls: str, obj: Any) -> None:
    """Every scalar field holds a value of its annotated type (an int passes as a float); nested
    config fields are left to their own checks."""
    for f in dataclasses.fields(obj):
        kinds, v = field_kinds(f), getattr(obj, f.name)
        if not any(k in _TYPE_CHECKS for k in kinds) or (v is None and "None" in kinds):
            continue
        if not any(_TYPE_CHECKS[k](v) for k in kinds if k in _TYPE_CHECKS):
            fail(cls, f.name, v, f"must be {describe_kinds(kinds)}")


def positive(cls: str, obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(cls, f, v, "must be a positive integer")
