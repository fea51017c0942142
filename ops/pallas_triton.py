"""Shared pieces of the Pallas (Triton backend) kernels for memory-bound ops: RMSNorm, RoPE and the
gated activation's backward. On an NVIDIA GPU `pl.pallas_call` lowers them through Triton; on CPU the
tests run them in interpret mode. Each op's module holds its plain-JAX reference and its backend choice.
"""
from __future__ import annotations

import warnings

import jax
from jax.experimental.pallas import triton as pltriton

from ops.shard_types import vma

BACKENDS = ("auto", "pallas", "reference")
# JAX 0.11 deprecates Pallas's Triton backend and warns at every lowering of these kernels: a note for
# this library (ops/NOTES_fused_ops.md: the port to Mosaic GPU or jax-triton), not for its users
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)
MAX_ROW = 16384  # widest row (elements) one program holds in registers


def on_nvidia_gpu() -> bool:
    """True when the default device is a CUDA GPU (Triton-lowered Pallas runs there)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and "rocm" not in str(getattr(dev.client, "platform_version", "")).lower()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def one_gpu() -> bool:
    """The program runs on one NVIDIA GPU: where "auto" takes the kernels."""
    return on_nvidia_gpu() and jax.device_count() == 1


def resolve(op: str, backend: str, supported: bool, why: str, interpret: bool, x=None) -> str:
    """"auto" -> "pallas" when the shape is supported and the program runs on one NVIDIA GPU (or in
    interpret mode), else "reference". One device only: a pallas_call has no partitioning rule, so
    under a multi-device jit XLA would gather its operands onto every device; there XLA's own fusions
    run. Inside shard_map (`x`, the input, varies over mesh axes) the kernels are unsupported: Pallas
    outputs carry no varying-axes type. An explicit "pallas" on an unsupported input raises with `why`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; valid: {BACKENDS}")
    if supported and x is not None and vma(x):
        supported, why = False, "inside shard_map (e.g. expert parallelism): the kernels run on one device only"
    if backend == "auto":
        return "pallas" if supported and (interpret or one_gpu()) else "reference"
    if backend == "pallas":
        if not supported:
            raise ValueError(f"{op}: the Pallas kernel does not take this input: {why}; use backend='reference'")
        if not interpret and not on_nvidia_gpu():
            raise ValueError(f"{op}: backend='pallas' needs an NVIDIA GPU (or interpret=True); "
                             f"found {jax.devices()[0].platform}")
    return backend


def describe(kernels: str) -> str:
    """What `ModelConfig.fused_kernels` means here, for the run's log line."""
    if kernels == "auto":
        return "pallas where the shape fits" if one_gpu() else "xla"
    return {"reference": "xla", "interpret": "pallas (interpret mode)"}.get(kernels, kernels)


def backend_args(kernels: str) -> dict:
    """An op's keyword arguments for `ModelConfig.fused_kernels`: "interpret" runs the Pallas kernels in
    interpret mode (CPU tests); the other values are the op's backend."""
    return dict(backend="pallas", interpret=True) if kernels == "interpret" else dict(backend=kernels)


def compiler_params(num_warps: int = 4, num_stages: int = 1, interpret: bool = False):
    return None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def rows_per_block(rows: int, width: int, target: int = 8192) -> int:
    """The largest power of two <= target // width (at least 1) that divides `rows`."""
    br = 1
    while br * 2 * width <= target and rows % (br * 2) == 0:
        br *= 2
    return br
