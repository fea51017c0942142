"""Sweep Pallas grouped-matmul configs on the device; write ops/tuning/grouped_matmul.json.

  PYTHONPATH=. python3 experiments/autotune_grouped_matmul.py [--kinds fwd] [--shapes 1,2] [--out PATH]
One representative shape per shape class (ops.tuning.shape_class; --shapes 0-3), or a preset's own GEMM
(4-9: its pick goes to that exact shape's entry, ops.tuning.exact_key), with Dirichlet and uniform
group sizes (--patterns; a config's score is its mean time over them). Each config is checked
against XLA's ragged_dot before it is timed (GPU kernel time per call over --reps calls, from a
profiler trace; the host-timed median where no trace has GPU events): relative error, finite
values, zeros where they must be (empty groups for wgrad, rows past the groups for fwd). A cross-item-ring wgrad
config (--ring) only takes a class when it beats the class's best per-item config by more than
--ring-margin (the per-item kernel is the longer GPU-verified one). --check exits 1 on any FAIL.
--kinds fwd_t sweeps the forward kernel with a transposed rhs (the dgrad's form) into the table's
fwd_t entry, which ops.tuning.fwd_config prefers for a transposed rhs of that exact class.
A class's current entry is always among its candidates, so a short sweep (--configs) keeps a pick it
did not beat; the log keeps every earlier row that this run did not re-time, each with its date.
Never runs at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from ops import gmm_pallas as P
from ops import tuning
from ops.grouped_matmul import xla_fwd, xla_wgrad

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_grouped_matmul import group_sizes  # noqa: E402
from timing import device_ms, median_seconds  # noqa: E402

SHAPES = [  # (E, M, K, N); 0-3: one per shape class, whose entry (tuning.shape_class) their picks set
    (8, 32768, 4096, 14336),
    (64, 65536, 2048, 1408),
    (64, 65536, 1408, 2048),
    (16, 32768, 2048, 4096),
    # 4-: the presets' own GEMMs, whose picks set their exact shape's entry (tuning.exact_key), which wins
    # over the class. mixtral_small: 4 fc2 forward and wgrad, 5 fc1's dgrad (--kinds fwd_t: the forward
    # kernel with rhs [G, N, K]), 6 fc1 forward and wgrad; deepseek_small: 7 fc1, 8 fc2, 9 fc1's dgrad
    (8, 32768, 4096, 2048),
    (8, 32768, 8192, 2048),
    (8, 32768, 2048, 8192),
    (64, 98304, 2048, 2816),
    (64, 98304, 1408, 2048),
    (64, 98304, 2816, 2048),
]
CLASS_SHAPES = 4
FWD = [dict(split=sp, tile_m=tm, tile_n=tn, max_concurrent_steps=s, delay_release=d,
            grid_tile_width=w, pingpong=pp)
       for sp, tm, tn, s, d, w, pp in [
           ("n", 128, 128, 4, 0, 2, False), ("n", 128, 128, 4, 1, 2, False),
           ("n", 128, 128, 4, 1, 8, False), ("n", 128, 64, 6, 1, 8, False),
           ("m", 128, 128, 6, 1, 8, False), ("m", 256, 128, 4, 1, 8, False),
           ("m", 256, 128, 4, 0, 8, False), ("n", 128, 128, 6, 1, 8, True),
           ("n", 128, 128, 6, 0, 8, True),
           # wider grid swizzles: +5-6 points on E=64 fc1 in the 2026-11-22 probe (L2 reuse)
           ("n", 128, 128, 4, 1, 16, False), ("m", 256, 128, 4, 1, 16, False),
           ("m", 256, 128, 4, 1, 32, False)]] + [
    dict(split="n", tile_m=128, tile_n=128, max_concurrent_steps=4, delay_release=1,
         grid_minor_dim=0, grid_tile_width=8)]
WGRAD = [dict(tile_r=64, tile_a=ta, tile_b=tb, max_concurrent_steps=s, grid_tile_width=w, split=sp)
         for ta, tb, s, w, sp in [(128, 128, 3, 4, "b"), (128, 128, 3, 4, "a")]]
# (4 slots of split b need 256 KB of SMEM > 227 KB on H100: the sweep of 2026-11-22 logged them as
# errors; ping-pong 4-slot rings fit, each slot holding one WG's 128-col b)
# the cross-item ring wgrad (--ring; run --check wgrad_ring_b_d0,... on the device first). Ping-pong
# is checked but not swept (44-55 % of dense in the v4-v6 sweep, vs 82-96 % for split a/b).
WGRAD_RING = [dict(tile_r=64, tile_a=128, tile_b=128, max_concurrent_steps=s, grid_tile_width=w,
                   split=sp, ring=True, delay_release=d)
              for s, w, sp, d in [(3, 4, "b", 0), (3, 4, "b", 1), (3, 8, "b", 0), (3, 4, "a", 0),
                                  (3, 4, "a", 1)]]
# --quick: the configs within a few points of the best in the sweeps of 2026-12-02 (each class's current
# entry is added anyway)
FWD_QUICK = [c for c in FWD if (c["split"], c["tile_m"], c["max_concurrent_steps"], c["delay_release"],
                                c["grid_tile_width"], c.get("pingpong", False)) in {
    ("n", 128, 6, 1, 8, True), ("n", 128, 4, 1, 8, False), ("m", 256, 4, 1, 8, False),
    ("m", 256, 4, 1, 16, False)}]
WGRAD_QUICK = WGRAD + [c for c in WGRAD_RING if c["grid_tile_width"] == 4 and c["delay_release"] == 0]
CHECKS = {  # name -> (kind, transpose_rhs, config overrides)
    "fwd": ("fwd", False, {}),
    "fwd_t": ("fwd", True, {}),
    "fwd_t_st": ("fwd", True, {"slice_then_transpose": True}),
    "fwd_d1": ("fwd", False, {"delay_release": 1}),
    "fwd_t_d1": ("fwd", True, {"delay_release": 1}),
    "fwd_m128": ("fwd", False, {"split": "m", "max_concurrent_steps": 6, "delay_release": 1}),
    "fwd_m256": ("fwd", False, {"split": "m", "tile_m": 256, "delay_release": 1}),
    "fwd_t_m256": ("fwd", True, {"split": "m", "tile_m": 256, "delay_release": 1}),
    "fwd_t_m128": ("fwd", True, {"split": "m", "delay_release": 0}),
    "fwd_pp": ("fwd", False, {"pingpong": True, "max_concurrent_steps": 6, "delay_release": 1}),
    "fwd_t_pp": ("fwd", True, {"pingpong": True, "max_concurrent_steps": 6, "delay_release": 1}),
    "wgrad_b": ("wgrad", False, {"split": "b"}),
    "wgrad_a": ("wgrad", False, {"split": "a"}),
    "wgrad_a_st": ("wgrad", False, {"split": "a", "slice_then_transpose": True}),
    "wgrad_ring_b_d0": ("wgrad", False, {"ring": True, "split": "b", "delay_release": 0}),
    "wgrad_ring_b_d1": ("wgrad", False, {"ring": True, "split": "b", "delay_release": 1}),
    "wgrad_ring_a_d0": ("wgrad", False, {"ring": True, "split": "a", "delay_release": 0}),
    "wgrad_ring_a_d1": ("wgrad", False, {"ring": True, "split": "a", "delay_release": 1}),
    "wgrad_ring_pp": ("wgrad", False, {"ring": True, "pingpong": True, "max_concurrent_steps": 4,
                                       "delay_release": 1}),
}


def check(name, m=4096, k=1024, n=2048, e=8):
    """Small-shape correctness of one kernel variant against XLA (uneven, a 0 group, sum < M)."""
    kind, tr, over = CHECKS[name]
    sizes = group_sizes(e, m - 333, "dirichlet", seed=3)
    gs = jnp.asarray(sizes)
    ks = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    if kind == "fwd":
        w = jax.random.normal(ks[1], (e, n, k) if tr else (e, k, n), jnp.float32).astype(
            jnp.bfloat16)
        cfg = dataclasses.replace(P.FwdConfig(), **over)
        got = P.gmm_fwd(x, w, gs, tr, jnp.bfloat16, cfg=cfg)
        want = xla_fwd(x, w, gs, tr, jnp.float32)
    else:
        dy = jax.random.normal(ks[2], (m, n), jnp.float32).astype(jnp.bfloat16)
        cfg = dataclasses.replace(P.WgradConfig(), **over)
        got = P.gmm_wgrad(x, dy, gs, jnp.bfloat16, cfg=cfg)
        want = xla_wgrad(x, dy, gs, jnp.float32)
    ok, err, zeros_ok = valid(kind, got, want, sizes, tol=1e-2)
    print(f"CHECK {name} {(m, k, n, e)}: {'OK' if ok else 'FAIL'} rel_err={err:.2e} "
          f"zeros_ok={zeros_ok}", flush=True)
    return ok


def wgrad_by_group(a, b, group_sizes, out_dtype):
    """xla_wgrad's result one group at a time (a row mask per group, G times the FLOPs): XLA's
    ragged wgrad holds a [G, M, A] operand, 57 GiB at deepseek_small's fc1 (64, 98304, 2048), more
    than an H100 has; this holds one [M, A] at a time."""
    rows = jnp.arange(a.shape[0], dtype=jnp.int32)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)

    def one(se):
        keep = (rows >= se[0]) & (rows < se[1])
        return jnp.dot(jnp.where(keep[:, None], a, jnp.zeros((), a.dtype)).T, b,
                       preferred_element_type=jnp.float32).astype(out_dtype)
    return jax.lax.map(one, jnp.stack([starts, ends], axis=1))


def valid(kind, got, want, sizes, tol):
    """(ok, rel err, zeros ok): close to `want`, finite, and exactly zero for empty wgrad groups
    (fwd: for the rows past sum(sizes))."""
    got = np.asarray(got, np.float32)
    err = rel(got, want)
    sizes = np.asarray(sizes)
    zeros_ok = (not np.any(got[sizes == 0])) if kind == "wgrad" else (
        not np.any(got[int(sizes.sum()):]))
    return bool(err < tol and zeros_ok and np.all(np.isfinite(got))), err, zeros_ok


def pick(results, ring_margin):
    """The (seconds, config) to put in the table from one class's timed results: the fastest
    per-item config, unless a ring config is faster than it by more than `ring_margin` (a
    fraction); the fastest ring config if no per-item one ran."""
    item = min((r for r in results if not r[1].get("ring")), default=None, key=lambda r: r[0])
    ring = min((r for r in results if r[1].get("ring")), default=None, key=lambda r: r[0])
    if ring is not None and (item is None or ring[0] < (1 - ring_margin) * item[0]):
        return ring
    return item


def with_current(configs, current):
    """The candidates of one class: `configs` plus the table's current entry for that class where it
    is not among them, so a short sweep (--configs) cannot replace a pick with one it did not beat."""
    if current and current not in configs:
        return list(configs) + [dict(current)]
    return list(configs)


def merge_log(earlier, new, swept):
    """The table's log after a sweep: `new` plus the earlier rows that no config of this run
    re-timed (`swept`: (kind, shape, cfg) keys), each row keeping the date it was measured."""
    keep = [r for r in earlier if (r["kind"], tuple(r["shape"]), json.dumps(r["cfg"], sort_keys=True))
            not in swept]
    return keep + new


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(f, *args, reps):
    """Seconds per call: GPU kernel time from a profiler trace where there is one (host dispatch
    adds 0.1-0.4 ms per call at these sizes and blurs the ranking), else the host-timed median."""
    ms = device_ms(f, *args, calls=reps)
    return ms / 1e3 if ms else median_seconds(f, *args, iters=reps)


def sweep(kind, e, m, k, n, configs, reps, log, patterns=("dirichlet",)):
    """Times every config on each group-size pattern (each run checked first); a config's score
    is its mean time over the patterns (uneven routing favours some layouts, even routing
    others). Returns [(score seconds, config)]."""
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    if kind in ("fwd", "fwd_t"):
        tr = kind == "fwd_t"  # the dgrad's form: rhs [G, N, K]
        w = (jax.random.normal(ks[1], (e, n, k) if tr else (e, k, n), jnp.float32)
             / np.sqrt(k)).astype(jnp.bfloat16)
        ref_fn = jax.jit(lambda x, w, gs: xla_fwd(x, w, gs, tr, jnp.bfloat16))
        def make(c):
            return jax.jit(lambda x, w, gs: P.gmm_fwd(x, w, gs, tr, jnp.bfloat16, cfg=c))
        base = P.FwdConfig()
    else:
        w = jax.random.normal(ks[2], (m, n), jnp.float32).astype(jnp.bfloat16)  # dy
        ref_fn = jax.jit(lambda a, b, gs: wgrad_by_group(a, b, gs, jnp.bfloat16))
        def make(c):
            return jax.jit(lambda a, b, gs: P.gmm_wgrad(a, b, gs, jnp.bfloat16, cfg=c))
        base = P.WgradConfig()
    cases = []  # (pattern, sizes, args, reference)
    for pattern in patterns:
        sizes = group_sizes(e, m, pattern)
        args = (x, w, jnp.asarray(sizes))
        cases.append((pattern, sizes, args, ref_fn(*args)))
    dense = jax.jit(lambda a, b: a @ b)
    t_dense = timed(dense, x, jax.random.normal(ks[1], (k, n), jnp.float32).astype(jnp.bfloat16),
                    reps=reps)
    results = []
    for c in configs:
        cfg = dataclasses.replace(base, **c)
        if kind != "wgrad" and n % (cfg.tile_n * (2 if cfg.split == "n" and not cfg.pingpong
                                                else 1)):
            continue
        fa, fb = ((1, 1) if cfg.pingpong else (2, 1) if getattr(cfg, "split", "b") == "a"
                  else (1, 2))
        if kind == "wgrad" and (k % (fa * cfg.tile_a) or n % (fb * cfg.tile_b)):
            continue
        times, errs = {}, {}
        try:
            f = make(cfg)
            for pattern, sizes, args, ref in cases:
                ok, errs[pattern], zeros_ok = valid(kind, f(*args), ref, sizes, tol=2e-2)
                if not ok:
                    raise AssertionError(f"wrong result ({pattern}): rel err {errs[pattern]}, "
                                         f"zeros ok {zeros_ok}")
                times[pattern] = timed(f, *args, reps=reps)
        except Exception as ex:
            log.append({"kind": kind, "shape": [e, m, k, n], "cfg": c,
                        "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
            print(kind, (e, k, n), c, "ERROR", str(ex)[:200], flush=True)
            continue
        t = float(np.mean(list(times.values())))
        log.append({"kind": kind, "shape": [e, m, k, n], "cfg": c, "ms": t * 1e3,
                    "pct_dense": 100 * t_dense / t, "rel_err": max(errs.values()),
                    "ms_by_pattern": {p: v * 1e3 for p, v in times.items()}})
        cells = "  ".join(f"{p} {v * 1e3:.3f} ms ({100 * t_dense / v:.1f}%)"
                          for p, v in times.items())
        print(kind, (e, k, n), c, f"{cells}  (dense {t_dense * 1e3:.3f} ms) err "
              f"{max(errs.values()):.1e}", flush=True)
        results.append((t, c))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="ops/tuning/grouped_matmul.json")
    ap.add_argument("--kinds", default="fwd,wgrad",
                    help="fwd, wgrad, fwd_t (the forward kernel with a transposed rhs, as in the "
                    "dgrad; its picks go to the table's fwd_t entry, which ops.tuning prefers there)")
    ap.add_argument("--shapes", default="0,1,2")
    ap.add_argument("--check", default=None, help="correctness checks (comma list or 'all'): "
                    + ",".join(CHECKS))
    ap.add_argument("--configs", default=None, help="JSON {fwd: [...], wgrad: [...]} to sweep")
    ap.add_argument("--patterns", default="dirichlet,uniform",
                    help="group-size patterns a config is timed on (its score: the mean)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the short candidate lists (FWD_QUICK, WGRAD_QUICK)")
    ap.add_argument("--ring", action="store_true",
                    help="also sweep the cross-item-ring wgrad (after --check wgrad_ring_* passed)")
    ap.add_argument("--ring-margin", type=float, default=0.02,
                    help="a ring wgrad config must beat the best per-item one by this fraction")
    args = ap.parse_args()
    if args.check:
        ok = True
        for name in (CHECKS if args.check == "all" else args.check.split(",")):
            ok &= check(name)
            if any(s in name for s in ("m256", "d1", "pp", "ring")):  # K not a multiple of stages
                ok &= check(name, m=3000, k=1408, n=1536, e=16)
        sys.exit(0 if ok else 1)
    configs = {"fwd": FWD, "fwd_t": FWD, "wgrad": WGRAD + (WGRAD_RING if args.ring else [])}
    if args.quick:
        configs = {"fwd": FWD_QUICK, "fwd_t": FWD_QUICK, "wgrad": WGRAD_QUICK if args.ring else WGRAD}
    if args.configs:
        configs.update(json.loads(args.configs))
    path = pathlib.Path(args.out)
    table = json.loads(path.read_text()) if path.exists() else {}
    dev = tuning.own_key()  # this device's own entry (device_key may fall back to the H100's)
    entry = table.setdefault(dev, {"fwd": {}, "wgrad": {}})
    shapes = [int(i) for i in args.shapes.split(",")]
    kinds = args.kinds.split(",")
    # earlier rows stay in the log unless this run re-times the same config at the same shape
    earlier, new, swept = entry.get("_measured", {}).get("log", []), [], set()
    for idx in shapes:
        e, m, k, n = SHAPES[idx]
        for kind in kinds:
            cls = tuning.shape_class(m, k, n, e)
            key = cls if idx < CLASS_SHAPES else tuning.exact_key(k, n, e)
            # what runs now is among the candidates (fwd_t: the forward's entry where it has none)
            here = [entry.get(kind, {})] + ([entry.get("fwd", {})] if kind == "fwd_t" else [])
            current = next((d[c] for d in here for c in (key, cls) if c in d), None)
            cands = with_current(configs[kind], current)
            rows = []
            results = sweep(kind, e, m, k, n, cands, args.reps, rows, args.patterns.split(","))
            for r in rows:
                r["date"] = time.strftime("%Y-%m-%d")
            new += rows
            swept |= {(kind, (e, m, k, n), json.dumps(c, sort_keys=True)) for c in cands}
            best = pick(results, args.ring_margin)
            if best:
                entry.setdefault(kind, {})[key] = best[1]
                print("PICK", kind, (e, m, k, n), key, best[1], f"{best[0] * 1e3:.3f} ms", flush=True)
            entry["_measured"] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                  "date": time.strftime("%Y-%m-%d"), "log": merge_log(earlier, new, swept),
                                  "timing": "GPU kernel time per call (profiler) where available"}
            if not args.no_write:  # after every sweep: a run cut short still leaves a table
                path.write_text(json.dumps(table, indent=1))
            if os.environ.get("OUT"):
                (pathlib.Path(os.environ["OUT"]) / "grouped_matmul_tuning.json").write_text(
                    json.dumps(table, indent=1))
    print(json.dumps({k: v for k, v in entry.items() if k != "_measured"}, indent=1))


if __name__ == "__main__":
    main()
