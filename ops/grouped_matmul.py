"""Grouped (ragged) matmul: rows of lhs in contiguous groups, group g multiplied by rhs[g].

`grouped_matmul(lhs[M,K], rhs[G,K,N], group_sizes[G])` -> [M,N]. Rows past sum(group_sizes) are zero.
Backends: "reference" (plain JAX, autodiff), "xla" (lax.ragged_dot), "pallas" (Mosaic GPU, Hopper;
bf16/fp16 only), "auto" (pallas for bf16/fp16 on Hopper, xla elsewhere and for float32).
"xla" and "pallas" share one custom_vjp:
  dgrad: dlhs = grouped_matmul(dy, rhs, transposed)       wgrad: drhs[g] = lhs_g^T dy_g -> [G,K,N]
`sumsq_probe` (a float32 scalar, any value): its cotangent is defined as Σ drhs², the weight gradient's sum
of squares, which a caller that differentiates with respect to the probe too gets with no pass over drhs
(the Pallas wgrad kernel sums it in its epilogue; other backends reduce drhs; `sumsq_tap` on any weight).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ops.shard_types import match_vma

BACKENDS = ("auto", "reference", "xla", "pallas")


# ----------------------------------------------------------------------------- reference
def reference_grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None):
    """Plain-JAX grouped matmul (one-hot row->group mask; G times the dense FLOPs). Differentiable."""
    out_dtype = out_dtype or lhs.dtype
    onehot = group_onehot(group_sizes, lhs.shape[0])  # [G,M] f32
    spec = "gnk" if transpose_rhs else "gkn"
    y = jnp.einsum(f"gm,mk,{spec}->mn", onehot, lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def group_onehot(group_sizes, m):
    """[G,M] float32: 1 where row m belongs to group g (rows past sum(group_sizes) in none)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    rows = jnp.arange(m, dtype=jnp.int32)
    return ((rows[None] >= starts[:, None]) & (rows[None] < ends[:, None])).astype(jnp.float32)


# ----------------------------------------------------------------------------- xla
def xla_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype):
    contract_rhs = 2 if transpose_rhs else 1
    dn = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [contract_rhs]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    y = lax.ragged_dot_general(lhs, rhs, group_sizes, dn, preferred_element_type=jnp.float32,
                               out_sharding=_explicit_out_spec(lhs, 2, keep_rows=True))
    # ragged_dot leaves rows past sum(group_sizes) unspecified on some platforms: zero them.
    return _mask_tail(y, group_sizes).astype(out_dtype)


def xla_wgrad(a, b, group_sizes, out_dtype):
    """[G,A,B] with out[g] = a_g^T b_g (a[M,A], b[M,B]); ragged contraction over rows."""
    dn = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    a = _mask_tail(a, group_sizes)
    return lax.ragged_dot_general(a, b, group_sizes, dn, preferred_element_type=jnp.float32,
                                  out_sharding=_explicit_out_spec(a, 3, keep_rows=False)).astype(out_dtype)


def _explicit_out_spec(ref, ndim, keep_rows):
    """Arrays on a mesh with Explicit axes need ragged_dot's out_sharding: rows keep `ref`'s row
    sharding (when keep_rows), other dims replicated. None (inferred) otherwise."""
    sharding = jax.typeof(ref).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    rows = (tuple(sharding.spec) + (None,))[0] if keep_rows else None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows, *([None] * (ndim - 1))))


def _mask_tail(x, group_sizes):
    total = jnp.sum(group_sizes.astype(jnp.int32))
    keep = jnp.arange(x.shape[0], dtype=jnp.int32) < total
    return jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- custom_vjp
def _sumsq(x):
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def wgrad_with_sumsq(backend, interpret, a, b, group_sizes, out_dtype, probe):
    """(out[g] = a_g^T b_g, the probe's cotangent): Σ out² (float32, of the values written) where a probe
    is given — from the Pallas kernel's epilogue, else a reduction over out — and None where not."""
    _, wgrad = _impl(backend, interpret)
    if probe is None:
        return wgrad(a, b, group_sizes, out_dtype), None
    if backend == "pallas":
        out, sq = wgrad(a, b, group_sizes, out_dtype, sumsq=True)
    else:
        out = wgrad(a, b, group_sizes, out_dtype)
        sq = _sumsq(out)
    return out, sq.astype(probe.dtype)


@jax.custom_vjp
def sumsq_tap(w, probe):
    """w, unchanged; in the backward the probe's cotangent is Σ dw² (a reduction over dw): the probe
    contract of `grouped_matmul` for a weight used by any other op (e.g. the "reference" backend)."""
    return w


def _tap_fwd(w, probe):
    return w, jnp.zeros((), probe.dtype)  # (only its dtype: the cotangent's)


def _tap_bwd(like, dw):
    return dw, _sumsq(dw).astype(like.dtype)


sumsq_tap.defvjp(_tap_fwd, _tap_bwd)


def _impl(backend, interpret):
    """(fwd, wgrad) functions of a kernel backend."""
    if backend == "xla":
        return xla_fwd, xla_wgrad
    from ops import gmm_pallas  # imported lazily: needs Mosaic GPU modules
    return (functools.partial(gmm_pallas.gmm_fwd, interpret=interpret),
            functools.partial(gmm_pallas.gmm_wgrad, interpret=interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, probe, transpose_rhs, backend, out_dtype, interpret):
    fwd, _ = _impl(backend, interpret)
    # the varying type goes on inside the custom_vjp, where it is not differentiated: outside, the
    # cast's transpose would psum the cotangent over the mesh axes (wrong gradients, and an
    # all-reduce of [M, N] per GEMM under shard_map)
    return match_vma(fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype), lhs, rhs)


def _gmm_fwd(lhs, rhs, group_sizes, probe, transpose_rhs, backend, out_dtype, interpret):
    out = _gmm(lhs, rhs, group_sizes, probe, transpose_rhs, backend, out_dtype, interpret)
    return out, (lhs, rhs, group_sizes, probe)


def _gmm_bwd(transpose_rhs, backend, out_dtype, interpret, res, dy):
    lhs, rhs, group_sizes, probe = res
    fwd, _ = _impl(backend, interpret)
    dy = dy.astype(lhs.dtype)  # kernels take one operand dtype; accumulation stays fp32
    dlhs = fwd(dy, rhs, group_sizes, not transpose_rhs, lhs.dtype)
    # rhs[g] is [N,K] (transposed): drhs[g] = dy_g^T lhs_g; else [K,N]: drhs[g] = lhs_g^T dy_g
    a, b = (dy, lhs) if transpose_rhs else (lhs, dy)
    drhs, dprobe = wgrad_with_sumsq(backend, interpret, a, b, group_sizes, rhs.dtype, probe)
    return match_vma(dlhs, lhs), match_vma(drhs, rhs), None, dprobe


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6, 7))
def _gmm_remade(make_lhs, lhs_args, rhs, group_sizes, probe, backend, out_dtype, interpret):
    return _gmm(make_lhs(*lhs_args), rhs, group_sizes, probe, False, backend, out_dtype, interpret)


def _gmm_remade_fwd(make_lhs, lhs_args, rhs, group_sizes, probe, backend, out_dtype, interpret):
    out = _gmm_remade(make_lhs, lhs_args, rhs, group_sizes, probe, backend, out_dtype, interpret)
    return out, (lhs_args, rhs, group_sizes, probe)  # lhs itself is not kept


def _gmm_remade_bwd(make_lhs, backend, out_dtype, interpret, res, dy):
    lhs_args, rhs, group_sizes, probe = res
    # lhs is made again only once dy exists: without the tie XLA may schedule it in the forward
    # (or merge it with the forward's), and it would be held all the same
    lhs_args, dy = lax.optimization_barrier((lhs_args, dy))
    lhs, pull = jax.vjp(make_lhs, *lhs_args)
    dlhs, drhs, _, dprobe = _gmm_bwd(False, backend, out_dtype, interpret, (lhs, rhs, group_sizes, probe), dy)
    return pull(dlhs), drhs, None, dprobe


_gmm_remade.defvjp(_gmm_remade_fwd, _gmm_remade_bwd)


# ----------------------------------------------------------------------------- public
def is_hopper(device=None) -> bool:
    """True on an H100/H200-class GPU (compute capability 9.x)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return False
    cc = getattr(device, "compute_capability", None)
    if cc is not None and str(cc).startswith("9"):
        return True
    kind = device.device_kind.upper()
    return "H100" in kind or "H200" in kind or "H800" in kind or "H20" in kind


PALLAS_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_pallas_dtype(dtype) -> None:
    """The Pallas kernels take bfloat16/float16 operands (float32 would run as tf32 on wgmma)."""
    if jnp.dtype(dtype) not in PALLAS_DTYPES:
        raise ValueError(f"grouped_matmul: backend='pallas' supports bfloat16/float16 operands, "
                         f"got {jnp.dtype(dtype)} (float32 would run as tf32 on wgmma); use "
                         f"backend='xla' (backend='auto' does so for float32)")


def resolve_backend(backend: str, dtype=jnp.bfloat16) -> str:
    """"auto" -> "pallas" for bf16/fp16 on Hopper, else "xla" (float32 always goes to xla)."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_matmul: unknown backend {backend!r}; valid: {BACKENDS}")
    if backend == "auto":
        return "pallas" if (is_hopper() and jnp.dtype(dtype) in PALLAS_DTYPES) else "xla"
    return backend


def _check_pallas(backend, dtype, interpret):
    if backend != "pallas":
        return
    check_pallas_dtype(dtype)
    if not interpret:
        dev = jax.devices()[0]
        if not is_hopper(dev):
            raise ValueError(
                "grouped_matmul: backend='pallas' needs a Hopper GPU (H100/H200, compute "
                f"capability 9.0); found {dev.platform}:{dev.device_kind}. Use backend='xla'.")


def _check(lhs, rhs, group_sizes, transpose_rhs):
    if lhs.ndim != 2:
        raise ValueError(f"grouped_matmul: lhs must be rank 2 [M,K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"grouped_matmul: rhs must be rank 3 [G,K,N] (or [G,N,K] with "
                         f"transpose_rhs=True), got shape {rhs.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"grouped_matmul: group_sizes must be rank 1 [G], got shape "
                         f"{group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integer (int32), got "
                         f"{group_sizes.dtype}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        layout = "[G,N,K]" if transpose_rhs else "[G,K,N]"
        raise ValueError(f"grouped_matmul: K mismatch: lhs {lhs.shape} has K={lhs.shape[1]} but "
                         f"rhs {rhs.shape} ({layout}, transpose_rhs={transpose_rhs}) has K={k_rhs}")
    if rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"grouped_matmul: G mismatch: rhs has {rhs.shape[0]} groups but "
                         f"group_sizes has {group_sizes.shape[0]}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"grouped_matmul: {name} must be floating point, got {x.dtype}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"grouped_matmul: lhs and rhs must share a dtype, got {lhs.dtype} and "
                         f"{rhs.dtype}")


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs=False, backend="auto",
                   preferred_element_type=None, interpret=False, sumsq_probe=None):
    """out[off_g:off_g+size_g] = lhs[off_g:off_g+size_g] @ rhs[g]  (rhs[g].T if transpose_rhs).

    lhs [M,K]; rhs [G,K,N] ([G,N,K] if transpose_rhs); group_sizes [G] int32, rows grouped
    contiguously; rows past sum(group_sizes) give zeros. Output dtype = preferred_element_type or
    lhs.dtype; accumulation in float32. `interpret=True` runs the Pallas kernels in Mosaic-GPU
    interpret mode (CPU tests). `sumsq_probe`: see the module docstring.
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check(lhs, rhs, group_sizes, transpose_rhs)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    backend = "pallas" if (interpret and backend == "auto") else resolve_backend(backend,
                                                                                 lhs.dtype)
    if backend == "reference":
        rhs = rhs if sumsq_probe is None else sumsq_tap(rhs, sumsq_probe)
        return reference_grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                        out_dtype=out_dtype)
    _check_pallas(backend, lhs.dtype, interpret)
    return _gmm(lhs, rhs, group_sizes, sumsq_probe, bool(transpose_rhs), backend, out_dtype, bool(interpret))


def grouped_matmul_remade_lhs(make_lhs, lhs_args: tuple, rhs, group_sizes, *, backend="auto",
                              interpret=False, sumsq_probe=None):
    """`grouped_matmul(make_lhs(*lhs_args), rhs, group_sizes)`, with lhs made again in the backward
    instead of kept from the forward: the backward keeps `lhs_args` and, when it reaches this op, runs
    `make_lhs` (and its VJP, for the cotangents of `lhs_args`) once more. For an lhs that is larger
    than its inputs and cheap to make — the MoE's expert-sorted rows, a gather of the tokens that
    is k times their size. `make_lhs` is a static function of arrays (hashable: not a fresh lambda
    per call inside a loop that JAX must not retrace); out dtype = lhs's. `sumsq_probe`: as grouped_matmul's."""
    lhs_args = tuple(jnp.asarray(a) for a in lhs_args)
    lhs = jax.eval_shape(make_lhs, *lhs_args)
    rhs, group_sizes = jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check(lhs, rhs, group_sizes, False)
    backend = "pallas" if (interpret and backend == "auto") else resolve_backend(backend, lhs.dtype)
    if backend == "reference":
        rhs = rhs if sumsq_probe is None else sumsq_tap(rhs, sumsq_probe)
        return reference_grouped_matmul(make_lhs(*lhs_args), rhs, group_sizes)
    _check_pallas(backend, lhs.dtype, interpret)
    return _gmm_remade(make_lhs, lhs_args, rhs, group_sizes.astype(jnp.int32), sumsq_probe, backend,
                       jnp.dtype(lhs.dtype), bool(interpret))
