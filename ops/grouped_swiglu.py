"""SwiGLU of gated experts fused with their grouped GEMMs, on either side of the activation.

- `grouped_swiglu(x [M, K], w1 [G, K, 2F], group_sizes [G])` -> h [M, F] = silu(x W_gate) · (x W_up):
  fc1 with the activation in the forward GEMM's epilogue.
- `swiglu_grouped_matmul(gu [M, 2F], w2 [G, F, N], group_sizes)` -> y [M, N] = swiglu(gu) @ w2 per
  group: the activation then fc2, whose backward computes SwiGLU's backward in fc2's dgrad epilogue.

w1's columns (and gu's) are the gate [0, F) then the up projection [F, 2F), as `ops.grouped_matmul` and
`ops.gated_act` lay out fc1. Rows past sum(group_sizes) give zeros.

grouped_swiglu's backends:
- "pallas": the Mosaic-GPU kernel with the activation in its epilogue (ops/gmm_pallas_swiglu.py). It
  writes h beside fc1's output gu [M, 2F], which it keeps for the backward, so the activation reads no
  [M, 2F] back from HBM. Backward: dgu = SwiGLU's backward of (gu, dh) (ops.gated_act's kernel where it
  runs), then the grouped GEMM's dgrad and wgrad on dgu.
- "unfused": `ops.grouped_matmul` then `ops.gated_act.swiglu`, each on its own "auto" backend.
- "reference": plain JAX (one-hot grouped matmul, the formula), differentiated by autodiff.
- "auto": "unfused". The fused kernel measured slower than the pair on the H200 at both benchmark
  shapes (fc1 forward 1.77 vs 1.74 ms mixtral, 1.92 vs 1.82 ms deepseek; ops/NOTES_fused_ops.md),
  so it runs only when asked for.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.gated_act import reference_swiglu, swiglu, swiglu_vjp
from ops.grouped_matmul import (_check, _impl, check_pallas_dtype, grouped_matmul, is_hopper,
                                reference_grouped_matmul, sumsq_tap, wgrad_with_sumsq, PALLAS_DTYPES)
from ops.shard_types import match_vma

BACKENDS = ("auto", "pallas", "unfused", "reference")


def reference_grouped_swiglu(x, w1, group_sizes):
    gu = reference_grouped_matmul(x, w1, group_sizes)
    return reference_swiglu(gu.reshape(gu.shape[0], 2, -1))


def _config(interpret):
    from ops import gmm_pallas_swiglu as K
    return K.INTERPRET_SWIGLU_FWD if interpret else K.SWIGLU_FWD


def kernel_takes(x, w1, interpret=False) -> tuple[bool, str]:
    """Whether the fused kernel takes x [M, K] @ w1 [G, K, 2F], and why not."""
    from ops import gmm_pallas_swiglu as K
    if jnp.dtype(x.dtype) not in PALLAS_DTYPES:
        return False, f"operands are {jnp.dtype(x.dtype).name}, the kernel takes bfloat16/float16"
    why = K.check_shapes(x.shape[0], x.shape[1], w1.shape[-1], _config(interpret))
    return not why, why


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, w1, group_sizes, interpret):
    return _fused_fwd(x, w1, group_sizes, interpret)[0]


def _fused_fwd(x, w1, group_sizes, interpret):
    from ops.gmm_pallas_swiglu import gmm_swiglu_kernel
    gu, h = gmm_swiglu_kernel(x, w1, group_sizes, out_dtype=x.dtype, cfg=_config(interpret),
                              interpret=interpret)
    # the varying type goes on inside the custom_vjp (see ops.grouped_matmul._gmm)
    gu, h = match_vma(gu, x, w1), match_vma(h, x, w1)
    return h, (x, w1, group_sizes, gu)


def _fused_bwd(interpret, res, dh):
    x, w1, group_sizes, gu = res
    rows, f = dh.shape
    act = dict(backend="pallas", interpret=True) if interpret else dict(backend="auto")
    dgu = swiglu_vjp(gu.reshape(rows, 2, f), dh, **act).reshape(rows, 2 * f)
    fwd, wgrad = _impl("pallas", interpret)
    dx = fwd(dgu, w1, group_sizes, True, x.dtype)
    dw1 = wgrad(x, dgu, group_sizes, w1.dtype)
    return match_vma(dx, x), match_vma(dw1, w1), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def resolve_backend(backend: str, x, w1, interpret=False) -> str:
    """"auto" -> "unfused" (see the module docstring); an explicit "pallas" that cannot run raises
    with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_swiglu: unknown backend {backend!r}; valid: {BACKENDS}")
    if backend == "auto":
        return "unfused"
    if backend == "pallas":
        ok, why = kernel_takes(x, w1, interpret)
        if ok and not interpret and not is_hopper():
            ok, why = False, f"it needs a Hopper GPU, found {jax.devices()[0].device_kind}"
        if not ok:
            raise ValueError(f"grouped_swiglu: the fused kernel does not take this input: {why}; "
                             f"use backend='unfused'")
    return backend


def grouped_swiglu(x, w1, group_sizes, *, backend: str = "auto", interpret: bool = False):
    """h[off_g:off_g+size_g] = swiglu(x[off_g:off_g+size_g] @ w1[g]) with w1[g] = [K, 2F] (gate, up);
    [M, F] in x's dtype, fp32 accumulation. `interpret=True` runs the fused kernel in Mosaic-GPU
    interpret mode (CPU tests)."""
    x, w1, group_sizes = jnp.asarray(x), jnp.asarray(w1), jnp.asarray(group_sizes)
    _check(x, w1, group_sizes, False)
    if w1.shape[-1] % 2:
        raise ValueError(f"grouped_swiglu: w1's last dim holds gate and up (2F), got {w1.shape[-1]}")
    group_sizes = group_sizes.astype(jnp.int32)
    backend = resolve_backend(backend, x, w1, interpret)
    if backend == "reference":
        return reference_grouped_swiglu(x, w1, group_sizes).astype(x.dtype)
    if backend == "unfused":
        gu = grouped_matmul(x, w1, group_sizes)
        return swiglu(gu.reshape(gu.shape[0], 2, -1))
    check_pallas_dtype(x.dtype)
    return _fused(x, w1, group_sizes, bool(interpret))


# ----------------------------------------------------------------------------- activation then fc2
SWIGLU_GMM_BACKENDS = ("auto", "pallas", "unfused", "reference")
# "auto" takes the fused dgrad where it runs: measured faster than the unfused pair on the H200 at both
# benchmark shapes (fwd+bwd 1.08x mixtral_small, 1.02x deepseek_small; ops/NOTES_fused_ops.md)
AUTO_FUSED_DGRAD = True


def reference_swiglu_grouped_matmul(gu, w2, group_sizes):
    h = reference_swiglu(gu.reshape(gu.shape[0], 2, -1).astype(jnp.float32))
    return reference_grouped_matmul(h, w2.astype(jnp.float32), group_sizes)


def _dswiglu_config(interpret, num_groups):
    from ops import gmm_pallas_dswiglu as K
    return K.INTERPRET_DSWIGLU_BWD if interpret else K.config_for(num_groups)


def dswiglu_kernel_takes(gu, w2, interpret=False) -> tuple[bool, str]:
    """Whether the fused dgrad kernel takes gu [M, 2F] and w2 [G, F, N], and why not."""
    from ops import gmm_pallas_dswiglu as K
    if jnp.dtype(gu.dtype) not in PALLAS_DTYPES:
        return False, f"operands are {jnp.dtype(gu.dtype).name}, the kernel takes bfloat16/float16"
    why = K.check_shapes(gu.shape[0], w2.shape[2], w2.shape[1], _dswiglu_config(interpret, w2.shape[0]))
    return not why, why


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _act_fc2(gu, w2, group_sizes, probe, interpret, recompute):
    return _act_fc2_fwd(gu, w2, group_sizes, probe, interpret, recompute)[0]


def _act_fc2_fwd(gu, w2, group_sizes, probe, interpret, recompute):
    h = reference_swiglu(gu.reshape(gu.shape[0], 2, -1))  # XLA's fusion runs at HBM speed
    fwd, _ = _impl("pallas", interpret)
    y = match_vma(fwd(h, w2, group_sizes, False, gu.dtype), gu, w2)
    return y, (gu, None if recompute else h, w2, group_sizes, probe)


def _act_fc2_bwd(interpret, recompute, res, dy):
    from ops.gmm_pallas_dswiglu import gmm_dswiglu_kernel
    gu, h, w2, group_sizes, probe = res
    dy = dy.astype(gu.dtype)
    if recompute:  # h for fc2's wgrad made again from gu (not kept from the forward). The barrier ties gu
        # to the cotangent: XLA can neither merge this with the forward's SwiGLU (which would keep h
        # alive after all) nor run it before the backward reaches this layer
        gu_again, dy = jax.lax.optimization_barrier((gu, dy))
        h = reference_swiglu(gu_again.reshape(gu.shape[0], 2, -1))
    rhs = jnp.swapaxes(w2, 1, 2) if interpret else w2  # see gmm_dswiglu_kernel
    dgu = gmm_dswiglu_kernel(dy, rhs, gu, group_sizes, cfg=_dswiglu_config(interpret, w2.shape[0]),
                             interpret=interpret)
    dw2, dprobe = wgrad_with_sumsq("pallas", interpret, h, dy, group_sizes, w2.dtype, probe)
    return match_vma(dgu, gu), match_vma(dw2, w2), None, dprobe


_act_fc2.defvjp(_act_fc2_fwd, _act_fc2_bwd)


def resolve_swiglu_gmm_backend(backend: str, gu, w2, interpret=False) -> str:
    """"auto" -> "pallas" where the fused dgrad kernel runs (a Hopper GPU, bf16/fp16, shapes it takes;
    `interpret` counts as such a GPU) and AUTO_FUSED_DGRAD, else "unfused"; an explicit "pallas" that
    cannot run raises."""
    if backend not in SWIGLU_GMM_BACKENDS:
        raise ValueError(f"swiglu_grouped_matmul: unknown backend {backend!r}; valid: {SWIGLU_GMM_BACKENDS}")
    if backend in ("unfused", "reference"):
        return backend
    if backend == "auto" and not (AUTO_FUSED_DGRAD or interpret):
        return "unfused"
    ok, why = dswiglu_kernel_takes(gu, w2, interpret)
    if ok and not interpret and not is_hopper():
        ok, why = False, f"it needs a Hopper GPU, found {jax.devices()[0].device_kind}"
    if ok:
        return "pallas"
    if backend == "auto":
        return "unfused"
    raise ValueError(f"swiglu_grouped_matmul: the fused kernel does not take this input: {why}; "
                     f"use backend='unfused'")


def swiglu_grouped_matmul(gu, w2, group_sizes, *, backend: str = "auto", interpret: bool = False,
                          recompute: bool = False, sumsq_probe=None):
    """y[off_g:off_g+size_g] = swiglu(gu[off_g:off_g+size_g]) @ w2[g]: gu [M, 2F] (gate, up), w2
    [G, F, N] -> [M, N] in gu's dtype, fp32 accumulation. "pallas" (and "auto" where it runs): forward
    as XLA's SwiGLU fusion then the grouped GEMM; backward dgu from fc2's dgrad with SwiGLU's backward
    in its epilogue (ops/gmm_pallas_dswiglu.py), dw2 the grouped GEMM's wgrad. "unfused":
    `ops.gated_act.swiglu` then `ops.grouped_matmul`, each on its own "auto" backend. `interpret=True`
    runs the fused path's kernels in Mosaic-GPU interpret mode (CPU tests). `recompute=True`: the
    SwiGLU output [M, F] is not kept for the backward; fc2's wgrad gets it again from gu there.
    `sumsq_probe`: its cotangent is Σ dw2² (`ops.grouped_matmul`'s contract)."""
    gu, w2, group_sizes = jnp.asarray(gu), jnp.asarray(w2), jnp.asarray(group_sizes)
    if gu.ndim != 2 or gu.shape[1] % 2:
        raise ValueError(f"swiglu_grouped_matmul: gu must be [M, 2F] (gate, up), got shape {gu.shape}")
    if w2.ndim != 3 or w2.shape[1] != gu.shape[1] // 2:
        raise ValueError(f"swiglu_grouped_matmul: w2 must be [G, F, N] with F = {gu.shape[1] // 2} (half "
                         f"of gu's width), got shape {w2.shape}")
    _check(gu[:, : gu.shape[1] // 2], w2, group_sizes, False)
    group_sizes = group_sizes.astype(jnp.int32)
    backend = resolve_swiglu_gmm_backend(backend, gu, w2, interpret)
    if backend == "reference":
        w2 = w2 if sumsq_probe is None else sumsq_tap(w2, sumsq_probe)
        return reference_swiglu_grouped_matmul(gu, w2, group_sizes).astype(gu.dtype)
    if backend == "unfused":
        def act_fc2(g, w):
            return grouped_matmul(swiglu(g.reshape(g.shape[0], 2, -1)), w, group_sizes, sumsq_probe=sumsq_probe)
        # recompute: only the inputs kept; the backward runs both again (XLA drops the unused fc2
        # output: the compiled gradient has as many dots as without recompute, XLA backend on CPU)
        return (jax.checkpoint(act_fc2) if recompute else act_fc2)(gu, w2)
    return _act_fc2(gu, w2, group_sizes, sumsq_probe, bool(interpret), bool(recompute))
