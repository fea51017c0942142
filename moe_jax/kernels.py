"""Which kernels a model configuration runs with on this machine: the run's `model:` log line."""
from __future__ import annotations

from ops.grouped_matmul import resolve_backend
from ops.pallas_triton import describe as describe_kernels, one_gpu
from ops.tuning import table_note

from moe_jax.attention import resolve_impl
from moe_jax.experts import act_fc2_fusable


def kernels_note(mc) -> str:
    """Which attention kernel, grouped-GEMM tuning and fused kernels the model runs with here (for the log)."""
    dims = (max(mc.head_dim_, mc.v_head_dim),) if mc.attention_type == "mla" else (mc.head_dim_,)  # mla: v padded
    note = f"attention {resolve_impl(mc.attention_impl, mc.dtype, dims)}"
    if mc.moe is not None:
        gemm = resolve_backend(mc.moe.grouped_gemm_backend, mc.dtype)
        note += f" | grouped GEMM {gemm}" + (f" ({table_note()})" if gemm == "pallas" else "")
        if act_fc2_fusable(mc.moe.activation, mc.moe.grouped_gemm_backend, mc.fused_kernels, mc.dtype):
            note += ", SwiGLU's backward in fc2's dgrad where the shape fits"
    note += f" | norm/RoPE/SwiGLU/cross-entropy kernels {describe_kernels(mc.fused_kernels)}"
    if mc.norm_fanout and mc.norm == "rmsnorm":
        note += " (norm fan-out)"
    if mc.moe is not None and mc.fused_kernels in ("pallas", "interpret"):
        note += ", every pass of the MoE permutation"
    elif mc.moe is not None and mc.fused_kernels == "auto" and one_gpu():
        note += ", the MoE permutation's forward"  # ops.permute's "auto"
        if mc.moe.expert_capacity_factor is None:  # every buffer row an assignment: the token-major backward too
            note += " and unpermute's backward"
    return note
