"""fc1 and SwiGLU of gated experts in one grouped GEMM: h = silu(x W_gate) · (x W_up) per row group.

`grouped_swiglu(x [M, K], w1 [G, K, 2F], group_sizes [G])` -> h [M, F]; w1's columns are the gate
[0, F) then the up projection [F, 2F), as `ops.grouped_matmul` and `ops.gated_act` lay out fc1.
Rows past sum(group_sizes) give zeros.

Backends:
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
                                reference_grouped_matmul, PALLAS_DTYPES)
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
