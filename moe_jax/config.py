"""Frozen configuration dataclasses and their validation (YAML presets and overrides: `presets.py`):
`Config` = `ModelConfig` (with its `MoEConfig`, in `moe_config`) + `TrainConfig` + `ParallelConfig`.
Every invalid value fails at construction with a `ValueError` naming the field, the value and what would
be valid (`config_checks`).
"""
from __future__ import annotations

import dataclasses

from moe_jax.config_checks import check_types, choice, fail, positive
from moe_jax.moe_config import ACTIVATIONS, DispatchConfig, MoEConfig, capacity  # noqa: F401  (re-exported)

NORMS = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "cudnn", "xla")
FUSED_KERNELS = ("auto", "pallas", "reference", "interpret")
REMAT_MODES = ("none", "full", "selective")
ATTENTION_TYPES = ("gqa", "mla")
ROPE_SCALING_TYPES = ("yarn", "linear")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE scaling (Hugging Face `rope_scaling` meanings; tables in `moe_jax.rope`). YAML:
    `model: {rope_scaling: {type: yarn, factor: 40, ...}}`; overrides: `model.rope_scaling.factor=8`."""

    type: str = "yarn"            # yarn | linear
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn: the pre-training context length
    beta_fast: float = 32.0       # yarn: rotations where the ramp starts (extrapolation above)
    beta_slow: float = 1.0        # yarn: rotations where it ends (interpolation below)
    mscale: float | None = None   # yarn: attention factor = mscale(factor, mscale)/mscale(factor, mscale_all_dim)
    mscale_all_dim: float | None = None  # yarn: also MLA's softmax scale *= mscale(factor, mscale_all_dim)^2

    def __post_init__(self):
        c = "RopeScalingConfig"
        check_types(c, self)
        choice(c, "type", self.type, ROPE_SCALING_TYPES)
        if not self.factor >= 1:
            fail(c, "factor", self.factor, "must be >= 1")
        if self.type == "yarn":
            if self.original_max_position_embeddings is None:
                fail(c, "original_max_position_embeddings", None, "yarn needs it (a positive integer)")
            positive(c, self, "original_max_position_embeddings")
            if not self.beta_fast > self.beta_slow > 0:
                fail(c, "beta_fast", self.beta_fast,
                     f"yarn needs beta_fast > beta_slow > 0 (beta_slow={self.beta_slow})")
        for f in ("mscale", "mscale_all_dim"):
            v = getattr(self, f)
            if v is not None and (self.type != "yarn" or v < 0):
                fail(c, f, v, "only yarn takes it, as a number >= 0 (or None)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """GPT architecture. `moe=None` gives a dense model."""

    vocab_size: int = 512
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    ffn_hidden_size: int = 1024
    max_seq_len: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    activation: str = "swiglu"
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str | bool = "none"    # none | full | selective (moe_jax.model); true/false = full/none
    scan_layers: bool = False     # true: each run of like layers is one lax.scan (flat compile time,
                                  # slower step); false: a Python loop over the layers (moe_jax.model)
    attention_impl: str | None = "auto"  # auto (cuDNN flash where it runs, else XLA) | cudnn | xla;
    # None (earlier configs) means auto
    fused_kernels: str = "auto"   # RMSNorm, RoPE, SwiGLU's backward, the MoE permutation's forward (and,
    # without a capacity, unpermute's backward), the cross-entropy's softmax pass: auto
    # (Pallas/Triton kernels on one NVIDIA GPU where the shape fits, else plain JAX) | pallas (these, and
    # every pass of the permutation, ops.permute) | reference (plain JAX, fused by XLA) | interpret (the
    # Pallas kernels in interpret mode: CPU tests)
    norm_fanout: bool = False     # the pre-attention and pre-MoE RMSNorms hand each consumer (q, k, v; router,
    # dispatch, shared experts) its own copy, so the norm's backward kernel sums their gradients instead of an
    # XLA pass (ops.rms_norm fanout; takes effect where the norm kernels run)
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2 / Qwen2-MoE)
    qk_norm: bool = False         # RMSNorm over head_dim on q and k before RoPE (Qwen3 / Qwen3-MoE)
    rope_scaling: RopeScalingConfig | None = None  # None: plain RoPE (moe_jax.rope)
    attention_type: str = "gqa"   # gqa | mla (DeepSeek-V2/V3 multi-head latent attention, moe_jax.mla)
    q_lora_rank: int | None = None        # mla: query latent rank (None: a plain query projection)
    kv_lora_rank: int | None = None       # mla: compressed key/value latent rank
    qk_nope_head_dim: int | None = None   # mla: per-head q/k dims without RoPE
    qk_rope_head_dim: int | None = None   # mla: q/k dims with RoPE (the key's are shared by all heads)
    v_head_dim: int | None = None         # mla: per-head value dims
    mtp_num_layers: int = 0       # multi-token prediction modules (DeepSeek-V3; moe_jax.mtp); 0 = off
    mtp_loss_scaling_factor: float = 0.1  # weight of the mean MTP loss in the training loss
    moe: MoEConfig | None = None

    def __post_init__(self):
        c = "ModelConfig"
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            fail(c, "moe", self.moe, "must be a MoEConfig (or a mapping of its fields), or None")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScalingConfig(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScalingConfig):
            fail(c, "rope_scaling", self.rope_scaling,
                 "must be a RopeScalingConfig (or a mapping of its fields), or None")
        check_types(c, self)
        positive(c, self, "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "ffn_hidden_size", "max_seq_len")
        self._check_mla()
        if self.head_dim is not None:
            positive(c, self, "head_dim")
        elif self.d_model % self.num_heads and self.attention_type == "gqa":
            fail(c, "num_heads", self.num_heads,
                 f"must divide d_model ({self.d_model}) unless head_dim is set")
        if self.num_heads % self.num_kv_heads and self.attention_type == "gqa":  # MLA does not use it
            fail(c, "num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads ({self.num_heads})")
        if self.rope_dim % 2:
            fail(c, "head_dim", self.head_dim_, "must be even for RoPE")
        if self.mtp_num_layers < 0:
            fail(c, "mtp_num_layers", self.mtp_num_layers, "must be >= 0 (0 = off)")
        if not self.mtp_loss_scaling_factor >= 0:
            fail(c, "mtp_loss_scaling_factor", self.mtp_loss_scaling_factor, "must be >= 0")
        choice(c, "norm", self.norm, NORMS)
        choice(c, "activation", self.activation, ACTIVATIONS)
        choice(c, "dtype", self.dtype, DTYPES)
        choice(c, "param_dtype", self.param_dtype, DTYPES)
        if self.attention_impl is None:  # earlier configs: None let JAX pick (XLA)
            object.__setattr__(self, "attention_impl", "auto")
        choice(c, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
        choice(c, "fused_kernels", self.fused_kernels, FUSED_KERNELS)
        if not isinstance(self.norm_fanout, bool):
            fail(c, "norm_fanout", self.norm_fanout, "must be true or false")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        choice(c, "remat", self.remat, REMAT_MODES)
        if not self.norm_eps > 0:
            fail(c, "norm_eps", self.norm_eps, "must be > 0")
        if not self.init_std > 0:
            fail(c, "init_std", self.init_std, "must be > 0")
        if self.moe is not None and isinstance(self.moe.layer_freq, tuple):
            if len(self.moe.layer_freq) != self.num_layers:
                fail("MoEConfig", "layer_freq", list(self.moe.layer_freq),
                     f"a pattern needs one entry per layer (num_layers={self.num_layers})")

    def _check_mla(self) -> None:
        c = "ModelConfig"
        choice(c, "attention_type", self.attention_type, ATTENTION_TYPES)
        if self.attention_type == "mla" and self.head_dim is not None:
            fail(c, "head_dim", self.head_dim, "only applies to attention_type='gqa' (MLA's head dims are "
                 "qk_nope_head_dim + qk_rope_head_dim and v_head_dim)")
        if self.attention_type == "gqa":
            for f in MLA_FIELDS:
                if getattr(self, f) is not None:
                    fail(c, f, getattr(self, f), "only applies to attention_type='mla' (leave it null)")
            return
        for f in MLA_FIELDS[1:]:
            if getattr(self, f) is None:
                fail(c, f, None, "attention_type='mla' needs it (a positive integer)")
        positive(c, self, *MLA_FIELDS[1:])
        if self.q_lora_rank is not None:
            positive(c, self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            fail(c, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even for RoPE")
        for f in ("attention_bias", "qk_norm"):
            if getattr(self, f):
                fail(c, f, True, "not implemented with attention_type='mla'")

    @property
    def head_dim_(self) -> int:
        """Per-head q/k dims (MLA: qk_nope_head_dim + qk_rope_head_dim)."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.d_model // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Dims RoPE rotates per head (MLA: qk_rope_head_dim)."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim_

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i is an MoE layer (Megatron's `--moe-layer-freq` semantics)."""
        if self.moe is None:
            return False
        lf = self.moe.layer_freq
        return bool(lf[i]) if isinstance(lf, tuple) else i % lf == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))


STEP_PROGRAMS = ("auto", "one", "layers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and logging for one run."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    data: str = "embedded"  # "embedded" | "synthetic" | path to a prepared token file (.bin)
    log_every: int = 10
    out_dir: str = "runs/default"
    tensorboard: bool = True
    heatmap: bool = True
    peak_tflops: float | None = None  # None: look up the device's bf16 dense peak
    checkpoint_every: int = 0  # 0 = only at the end of the run (when checkpointing is on)
    keep_checkpoints: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = off)
    checkpoint: bool = False
    skip_nonfinite_steps: int = 0  # steps with a non-finite loss/grad norm skipped (no update) before stopping
    eval_every: int = 0        # held-out loss every this many steps and at the end (0 = off)
    eval_batches: int = 8      # validation batches per evaluation (the same ones each time)
    # with param_dtype != dtype: the experts' weights also kept in dtype, written by the optimizer
    # (one cast pass per step less; moe_jax/weight_copy.py)
    expert_weight_copy: bool = True
    # "one": the step is one XLA program (compile time grows with depth); "layers": a program per kind
    # of layer, run layer by layer from Python (compile time flat in depth; moe_jax/layer_programs.py);
    # "auto": layers on one device with unscanned layers, else one (`train.step_programs`)
    programs: str = "auto"

    def __post_init__(self):
        c = "TrainConfig"
        check_types(c, self)
        choice(c, "programs", self.programs, STEP_PROGRAMS)
        positive(c, self, "steps", "batch_size", "seq_len", "grad_accum", "log_every",
                 "keep_checkpoints")
        for f in ("seed", "skip_nonfinite_steps"):
            if getattr(self, f) < 0:
                fail(c, f, getattr(self, f), "must be >= 0")
        for f in ("b1", "b2"):
            if not 0 <= getattr(self, f) < 1:
                fail(c, f, getattr(self, f), "must be in [0, 1)")
        if not self.eps > 0:
            fail(c, "eps", self.eps, "must be > 0")
        if self.weight_decay < 0:
            fail(c, "weight_decay", self.weight_decay, "must be >= 0")
        for f in ("out_dir", "data"):
            if not getattr(self, f).strip():
                fail(c, f, getattr(self, f), "must not be empty")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            fail(c, "peak_tflops", self.peak_tflops, "must be > 0, or None to look it up")
        if self.warmup_steps < 0:
            fail(c, "warmup_steps", self.warmup_steps, "must be >= 0")
        if self.checkpoint_every < 0:
            fail(c, "checkpoint_every", self.checkpoint_every, "must be >= 0")
        if self.keep_every < 0:
            fail(c, "keep_every", self.keep_every, "must be an integer >= 0 (0 = off)")
        if not self.lr > 0:
            fail(c, "lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail(c, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail(c, "grad_clip", self.grad_clip, "must be > 0, or None to disable")
        for f in ("eval_every", "eval_batches"):
            if getattr(self, f) < 0:
                fail(c, f, getattr(self, f), "must be an integer >= 0 (eval_every=0: no evaluation)")
        if self.eval_every and not self.eval_batches:
            fail(c, "eval_batches", 0, f"must be >= 1 when eval_every={self.eval_every} (or set eval_every=0)")
        if self.batch_size % self.grad_accum:
            fail(c, "grad_accum", self.grad_accum, f"must divide batch_size ({self.batch_size})")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Device-mesh axis sizes; -1 fills with the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1     # ETP: the expert hidden dim split over this many devices (MoE mesh)

    def __post_init__(self):
        check_types("ParallelConfig", self)
        for f in ("data", "fsdp", "tensor", "expert"):
            v = getattr(self, f)
            if v <= 0 and v != -1:
                fail("ParallelConfig", f, v, "must be a positive integer or -1 (fill)")
        positive("ParallelConfig", self, "expert_tensor")
        if sum(getattr(self, f) == -1 for f in ("data", "fsdp", "tensor", "expert")) > 1:
            raise ValueError("ParallelConfig: at most one axis may be -1 (fill)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run needs."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()

    def __post_init__(self):
        for f, cls in (("model", ModelConfig), ("train", TrainConfig), ("parallel", ParallelConfig)):
            if not isinstance(getattr(self, f), cls):
                fail("Config", f, getattr(self, f), f"must be a {cls.__name__}")
        if self.train.seq_len > self.model.max_seq_len:
            fail("TrainConfig", "seq_len", self.train.seq_len,
                 f"must be <= model.max_seq_len ({self.model.max_seq_len})")


def with_dispatcher(cfg: ModelConfig, **fields) -> ModelConfig:
    """`cfg` with `moe.dispatcher` fields replaced (e.g. `type="allgather", overlap_chunks=2`)."""
    dc = dataclasses.replace(cfg.moe.dispatcher, **fields)
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatcher=dc))
