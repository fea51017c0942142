"""Kernels with custom VJPs, pure-JAX references and backend choice (`ops.permute` holds the MoE
token permutation: `from ops.permute import permute, unpermute`)."""
from ops.cross_entropy import linear_cross_entropy
from ops.grouped_matmul import grouped_matmul, grouped_matmul_remade_lhs, is_hopper
from ops.shard_types import match_vma, vma

__all__ = ["grouped_matmul", "grouped_matmul_remade_lhs", "is_hopper", "linear_cross_entropy", "match_vma", "vma"]
