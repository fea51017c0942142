"""Kernels with custom VJPs, pure-JAX references and backend choice."""
from ops.grouped_matmul import grouped_matmul, is_hopper
from ops.shard_types import match_vma, vma

__all__ = ["grouped_matmul", "is_hopper", "match_vma", "vma"]
