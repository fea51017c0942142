"""Tuning tables for the Pallas kernels: JSON written by experiments/autotune_*.py on the device.

Lookup only (no tuning at import or call time): device kind -> shape class -> config.
"""
from __future__ import annotations

import functools
import json
import pathlib

import jax

_DIR = pathlib.Path(__file__).parent


@functools.lru_cache(maxsize=None)
def _table(name):
    path = _DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def device_key(device=None) -> str:
    device = device or jax.devices()[0]
    kind = device.device_kind.upper()
    for key in ("H200", "H100"):
        if key in kind:
            return key
    return "default"


def shape_class(m, k, n, g) -> str:
    """Coarse class: the group count bucket and whether N (output cols) is small."""
    gcls = "g<=16" if g <= 16 else "g>16"
    ncls = "n<2048" if n < 2048 else "n>=2048"
    return f"{gcls},{ncls}"


def _lookup(kernel, m, k, n, g):
    table = _table("grouped_matmul")
    dev = table.get(device_key(), table.get("default", {}))
    entry = dev.get(kernel, {})
    return entry.get(shape_class(m, k, n, g), entry.get("default", {}))


def fwd_config(m, k, n, g):
    from ops.gmm_pallas import FwdConfig
    cfg = _fit(FwdConfig(**_lookup("fwd", m, k, n, g)), n, "tile_n", 2)
    return cfg


def wgrad_config(m, a, b, g):
    from ops.gmm_pallas import WgradConfig
    cfg = WgradConfig(**_lookup("wgrad", m, a, b, g))
    fa, fb = (2, 1) if cfg.split == "a" else (1, 2)
    return _fit(_fit(cfg, a, "tile_a", fa), b, "tile_b", fb)


def _fit(cfg, dim, field, factor):
    """Halve a tile (not below 64) while it does not divide dim: avoids padding copies."""
    import dataclasses
    t = getattr(cfg, field)
    while dim % (factor * t) and t > 64:
        t //= 2
    return dataclasses.replace(cfg, **{field: t})
