"""The fused grouped-GEMM kernels' rows of bench_ops.py (Mosaic GPU: on an NVIDIA GPU only), GPU time.

fc1 with SwiGLU in its epilogue (`--only fc1`), SwiGLU's backward in fc2's dgrad epilogue and that kernel's
variants (`--only fc2`, `--fc2-variants`), and the wgrad kernel's sums of squares (`--only wgrad`), each
against the same work unfused.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ops import gmm_pallas
from ops import gmm_pallas_dswiglu as dswiglu_ops
from ops.gated_act import swiglu_vjp
from ops.grouped_swiglu import grouped_swiglu, swiglu_grouped_matmul
from timing import fwd_bwd, kernel_ms

BF16 = jnp.bfloat16


def routed_group_sizes(key, rows: int, E: int) -> jax.Array:
    """Group sizes of `rows` routed rows, each sent to a uniformly random one of E experts (int32 [E])."""
    return jnp.bincount(jax.random.randint(key, (rows,), 0, E), length=E).astype(jnp.int32)


def fused_fc1_rows(shape: dict, reps: int) -> list[dict]:
    """fc1 of the routed experts with SwiGLU in the grouped GEMM's epilogue (ops.grouped_swiglu "pallas")
    against the grouped GEMM then the SwiGLU op ("unfused"), forward alone and forward + backward, on a
    random routing's group sizes. TFLOP/s counts fc1's GEMM FLOPs only (2·R·D·2F forward, 3× that with
    the backward)."""
    T, k, E, D, F = shape["T"], shape["k"], shape["E"], shape["D"], shape["F"]
    key = jax.random.key(10)
    rows_ = T * k
    gs = routed_group_sizes(key, rows_, E)
    x = jax.random.normal(jax.random.fold_in(key, 1), (rows_, D), BF16)
    w1 = (0.02 * jax.random.normal(jax.random.fold_in(key, 2), (E, D, 2 * F))).astype(BF16)
    flops = 2 * rows_ * D * 2 * F
    out = []
    for what, mult in (("fwd", 1), ("fwd+bwd", 3)):
        row = {"op": f"grouped fc1 + swiglu [R,D]x[E,D,2F] {what}", "ours_backend": "pallas (fused)"}
        for backend, name in (("pallas", "ours"), ("unfused", "unfused")):
            f = lambda x, w: grouped_swiglu(x, w, gs, backend=backend)  # noqa: E731
            run = jax.jit(f) if what == "fwd" else fwd_bwd(f, x, w1)[0]
            t = kernel_ms(run, (x, w1), reps) / 1e3
            row[f"{name}_ms"] = 1e3 * t
            row[f"{name}_tflops"] = mult * flops / t / 1e12
        out.append(row)
    return out


def fc2_variants(default) -> dict:
    """fc2's fused dgrad variants: name -> (config, module switches read at trace time), beside `default`
    (the shipped config for the shape's group count)."""
    s4 = dataclasses.replace(default, max_concurrent_steps=4)
    # The split forms (both WGs on one item, the epilogues exposed) lost 10-15 % to ping-pong at the mixtral
    # shape on an H100 (stop 48): timed again at the E=64 shape (split m; split n needs F % 256 == 0: its row
    # errors at deepseek's). The exact sigmoid is the epilogue before FAST_SIGMOID (on since stop 50). The
    # open questions first: a run cut at its time limit keeps them in its log, one line per variant.
    return {"default": (default, {}),
            "exact_sigmoid": (default, {"FAST_SIGMOID": False}),
            "split_m": (dswiglu_ops.DSWIGLU_BWD_SPLIT_M, {}),  # 256-row segments, each WG half
            "split_n": (dswiglu_ops.DSWIGLU_BWD_SPLIT_N, {}),
            "stages4_noprefetch": (s4, {"PREFETCH": False}),
            "noprefetch": (default, {"PREFETCH": False}),
            "minor_dim0": (dataclasses.replace(default, grid_minor_dim=0), {}),
            "default_again": (default, {})}


FC2_VARIANT_NAMES = tuple(fc2_variants(dswiglu_ops.DSWIGLU_BWD))
FC2_VARIANTS: list[str] = []  # the fused dgrad's variants fused_fc2_rows times (empty: all of them)


def fused_fc2_rows(shape: dict, reps: int) -> list[dict]:
    """SwiGLU then fc2 of the routed experts (ops.swiglu_grouped_matmul), forward + backward: "pallas"
    (SwiGLU's backward in fc2's dgrad epilogue) against "unfused" (the SwiGLU op, then the grouped GEMM),
    on a random routing's group sizes; then the backward's first half alone (dgu from dy) for a few
    configs of the fused dgrad kernel. TFLOP/s counts fc2's GEMM FLOPs (2·R·F·D per GEMM)."""
    T, k, E, D, F = shape["T"], shape["k"], shape["E"], shape["D"], shape["F"]
    key = jax.random.key(11)
    rows_ = T * k
    gs = routed_group_sizes(key, rows_, E)
    gu = jax.random.normal(jax.random.fold_in(key, 1), (rows_, 2 * F), BF16)
    w2 = (0.02 * jax.random.normal(jax.random.fold_in(key, 2), (E, F, D))).astype(BF16)
    flops = 3 * 2 * rows_ * F * D
    row = {"op": "swiglu + grouped fc2 [R,2F]x[E,F,D] fwd+bwd", "ours_backend": "pallas (dgrad epilogue)"}
    for backend, name in (("pallas", "ours"), ("unfused", "unfused")):
        f = lambda a, w: swiglu_grouped_matmul(a, w, gs, backend=backend)  # noqa: E731
        t = kernel_ms(fwd_bwd(f, gu, w2)[0], (gu, w2), reps) / 1e3
        row[f"{name}_ms"], row[f"{name}_tflops"] = 1e3 * t, flops / t / 1e12
    # the backward's first half alone: the fused kernel per config against fc2's dgrad then SwiGLU's
    # backward kernel (what "unfused" runs)
    dy = jax.random.normal(jax.random.fold_in(key, 3), (rows_, D), BF16)
    part = {"op": "fc2 dgrad + swiglu bwd [R,D]x[E,F,D]^T", "ours_backend": "pallas (dgrad epilogue)"}
    plain = jax.jit(lambda dy, w: gmm_pallas.gmm_fwd(dy, w, gs, True, BF16))  # fc2's dgrad alone: no epilogue work
    unfused = jax.jit(lambda dy, w, gu: swiglu_vjp(gu.reshape(rows_, 2, F), plain(dy, w)).reshape(rows_, 2 * F))
    t = kernel_ms(unfused, (dy, w2, gu), reps) / 1e3
    part["unfused_ms"], part["unfused_tflops"] = 1e3 * t, flops / 3 / t / 1e12
    t = kernel_ms(plain, (dy, w2), reps) / 1e3
    part["plain_dgrad_ms"], part["plain_dgrad_tflops"] = 1e3 * t, flops / 3 / t / 1e12
    default = dswiglu_ops.config_for(E)
    variants = fc2_variants(default)
    if FC2_VARIANTS:  # --fc2-variants: these beside the default, timed before and after them
        variants = {k: v for k, v in variants.items() if k in ("default", "default_again", *FC2_VARIANTS)}
    shipped = {name: getattr(dswiglu_ops, name) for name in ("PREFETCH", "FAST_SIGMOID")}
    try:
        for name, (cfg, switches) in variants.items():
            for attr, value in {**shipped, **switches}.items():  # a new jit per variant traces them anew
                setattr(dswiglu_ops, attr, value)
            fused = jax.jit(lambda dy, w, gu, cfg=cfg: dswiglu_ops.gmm_dswiglu_kernel(dy, w, gu, gs, cfg=cfg))
            key_ = "ours" if name == "default" else f"ours_{name}"
            try:
                t = kernel_ms(fused, (dy, w2, gu), reps) / 1e3
            except Exception as e:  # e.g. a config past the SMEM limit: say so, keep the others
                part[f"{key_}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {key_}: {part[key_ + '_error']}", flush=True)
                continue
            part[f"{key_}_ms"], part[f"{key_}_tflops"] = 1e3 * t, flops / 3 / t / 1e12
            print(f"  {key_}: {1e3 * t:.4f} ms (plain dgrad {part['plain_dgrad_ms']:.4f})", flush=True)
    finally:
        for attr, value in shipped.items():
            setattr(dswiglu_ops, attr, value)
    return [row, part]


def wgrad_sumsq_rows(shape: dict, reps: int) -> list[dict]:
    """The experts' weight gradients (fc1's [E,D,2F], fc2's [E,F,D]) with their sum of squares, which the
    optimizer's clip needs: from the wgrad kernel's epilogue (`gmm_wgrad(..., sumsq=True)`, "ours") against
    the kernel then XLA's reduction over its output ("xla_plain"), GPU time; `rel_err`: the two sums'."""
    T, k, E, D, F = shape["T"], shape["k"], shape["E"], shape["D"], shape["F"]
    key = jax.random.key(13)
    rows_ = T * k
    gs = routed_group_sizes(key, rows_, E)
    out = []
    for name, (a_dim, b_dim) in (("fc1", (D, 2 * F)), ("fc2", (F, D))):
        a = jax.random.normal(jax.random.fold_in(key, 1), (rows_, a_dim), BF16)
        b = jax.random.normal(jax.random.fold_in(key, 2), (rows_, b_dim), BF16)
        ours = jax.jit(lambda a, b: gmm_pallas.gmm_wgrad(a, b, gs, BF16, sumsq=True))
        plain = jax.jit(lambda a, b: (lambda w: (w, jnp.sum(jnp.square(w.astype(jnp.float32)))))(
            gmm_pallas.gmm_wgrad(a, b, gs, BF16)))
        (w1, s1), (w2, s2) = ours(a, b), plain(a, b)
        row = {"op": f"{name} wgrad + sum of squares [E,{a_dim},{b_dim}]", "ours_backend": "wgrad epilogue",
               "rel_err": abs(float(s1) - float(s2)) / float(s2), "same_grad": bool(jnp.array_equal(w1, w2)),
               "min_bytes": w1.size * w1.dtype.itemsize}
        row["ours_ms"], row["xla_plain_ms"] = kernel_ms(ours, (a, b), reps), kernel_ms(plain, (a, b), reps)
        out.append(row)
    return out
