"""Tuning tables for the Pallas kernels: JSON written by experiments/autotune_*.py on the device.

Lookup only (no tuning at import or call time): device kind -> kernel -> key -> config, where a key is
a shape class (`shape_class`) or one exact (G, K, N) (`exact_key`: a preset's own GEMM, swept at its
shape), which wins over its class.
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


HOPPER_KINDS = ("H200", "H100", "H800", "H20", "GH200")  # the same SM (sm_90); H20: fewer of them


def own_key(device=None) -> str:
    """The table key that names `device` itself (what an autotune run on it writes)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.upper()
    return next((k for k in HOPPER_KINDS if k in kind), device.device_kind)


def device_key(device=None) -> str:
    """The table entry for `device`: its own (e.g. "H200") when the table has one; any other Hopper
    part takes the H100's (same SM: the tiles and pipelines that win are the same); anything else
    "default" (untuned; `table_note` says so)."""
    device = device or jax.devices()[0]
    table = _table("grouped_matmul")
    own = own_key(device)
    if own in table:
        return own
    if own in HOPPER_KINDS and "H100" in table:
        return "H100"
    return "default"


def table_note(device=None) -> str:
    """One line for the run log: which tuning table the grouped GEMM uses on `device`."""
    device = device or jax.devices()[0]
    key = device_key(device)
    if key == "default":
        return f"untuned default tiles: no tuning table for {device.device_kind}"
    own = key.upper() in device.device_kind.upper()
    return f"{key} tuning table" + ("" if own else f", used for {device.device_kind}")


def shape_class(m, k, n, g) -> str:
    """Coarse class: the group count bucket, whether N (output cols) is small and whether K
    (the contraction, i.e. the k-steps per work item) is short."""
    gcls = "g<=16" if g <= 16 else "g>16"
    ncls = "n<2048" if n < 2048 else "n>=2048"
    kcls = "k<4096" if k < 4096 else "k>=4096"
    return f"{gcls},{ncls},{kcls}"


def exact_key(k, n, g) -> str:
    """The key of one GEMM shape (M, the rows, varies with the routing and is left out)."""
    return f"g={g},k={k},n={n}"


def _lookup(kernel, m, k, n, g):
    """The exact shape's entry; else the class's; else one that differs only in the K bucket; else the
    default."""
    entry = _entries(kernel)
    if exact_key(k, n, g) in entry:
        return entry[exact_key(k, n, g)]
    cls = shape_class(m, k, n, g)
    near = [v for key, v in sorted(entry.items())
            if not key.startswith("g=") and key.rsplit(",", 1)[0] == cls.rsplit(",", 1)[0]]
    return entry.get(cls, near[0] if near else entry.get("default", {}))


def _entries(kernel):
    table = _table("grouped_matmul")
    return table.get(device_key(), table.get("default", {})).get(kernel, {})


def fwd_config(m, k, n, g, transpose_rhs=False):
    """The forward kernel's config; with transpose_rhs (the dgrad's form, rhs [G, N, K]) the
    table's "fwd_t" entry for exactly this shape or class where it has one, else the "fwd" lookup."""
    from ops.gmm_pallas import FwdConfig
    fwd_t = _entries("fwd_t") if transpose_rhs else {}
    own_t = fwd_t.get(exact_key(k, n, g)) or fwd_t.get(shape_class(m, k, n, g))
    cfg = FwdConfig(**(own_t or _lookup("fwd", m, k, n, g)))
    return _fit(cfg, n, "tile_n", 2 if cfg.split == "n" and not cfg.pingpong else 1)


def wgrad_config(m, a, b, g):
    from ops.gmm_pallas import WgradConfig
    cfg = WgradConfig(**_lookup("wgrad", m, a, b, g))
    fa, fb = (1, 1) if cfg.pingpong else (2, 1) if cfg.split == "a" else (1, 2)
    return _fit(_fit(cfg, a, "tile_a", fa), b, "tile_b", fb)


def _fit(cfg, dim, field, factor):
    """Halve a tile (not below 64) while it does not divide dim: avoids padding copies."""
    import dataclasses
    t = getattr(cfg, field)
    while dim % (factor * t) and t > 64:
        t //= 2
    return dataclasses.replace(cfg, **{field: t})
