"""Routed experts over expert-sorted rows: `GroupedExperts` (grouped GEMM) and `SequentialExperts`
(a per-expert loop, the reference). Both hold the same parameters, so one can be checked against the
other on the same weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import ops
from moe_jax.config import ModelConfig
from moe_jax import sumsq_probes
from moe_jax.layers import activate, n_in, param
from ops.grouped_matmul import resolve_backend as gmm_backend
from ops import grouped_swiglu
from ops.grouped_swiglu import resolve_swiglu_gmm_backend, swiglu_grouped_matmul
from ops.pallas_triton import one_gpu


def grouped_ffn(x_ND, group_sizes_E, w1_EDnF, w2_EFD, activation: str, backend: str,
                kernels: str = "reference", recompute_act: bool = False, rows_of=None,
                probes=(None, None)) -> jax.Array:
    """fc1 → activation → fc2 of expert g on its contiguous row group, as two grouped GEMMs
    (`kernels`: the activation's backend, ModelConfig.fused_kernels). SwiGLU's backward runs in fc2's
    dgrad epilogue (ops.grouped_swiglu.swiglu_grouped_matmul) where `fuse_act_fc2` says so.
    `recompute_act`: the activation's output is recomputed in the backward, not kept. `rows_of`
    (make, args), with x_ND None: the rows are make(*args), made again in fc1's backward
    (ops.grouped_matmul_remade_lhs) instead of kept. `probes`: w1's and w2's `sumsq_probe`
    (moe_jax/sumsq_probes.py), or None."""
    e, d, n, f = w1_EDnF.shape
    interpret = kernels == "interpret" and backend == "pallas"  # CPU tests of the whole Pallas path
    if rows_of is None:
        h = ops.grouped_matmul(x_ND, w1_EDnF.reshape(e, d, n * f), group_sizes_E, backend=backend,
                               interpret=interpret, sumsq_probe=probes[0])
    else:
        h = ops.grouped_matmul_remade_lhs(*rows_of, w1_EDnF.reshape(e, d, n * f), group_sizes_E,
                                          backend=backend, interpret=interpret, sumsq_probe=probes[0])
    h = checkpoint_name(h, "gmm_out")
    if fuse_act_fc2(activation, backend, kernels, h, w2_EFD):
        y = swiglu_grouped_matmul(h, w2_EFD, group_sizes_E, backend="pallas", interpret=interpret,
                                  recompute=recompute_act, sumsq_probe=probes[1])
    else:
        def act_fc2(g, w):
            return ops.grouped_matmul(activate(g.reshape(-1, n, f), activation, kernels), w, group_sizes_E,
                                      backend=backend, interpret=interpret, sumsq_probe=probes[1])
        # recompute: only the inputs kept; the backward runs both again (XLA drops the unused fc2
        # output: the compiled gradient has as many dots as without recompute, XLA backend on CPU)
        y = (jax.checkpoint(act_fc2) if recompute_act else act_fc2)(h, w2_EFD)
    return checkpoint_name(y, "gmm_out")


def fuse_act_fc2(activation: str, backend: str, kernels: str, gu_N2F, w2_EFD) -> bool:
    """Whether SwiGLU and fc2 run as ops.grouped_swiglu.swiglu_grouped_matmul (its backward: SwiGLU's in
    fc2's dgrad epilogue): where `act_fc2_fusable` says so, outside shard_map (as the other fused kernels;
    not yet run under expert parallelism) and the fused kernel takes the shapes — or, with
    kernels="interpret" and Pallas grouped GEMMs, all in interpret mode (CPU tests)."""
    if activation == "swiglu" and kernels == "interpret" and backend == "pallas":
        return resolve_swiglu_gmm_backend("auto", gu_N2F, w2_EFD, interpret=True) == "pallas"
    return (act_fc2_fusable(activation, backend, kernels, gu_N2F.dtype) and not ops.vma(gu_N2F)
            and resolve_swiglu_gmm_backend("auto", gu_N2F, w2_EFD) == "pallas")


def act_fc2_fusable(activation: str, backend: str, kernels: str, dtype) -> bool:
    """The configuration's half of `fuse_act_fc2` (the run's log line reports it): SwiGLU, `kernels` auto
    or pallas, the grouped GEMMs on their Pallas kernels on one GPU, and ops.grouped_swiglu's "auto"
    taking the fused dgrad (AUTO_FUSED_DGRAD)."""
    return (activation == "swiglu" and kernels in ("auto", "pallas") and one_gpu()
            and gmm_backend(backend, dtype) == "pallas" and grouped_swiglu.AUTO_FUSED_DGRAD)


class GroupedExperts(nnx.Module):
    """E SwiGLU/GeLU/... MLPs applied to contiguous row groups: fc1 [E, D, n_in, F], fc2 [E, F, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.activation, self.backend, self.kernels = m.activation, m.grouped_gemm_backend, cfg.fused_kernels
        self.recompute_act = m.recompute_activation
        self.dtype = jnp.dtype(cfg.dtype)
        e, d, f = m.num_experts, cfg.d_model, m.ffn_hidden_size
        self.w1_EDnF = param(rngs, (e, d, n_in(m.activation), f), ("exp", "embed_moe", None, "mlp_moe"),
                             cfg.init_std, cfg.param_dtype)
        self.w2_EFD = param(rngs, (e, f, d), ("exp", "mlp_moe", "embed_moe"), cfg.init_std,
                            cfg.param_dtype)

    def weights(self) -> tuple[jax.Array, jax.Array]:
        return self.w1_EDnF[...].astype(self.dtype), self.w2_EFD[...].astype(self.dtype)

    def __call__(self, x_ND: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        w1, w2 = self.weights()
        return grouped_ffn(x_ND.astype(self.dtype), group_sizes_E, w1, w2, self.activation, self.backend,
                           self.kernels, self.recompute_act, probes=sumsq_probes.take(self))

    def on_remade_rows(self, make, args: tuple, group_sizes_E: jax.Array) -> jax.Array:
        """The experts on rows = make(*args) (in the compute dtype), which fc1's backward makes again
        rather than keep (MoEConfig.recompute_rows)."""
        w1, w2 = self.weights()
        return grouped_ffn(None, group_sizes_E, w1, w2, self.activation, self.backend, self.kernels,
                           self.recompute_act, rows_of=(make, args), probes=sumsq_probes.take(self))


class SequentialExperts(GroupedExperts):
    """Reference: each expert as a plain dense MLP on its rows (masked), one after another."""

    def on_remade_rows(self, make, args: tuple, group_sizes_E: jax.Array) -> jax.Array:
        return self(make(*args), group_sizes_E)  # the reference keeps its rows

    def __call__(self, x_ND: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        w1, w2 = self.weights()
        x = x_ND.astype(self.dtype)
        ends = jnp.cumsum(group_sizes_E)
        row = jnp.arange(x.shape[0])
        expert_of_row = jnp.searchsorted(ends, row, side="right")  # == E past the last group
        y = jnp.zeros(x.shape[:1] + (w2.shape[-1],), self.dtype)
        for i in range(w1.shape[0]):
            h = activate(jnp.einsum("nd,dkf->nkf", x, w1[i]), self.activation)
            y = y + jnp.where((expert_of_row == i)[:, None], h @ w2[i], 0)
        return y
