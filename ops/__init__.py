"""Kernels with custom VJPs, pure-JAX references and backend choice."""
from ops.grouped_matmul import grouped_matmul

__all__ = ["grouped_matmul"]
