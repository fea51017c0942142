"""Fused ops against the plain JAX that XLA fuses by itself (BENCHMARKS.md §2), on the GPU.

  PYTHONPATH=. python experiments/bench_ops.py [--shape mixtral|deepseek] [--reps 20] [--only NAME] [--out PATH]

Each row times an op's forward + backward (`jax.vjp` with a random cotangent) for both backends of
the op in `ops/` (ours: the Pallas kernels of ops.permute_kernel, ops.gated_act, ops.rms_norm,
ops.rope_kernel; and "reference": the formula with plain autodiff, what XLA makes of it; the
permutation also through its gather-only VJPs with XLA gathers, "xla_gathers", and the default's mix of
the two, "auto_mix"; the router's sort: the counting sort against a stable argsort; the router's top-k:
argmax rounds against `lax.top_k`), and gives the bytes the op must move at least (inputs read once,
outputs written once) over the time, as a share of the device-to-device copy bandwidth measured in the
same run (the ceiling).
Shapes: one MoE layer of `mixtral_small` (T=16384 tokens, k=2, D=2048, F=4096, V=32000) or
`deepseek_small` (k=6, F=1408). The fused grouped-GEMM rows (`--only fc1` / `fc2` / `wgrad`, from
experiments/bench_fused_gemm.py), the routing sort, the top-k and the cross-entropy rows are GPU time from a
profiler trace; the others host time (median of --reps).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import routing as routing_ops  # noqa: E402
from moe_jax.rope import rope_tables  # noqa: E402
from ops import permute as P  # noqa: E402
from ops import permute_kernel as PK  # noqa: E402
from ops.cross_entropy import chunk_rows, linear_cross_entropy  # noqa: E402
from ops.gated_act import swiglu  # noqa: E402
from ops import rms_norm as norm_ops  # noqa: E402
from ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from ops.rope_kernel import rope  # noqa: E402
from ops import softmax_ce as ce_ops  # noqa: E402
from bench_fused_gemm import (FC2_VARIANT_NAMES, FC2_VARIANTS, fused_fc1_rows, fused_fc2_rows,  # noqa: E402
                              wgrad_sumsq_rows)
from timing import fwd_bwd, kernel_ms, median_seconds, write_result  # noqa: E402

SHAPES = {"mixtral": dict(T=16384, k=2, E=8, D=2048, F=4096, V=32000),
          "deepseek": dict(T=16384, k=6, E=64, D=2048, F=1408, V=32000),
          "tiny": dict(T=2048, k=2, E=4, D=64, F=128, V=512)}  # CPU smoke test
BF16 = jnp.bfloat16


def _kw(backend: str) -> dict:
    """An op's backend arguments: Pallas kernels run in interpret mode off the GPU (CPU smoke test)."""
    return dict(backend=backend, interpret=backend in ("pallas", "auto") and jax.devices()[0].platform != "gpu")


def _nbytes(*arrays) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in arrays))


def routing(key, T, k, E):
    """A random dropless routing's permutation maps (dest [T,k], src [T*k]) and gates."""
    experts = jax.vmap(lambda kk: jax.random.permutation(kk, E)[:k])(jax.random.split(key, T))
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    dest = P.inverse(order, T * k).reshape(T, k)
    w = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (T, k)), axis=-1)
    return dest, order, w


def copy_ceiling(reps: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) on 1 GiB."""
    x = jax.random.normal(jax.random.key(0), (2**28 if jax.devices()[0].platform == "gpu" else 2**22,),
                          jnp.float32)
    f = jax.jit(lambda x: x * 1.0 + 0.0)
    t = median_seconds(f, x, iters=reps)
    return 2 * x.nbytes / t


def rows(shape: dict, reps: int, only: str = ""):
    """The table's rows; `only`: just the ops whose name contains it."""
    T, k, D, F, V = shape["T"], shape["k"], shape["D"], shape["F"], shape["V"]
    key = jax.random.key(0)
    dest, src, w = routing(key, T, k, shape["E"])
    x = jax.random.normal(jax.random.fold_in(key, 2), (T, D), BF16)
    x2 = jax.random.normal(jax.random.fold_in(key, 8), (T, D), BF16)
    y = jax.random.normal(jax.random.fold_in(key, 3), (T * k, D), BF16)
    h = jax.random.normal(jax.random.fold_in(key, 4), (T * k, 2, F), BF16)
    wv = (0.02 * jax.random.normal(jax.random.fold_in(key, 5), (D, V))).astype(BF16)
    tg = jax.random.randint(jax.random.fold_in(key, 6), (T,), 0, V)
    scale = jnp.ones((D,), jnp.float32)
    seq = min(T, 2048)
    cos, sin = rope_tables(seq, 128, 10000.0)
    q = jax.random.normal(jax.random.fold_in(key, 7), (T // seq, seq, 16, 128), BF16)

    out = []
    for name, ours, f_of_backend, args, min_bytes in (
        ("permute [T,D] -> [T*k,D]", "pallas", lambda b: (lambda x: P.permute(x, dest, src, **_kw(b))), (x,),
         2 * (_nbytes(x) + _nbytes(y))),          # fwd: read x, write rows; bwd: read drows, write dx
        ("unpermute [T*k,D] -> [T,D]", "pallas", lambda b: (lambda y: P.unpermute(y, dest, src, w, **_kw(b))),
         (y,), 2 * (_nbytes(x) + _nbytes(y)) + _nbytes(y)),  # bwd also re-reads y for the gates
        ("swiglu [R,2,F] -> [R,F] fwd+bwd", "pallas", lambda b: (lambda h: swiglu(h, **_kw(b))), (h,),
         _nbytes(h) + _nbytes(h) // 2 + _nbytes(h) // 2 + 2 * _nbytes(h)),  # fwd r/w; bwd r dy,h w dh
        ("rmsnorm [T,D] fwd+bwd", "pallas", lambda b: (lambda x: rms_norm(x, scale, 1e-5, **_kw(b))), (x,),
         4 * _nbytes(x)),
        ("residual add + rmsnorm [T,D] fwd+bwd", "pallas",
         lambda b: (lambda x, d: add_rms_norm(x, d, scale, 1e-5, **_kw(b))), (x, x2),
         7 * _nbytes(x)),  # fwd: read x, delta, write s, y; bwd: read s, dy, ds, write dx
        ("rope q [B,S,N,H] fwd+bwd", "pallas", lambda b: (lambda q: rope(q, cos, sin, **_kw(b))), (q,),
         4 * _nbytes(q)),
    ):
        if only not in name:
            continue
        row = {"op": name, "min_bytes": min_bytes, "ours_backend": ours}
        # the permutation also against its gather-only VJPs through XLA (its backend before the kernels) and
        # the default's mix ("auto": the kernel on permute's forward only)
        names = {ours: "ours", "reference": "xla_plain",
                 **({"xla": "xla_gathers", "auto": "auto_mix"} if "permute" in name else {})}
        for backend, key_ in names.items():
            run, _ = fwd_bwd(f_of_backend(backend), *args)
            t = median_seconds(run, *args, iters=reps)
            row[f"{key_}_ms"] = 1e3 * t
        out.append(row)
    if only in "routing sort":
        out.append(sort_row(shape, reps))
    if only in "router top-k":
        out.append(topk_row(shape, reps))
    if jax.devices()[0].platform == "gpu":  # Mosaic-GPU kernels: interpret mode is too slow for the CPU smoke test
        out += fused_fc1_rows(shape, reps) if only in ("", "fc1") else []  # (--only fc1 / fc2: these rows alone)
        out += fused_fc2_rows(shape, reps) if only in ("", "fc2") else []
        out += wgrad_sumsq_rows(shape, reps) if only in ("", "wgrad") else []
    # cross-entropy of the LM head: time and the peak memory of the step's temporaries
    ce = {"op": f"lm head + cross-entropy [T,D]x[D,V] fwd+bwd (V={V})"}
    if only not in ce["op"]:
        return out
    default_chunk = chunk_rows(T, V)
    # ours (the default chunk), the plain form, and the chunked form at other chunk sizes (larger chunks:
    # larger GEMMs, more temporary memory)
    # (the softmax pass through XLA's fusions: "ours_xla_softmax")
    variants = [("ours", "chunked", None, "auto"), ("xla_plain", "reference", None, "auto"),
                ("ours_xla_softmax", "chunked", None, "reference")] + [
        (f"ours_chunk{c}", "chunked", c, "auto") for c in (default_chunk // 2, default_chunk * 2, default_chunk * 4)
        if 0 < c <= T and T % c == 0]
    for key_, backend, chunk, kernels in variants:
        g = jax.jit(jax.value_and_grad(
            lambda x, w, backend=backend, chunk=chunk, kernels=kernels: linear_cross_entropy(
                x, w, tg, backend=backend, chunk=chunk, kernels=kernels), argnums=(0, 1)))
        mem = g.lower(x, wv).compile().memory_analysis()
        ce[f"{key_}_ms"] = kernel_ms(g, (x, wv), reps)
        ce[f"{key_}_temp_gib"] = None if mem is None else mem.temp_size_in_bytes / 2**30
    ce["chunk_rows"] = default_chunk
    ce["tflops_ours"] = 6 * T * D * V / (ce["ours_ms"] * 1e-3) / 1e12
    out.append(ce)
    out.append(softmax_ce_row(default_chunk, V, reps))
    return out


def sort_row(shape: dict, reps: int) -> dict:
    """The router's sort of its T·k assignments by expert (dropped ones last): `ops.permute.stable_rank`
    (a counting sort, what `moe_jax.dispatch.sort_by_expert` runs) against a stable argsort then its
    inverse (what it ran before), GPU time, with the ranks checked equal."""
    T, k, E = shape["T"], shape["k"], shape["E"]
    keys = jax.random.randint(jax.random.key(12), (T * k,), 0, E + 1)
    ours = jax.jit(lambda e: P.stable_rank(e, E + 1))
    plain = jax.jit(lambda e: P.inverse(jnp.argsort(e, stable=True).astype(jnp.int32), T * k))
    row = {"op": f"routing sort [T*k] keys < E+1 (E={E})", "ours_backend": "counting sort",
           "ranks_equal": bool(jnp.array_equal(ours(keys), plain(keys)))}
    row["ours_ms"], row["xla_plain_ms"] = kernel_ms(ours, (keys,), reps), kernel_ms(plain, (keys,), reps)
    return row


def topk_row(shape: dict, reps: int) -> dict:
    """The router's choice of k experts from [T, E] scores (deepseek: group-limited, 8 groups, best 3):
    `routing.top_k_indices` (argmax rounds, what the router runs) against `lax.top_k` (XLA sorts each
    row), GPU time, with the choices checked equal."""
    T, k, E = shape["T"], shape["k"], shape["E"]
    sel = jax.nn.sigmoid(jax.random.normal(jax.random.key(13), (T, E)))
    lax_select = lambda x, k: jax.lax.top_k(x, k)[1]  # noqa: E731
    if E >= 64:
        def run(select):
            return jax.jit(lambda s: routing_ops.group_limited_topk(s, k, 8, 3, select=select))
    else:
        def run(select):
            return jax.jit(lambda s: select(s, k).astype(jnp.int32))
    ours, plain = run(routing_ops.top_k_indices), run(lax_select)
    row = {"op": f"router top-k [T,E] (E={E}, k={k}{', 8 groups' if E >= 64 else ''})",
           "ours_backend": "argmax rounds", "choices_equal": bool(jnp.array_equal(ours(sel), plain(sel)))}
    row["ours_ms"], row["xla_plain_ms"] = kernel_ms(ours, (sel,), reps), kernel_ms(plain, (sel,), reps)
    return row


def _softmax_ce_inputs(c: int, v: int):
    ks = jax.random.split(jax.random.key(14), 3)
    return (6.0 * jax.random.normal(ks[0], (c, v)), jax.random.randint(ks[1], (c,), 0, v),
            jax.random.uniform(ks[2], (c,)) + 0.5)


def softmax_ce_row(c: int, v: int, reps: int) -> dict:
    """One chunk's softmax pass (ops.softmax_ce: float32 logits [C, V] -> loss, bf16 gradient), the kernel
    against XLA's fusions of the formula; the least bytes are one read of the logits and one write."""
    args = _softmax_ce_inputs(c, v)
    row = {"op": f"cross-entropy softmax pass [C,V] f32 -> bf16 (C={c})", "ours_backend": "pallas",
           "min_bytes": c * v * (4 + 2)}
    for key_, backend in (("ours", "pallas"), ("xla_plain", "reference")):
        f = jax.jit(lambda *a, backend=backend: ce_ops.softmax_cross_entropy_rows(*a, BF16, **_kw(backend)))
        row[f"{key_}_ms"] = kernel_ms(f, args, reps)
    return row


def tune_ce(shape: dict, reps: int, on_row=print) -> list[dict]:
    """The softmax pass (ms) per ops.softmax_ce.Launch at one chunk of the LM head's logits, each launch's
    outputs checked against the formula's (`max_err`: the largest difference of loss and gradient; a
    launch over 1e-2 is an `error` row)."""
    c, v = chunk_rows(shape["T"], shape["V"]), shape["V"]
    args, out, default = _softmax_ce_inputs(c, v), [], ce_ops.LAUNCH
    want = jax.jit(lambda *a: ce_ops.reference_softmax_cross_entropy_rows(*a, BF16))(*args)

    def err(got):
        return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in zip(got, want))
    try:
        whole = 1 << (v - 1).bit_length()  # one block per row: a single read
        for block, warps_ in ((2048, (4, 8)), (4096, (4, 8, 16)), (8192, (8, 16)), (whole, (16, 32))):
            for programs in (132, 264, 528, c):
                for warps in warps_:
                    ce_ops.LAUNCH = ce_ops.Launch(block, programs, warps)
                    f = jax.jit(lambda *a: ce_ops.softmax_cross_entropy_rows(*a, BF16, **_kw("pallas")))
                    row = {"block": block, "programs": programs, "warps": warps}
                    try:
                        row["max_err"] = err(f(*args))
                        if row["max_err"] > 1e-2:
                            row["error"] = f"outputs differ from the formula's by {row['max_err']:.3g}"
                        else:
                            row["ce_ms"] = kernel_ms(f, args, reps)
                    except Exception as e:  # noqa: BLE001 (a launch that does not compile: its error is the row)
                        row["error"] = str(e)[:200]
                    out.append(row)
                    on_row(out)
    finally:
        ce_ops.LAUNCH = default
    return out


def tune_norm(shape: dict, reps: int, on_row=print) -> list[dict]:
    """rms_norm fwd+bwd (ms) per ops.rms_norm.Launch on [T, D] bf16; `on_row(rows so far)` after each
    (a sweep cut short keeps what it measured)."""
    x = jax.random.normal(jax.random.key(1), (shape["T"], shape["D"]), BF16)
    scale = jnp.ones((shape["D"],), jnp.float32)
    out, default = [], norm_ops.LAUNCH
    try:
        for fwd_elems in (4096, 8192, 16384):
            for bwd_rows in (8, 16, 32, 64):
                for warps in (4, 8):
                    norm_ops.LAUNCH = norm_ops.Launch(fwd_elems, bwd_rows, warps)
                    run, _ = fwd_bwd(lambda x: rms_norm(x, scale, 1e-5, **_kw("pallas")), x)
                    out.append({"fwd_elems": fwd_elems, "bwd_rows": bwd_rows, "warps": warps,
                                "norm_ms": 1e3 * median_seconds(run, x, iters=reps)})
                    on_row(out)
    finally:
        norm_ops.LAUNCH = default
    return out


def tune_permute(shape: dict, reps: int, on_row=print) -> list[dict]:
    """The permutation's kernels ([T, D] <-> [T·k, D] bf16, a random dropless routing's expert-sorted rows) per
    ops.permute_kernel.Launch, GPU time, each result checked: permute's forward as the row gather (`gather_rows`;
    `permute_ms`) and token-major (`scatter_rows`, each token's row read once; `scatter_ms`), and unpermute's
    backward token-major (`scatter_dots`; `dots_ms`, beside the default XLA form's `xla_unpermute_bwd_ms`);
    `on_row(rows so far)` after each."""
    T, k, D = shape["T"], shape["k"], shape["D"]
    x = jax.random.normal(jax.random.key(1), (T, D), BF16)
    dest, src, w = routing(jax.random.key(2), T, k, shape["E"])
    tok = src // k
    want = x[tok]
    interpret = _kw("pallas")["interpret"]
    # unpermute's backward on the same maps (y: the buffer, x standing for dout): the XLA form that runs by
    # default (dy's rows gathered row-major, the gate dots) against the token-major kernel (`dots_ms`)
    y = jax.random.normal(jax.random.key(3), (T * k, D), BF16)
    xla_bwd = jax.jit(lambda y, dout: P._unpermute_bwd(("xla", "xla"), None, (y, dest, src, w), dout)[::3])
    dy_want, dw_want = xla_bwd(y, x)
    xla_bwd_ms = kernel_ms(xla_bwd, (y, x), reps)
    out, default = [], PK.LAUNCH
    try:
        for block_elems in (4096, 8192, 16384, 32768):
            for warps in (2, 4, 8, 16):
                PK.LAUNCH = PK.Launch(block_elems, warps)
                row = {"block_elems": block_elems, "warps": warps}
                for form, f in (("permute", lambda x, tok: PK.gather_rows(x, tok, interpret=interpret)),
                                ("scatter", lambda x, dest: PK.scatter_rows(x, dest, T * k, interpret=interpret))):
                    f = jax.jit(f)
                    arg = tok if form == "permute" else dest
                    row["equal" if form == "permute" else "scatter_equal"] = bool(jnp.array_equal(f(x, arg), want))
                    row[f"{form}_ms"] = kernel_ms(f, (x, arg), reps)
                    # the least traffic of either form: the rows written, x read once
                    row["tb_per_s" if form == "permute" else "scatter_tb_per_s"] = (
                        (want.nbytes + x.nbytes) / (row[f"{form}_ms"] * 1e-3) / 1e12)
                dots = jax.jit(lambda y, dout: PK.scatter_dots(y, dest, w, dout, interpret=interpret))
                dy, dw = dots(y, x)
                row["dots_equal"] = bool(jnp.array_equal(dy, dy_want)) and bool(
                    jnp.allclose(dw, dw_want, rtol=1e-3, atol=1e-2))
                row["dots_ms"], row["xla_unpermute_bwd_ms"] = kernel_ms(dots, (y, x), reps), xla_bwd_ms
                out.append(row)
                on_row(out)
    finally:
        PK.LAUNCH = default
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="",
                    help="just the ops whose name contains this (e.g. permute; fc1 or fc2: the fused "
                         "grouped-GEMM rows alone; wgrad: the wgrad kernel's sums of squares)")
    ap.add_argument("--tune-norm", action="store_true", help="sweep ops.rms_norm.Launch instead")
    ap.add_argument("--tune-ce", action="store_true", help="sweep ops.softmax_ce.Launch instead")
    ap.add_argument("--tune-permute", action="store_true", help="sweep ops.permute_kernel.Launch instead")
    ap.add_argument("--fc2-variants", default="",
                    help="comma-separated: only these of fc2's fused dgrad variants, beside the default")
    args = ap.parse_args(argv)
    FC2_VARIANTS[:] = [v for v in args.fc2_variants.split(",") if v]
    if set(FC2_VARIANTS) - set(FC2_VARIANT_NAMES):
        ap.error(f"--fc2-variants: unknown {sorted(set(FC2_VARIANTS) - set(FC2_VARIANT_NAMES))}; "
                 f"known: {', '.join(FC2_VARIANT_NAMES)}")
    for flag, kind, module, sweep, key in ((args.tune_ce, "tune_ce", ce_ops, tune_ce, "ce_ms"),
                                           (args.tune_norm, "tune_norm", norm_ops, tune_norm, "norm_ms"),
                                           (args.tune_permute, "tune_permute", PK, tune_permute, "permute_ms")):
        if flag:  # a sweep: its JSON rewritten after each row (a sweep cut short keeps what it measured)
            def best(rows_, key=key):
                return min(rows_, key=lambda r: r.get(key, 1e9))

            def save(rows_, kind=kind, module=module, best=best):
                print(rows_[-1], flush=True)
                return write_result(kind, args.shape, {"shape": SHAPES[args.shape], "default": dataclasses.asdict(
                    module.Launch()), "rows": rows_, "best": best(rows_)}, args.out)
            print(f"best: {best(sweep(SHAPES[args.shape], args.reps, save))}")
            return 0
    ceiling = copy_ceiling(args.reps)
    table = rows(SHAPES[args.shape], args.reps, args.only)
    print(f"copy ceiling {ceiling / 1e12:.2f} TB/s on {jax.devices()[0].device_kind}")
    # baseline: XLA's fusion of the plain formula, or (the fused grouped GEMM) the two ops unfused
    print(f"{'op':<50} {'ours ms':>9} {'base ms':>9} {'ours/base':>9} {'% of copy':>10}")
    for r in table:
        base = r.get("xla_plain_ms", r.get("unfused_ms"))
        best = r.get("ours_ms", base)
        if "min_bytes" in r:
            r["share_of_copy"] = r["min_bytes"] / (best * 1e-3) / ceiling
        speed = f"{base / r['ours_ms']:.2f}x" if "ours_ms" in r else "-"
        share = f"{100 * r['share_of_copy']:.0f}%" if "share_of_copy" in r else "-"
        ours = f"{r['ours_ms']:.3f}" if "ours_ms" in r else "-"
        print(f"{r['op']:<50} {ours:>9} {base:>9.3f} {speed:>9} {share:>10}")
        extra = [k for k in r if k != "ours_ms" and k.startswith(("ours_", "xla_gathers", "auto_mix"))]
        for key in sorted(k for k in extra if k.endswith(("_ms", "_error"))):
            print(f"  {key}: {r[key]}")  # the other configs of a fused kernel; the permutation's XLA gathers
    write_result("ops", args.shape, {"shape": SHAPES[args.shape], "copy_bytes_per_s": ceiling,
                                     "rows": table}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
