"""The MoE layer's settings: `MoEConfig` (field names follow Megatron-Core's `--moe-*` flags without the
prefix) and its `DispatchConfig`. Every invalid value fails at construction (`config_checks`)."""
from __future__ import annotations

import dataclasses
import math

from moe_jax.config_checks import check_types, choice, fail, positive

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
DROP_POLICIES = ("probs", "position")
DISPATCHER_TYPES = ("auto", "alltoall", "alltoall_ragged", "allgather")
RAGGED_IMPLS = ("auto", "pallas", "xla", "emulate")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "squared_relu")
ROUTER_DTYPES = ("float32", "float64")
GEMM_BACKENDS = ("auto", "pallas", "xla", "reference")


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How tokens reach the experts: on one device a local sort; across the `expert` mesh axis one of
    the EP dispatchers (`moe_jax.ep`). YAML: `moe: {dispatcher: {type: alltoall, ...}}`; overrides:
    `moe.dispatcher.type=alltoall` (Megatron's `moe.token_dispatcher_type` names the same field)."""

    type: str = "auto"            # auto: alltoall_ragged where its Pallas exchange runs, else alltoall
    buffer_factor: float | None = 2.0  # dropless EP: fast buffer / balanced share (None: worst case)
    overlap_chunks: int = 1       # EP: split local tokens so chunk i+1's exchange overlaps chunk i
    ragged_impl: str = "auto"     # alltoall_ragged exchange: auto | pallas | xla | emulate (CPU tests)
    expert_major: bool | None = None  # alltoall_ragged: segments per (device, expert); None = auto
    fallback: bool = True         # dropless EP: take the worst-case buffer when the fast one overflows

    def __post_init__(self):
        c = "MoEConfig.dispatcher"
        check_types(c, self)
        choice(c, "type", self.type, DISPATCHER_TYPES)
        choice(c, "ragged_impl", self.ragged_impl, RAGGED_IMPLS)
        positive(c, self, "overlap_chunks")
        if self.buffer_factor is not None and not self.buffer_factor > 0:
            fail(c, "buffer_factor", self.buffer_factor, "must be a number > 0, or None for the worst-case buffer")
        if self.expert_major and self.type not in ("alltoall_ragged", "auto"):
            fail(c, "expert_major", True, f"needs type='alltoall_ragged' (got {self.type!r})")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts settings (Megatron `--moe-*` flag names without the prefix)."""

    num_experts: int = 8
    router_topk: int = 2
    ffn_hidden_size: int = 1024
    router_score_function: str = "softmax"
    router_pre_softmax: bool = False
    router_topk_scaling_factor: float | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    # a group's score: the sum of its top `router_group_score_topk` selection scores; None =
    # router_topk // router_group_topk (Megatron); DeepSeek-V3 uses 2, DeepSeek-V2 1 (its best expert)
    router_group_score_topk: int | None = None
    router_enable_expert_bias: bool = False
    router_bias_update_rate: float = 1e-3
    router_load_balancing_type: str = "aux_loss"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float | None = None
    input_jitter_eps: float | None = None
    router_dtype: str = "float32"
    expert_capacity_factor: float | None = None
    token_drop_policy: str = "probs"
    pad_expert_input_to_capacity: bool = False
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    layer_freq: int | tuple[int, ...] = 1
    router_force_load_balancing: bool = False
    # Not Megatron flags, but MoE-layer choices Megatron exposes elsewhere.
    activation: str = "swiglu"
    apply_probs_on_input: bool = False
    grouped_gemm_backend: str = "auto"
    # the experts' activation output not kept for the backward but recomputed there from fc1's output
    # (Megatron's --recompute-modules moe_act): [T*k, F] less per MoE layer, one elementwise pass more
    # (off: on the H200, mixtral_small with fp32 master weights, it lowers the peak 2.75 GiB for 2.6 ms,
    # ~1.5 % of the step; experiments/NOTES_speed.md)
    recompute_activation: bool = False
    # the expert-sorted rows fc1's weight gradient reads ([T*k, D] per MoE layer) gathered again from the
    # tokens in the backward instead of kept. "auto": on where the MoE layer runs on one device, off
    # under expert parallelism (the mesh dispatchers keep their rows; an explicit true there is named in
    # the run's mesh line, not dropped silently). On the H200, mixtral_small fp32: the peak falls
    # 52.58 -> 51.08 GiB for one more gather per layer, +0.77 ms of GPU time per step (~0.5 %);
    # experiments/NOTES_speed.md
    recompute_rows: bool | str = "auto"
    dispatcher: DispatchConfig = DispatchConfig()  # Megatron's token_dispatcher_type is dispatcher.type

    def __post_init__(self):
        c = "MoEConfig"
        if isinstance(self.dispatcher, dict):
            object.__setattr__(self, "dispatcher", DispatchConfig(**self.dispatcher))
        if not isinstance(self.dispatcher, DispatchConfig):
            fail(c, "dispatcher", self.dispatcher, "must be a DispatchConfig (or a mapping of its fields)")
        if isinstance(self.layer_freq, list):
            object.__setattr__(self, "layer_freq", tuple(self.layer_freq))
        check_types(c, self)
        positive(c, self, "num_experts", "router_topk", "ffn_hidden_size")
        if self.router_topk > self.num_experts:
            fail(c, "router_topk", self.router_topk,
                 f"must be <= num_experts ({self.num_experts})")
        choice(c, "router_score_function", self.router_score_function, SCORE_FUNCTIONS)
        choice(c, "router_load_balancing_type", self.router_load_balancing_type, LOAD_BALANCING_TYPES)
        choice(c, "token_drop_policy", self.token_drop_policy, DROP_POLICIES)
        choice(c, "router_dtype", self.router_dtype, ROUTER_DTYPES)
        choice(c, "activation", self.activation, ACTIVATIONS)
        choice(c, "grouped_gemm_backend", self.grouped_gemm_backend, GEMM_BACKENDS)
        if isinstance(self.recompute_rows, str) and self.recompute_rows != "auto":
            fail(c, "recompute_rows", self.recompute_rows, "must be true, false or 'auto'")
        if self.router_pre_softmax and self.router_score_function != "softmax":
            fail(c, "router_pre_softmax", True,
                 f"only applies to router_score_function='softmax' (got {self.router_score_function!r})")
        if (self.router_num_groups is None) != (self.router_group_topk is None):
            fail(c, "router_group_topk", self.router_group_topk,
                 "router_num_groups and router_group_topk must be set together (or both None)")
        if self.router_num_groups is not None:
            positive(c, self, "router_num_groups", "router_group_topk")
            if self.num_experts % self.router_num_groups:
                fail(c, "router_num_groups", self.router_num_groups,
                     f"must divide num_experts ({self.num_experts})")
            if self.router_group_topk > self.router_num_groups:
                fail(c, "router_group_topk", self.router_group_topk,
                     f"must be <= router_num_groups ({self.router_num_groups})")
            per_group = self.num_experts // self.router_num_groups
            if self.router_group_score_topk is None and self.router_topk % self.router_group_topk:
                fail(c, "router_group_topk", self.router_group_topk,
                     f"must divide router_topk ({self.router_topk}) unless router_group_score_topk is set")
            if self.router_group_score_topk is not None:
                positive(c, self, "router_group_score_topk")
                if self.router_group_score_topk > per_group:
                    fail(c, "router_group_score_topk", self.router_group_score_topk,
                         f"must be <= experts per group ({per_group})")
            if self.router_topk > self.router_group_topk * per_group:
                fail(c, "router_topk", self.router_topk,
                     f"must be <= router_group_topk*experts_per_group "
                     f"({self.router_group_topk}*{per_group})")
        if self.router_group_score_topk is not None and self.router_num_groups is None:
            fail(c, "router_group_score_topk", self.router_group_score_topk,
                 "needs group-limited routing (router_num_groups and router_group_topk)")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            fail(c, "expert_capacity_factor", self.expert_capacity_factor,
                 "must be > 0, or None for dropless")
        if self.pad_expert_input_to_capacity and self.expert_capacity_factor is None:
            fail(c, "pad_expert_input_to_capacity", True, "needs expert_capacity_factor to be set")
        for f in ("aux_loss_coeff", "router_bias_update_rate"):
            if getattr(self, f) < 0:
                fail(c, f, getattr(self, f), "must be >= 0")
        for f in ("z_loss_coeff", "input_jitter_eps", "router_topk_scaling_factor"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                fail(c, f, v, "must be > 0, or None to disable")
        if self.shared_expert_intermediate_size is not None:
            positive(c, self, "shared_expert_intermediate_size")
        elif self.shared_expert_gate:
            fail(c, "shared_expert_gate", True, "needs shared_expert_intermediate_size to be set")
        if self.apply_probs_on_input and self.router_topk != 1:
            fail(c, "apply_probs_on_input", True,
                 f"requires router_topk == 1 (got {self.router_topk})")
        lf = self.layer_freq
        if isinstance(lf, tuple):
            if not lf or any(v not in (0, 1) for v in lf):
                fail(c, "layer_freq", lf, "a pattern must be a non-empty list of 0 (dense) / 1 (MoE)")
        elif not isinstance(lf, int) or isinstance(lf, bool) or lf <= 0:
            fail(c, "layer_freq", lf, "must be a positive int or a list of 0/1")

    @property
    def shared_size(self) -> int:
        return self.shared_expert_intermediate_size or 0

    @property
    def group_score_topk(self) -> int | None:
        """Experts per group summed into a group's score (None without group-limited routing)."""
        if self.router_num_groups is None:
            return None
        return self.router_group_score_topk or self.router_topk // self.router_group_topk

    @property
    def token_dispatcher_type(self) -> str:
        """Megatron's `--moe-token-dispatcher-type`: `dispatcher.type`."""
        return self.dispatcher.type


def capacity(num_tokens: int, cfg: MoEConfig) -> int | None:
    """Per-expert capacity ceil(T*k/E*factor), or None when dropless."""
    if cfg.expert_capacity_factor is None:
        return None
    return max(1, math.ceil(num_tokens * cfg.router_topk / cfg.num_experts * cfg.expert_capacity_factor))
