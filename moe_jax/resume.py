"""What a resumed run may change: its config against the one stored with the checkpoint.

Every differing setting is one of
- `shape`: changes a parameter's (or the optimizer state's) shape or structure; always refused, since
  the checkpoint cannot be restored into it (`model.d_model 128 → 64`);
- `function`: changes what the model computes (routing, RoPE, norm, activation, ...); refused unless
  `allow_function_change` (`--allow-config-change`);
- `run`: schedule, data, logging, checkpointing, the mesh, kernels and dispatchers, loss
  coefficients: free, and listed in the log as deliberate overrides.
A setting not named here counts as `function`: a new model field is refused until classified.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from moe_jax.config import Config
from moe_jax.presets import apply_overrides, build_config, load_raw, locate, to_dict

# model / moe fields whose change alters parameter shapes or the state's structure
SHAPE = {"model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
         "model.head_dim", "model.ffn_hidden_size", "model.tie_embeddings", "model.attention_bias",
         "model.qk_norm", "model.param_dtype", "model.norm", "model.moe", "moe.num_experts",
         "moe.ffn_hidden_size", "moe.shared_expert_intermediate_size", "moe.shared_expert_gate",
         "moe.layer_freq", "moe.router_enable_expert_bias", "train.grad_clip", "model.attention_type",
         "model.q_lora_rank", "model.kv_lora_rank", "model.qk_nope_head_dim", "model.qk_rope_head_dim",
         "model.v_head_dim", "model.mtp_num_layers"}
# model / moe fields that change neither shapes nor the function (numerics, kernels, training losses)
FREE = {"model.dtype", "model.remat", "model.attention_impl", "model.fused_kernels", "model.init_std",
        "model.max_seq_len", "moe.grouped_gemm_backend", "moe.recompute_activation", "moe.recompute_rows",
        "moe.router_dtype",
        "moe.aux_loss_coeff", "moe.z_loss_coeff",
        "moe.router_load_balancing_type", "moe.router_bias_update_rate", "moe.input_jitter_eps",
        "model.mtp_loss_scaling_factor"}
FREE_PREFIXES = ("train.", "parallel.", "moe.dispatcher.")
# the train settings a resume takes from the run unless the command line sets them
CHECKPOINT_KEYS = ("checkpoint", "checkpoint_every", "keep_checkpoints", "keep_every")
GATED = ("swiglu", "geglu")


class ConfigChangeError(ValueError):
    """A resume asks for a config the checkpoint cannot (or should not silently) continue with."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str      # "model.d_model", "moe.dispatcher.type", ...
    old: Any
    new: Any
    kind: str     # "shape" | "function" | "run"

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} → {self.new!r}"


def _flat(cfg: Config) -> dict[str, Any]:
    """`section.key` -> value (`moe.dispatcher.key` for the nested dispatcher); `model.moe` says
    whether there is an MoE section. Two spellings of one model compare equal (head_dim None and
    d_model / num_heads; layer_freq as its per-layer pattern)."""
    raw, out = to_dict(cfg), {}
    for section, values in raw.items():
        for k, v in values.items():
            if isinstance(v, dict):
                out.update({f"{section}.{k}.{s}": w for s, w in v.items()})
            else:
                out[f"{section}.{k}"] = v
    if cfg.model.head_dim == cfg.model.d_model // cfg.model.num_heads:
        out["model.head_dim"] = None  # the default, spelled out
    out["model.moe"] = cfg.model.moe is not None
    if cfg.model.moe is not None:
        out["moe.layer_freq"] = [int(cfg.model.is_moe_layer(i)) for i in range(cfg.model.num_layers)]
    return out


def _kind(key: str, old: Any, new: Any) -> str:
    if key == "train.grad_clip":  # None <-> a value adds or removes the clipping state
        return "shape" if (old is None) != (new is None) else "run"
    if key in ("model.activation", "moe.activation"):
        return "shape" if (old in GATED) != (new in GATED) else "function"
    if key in SHAPE:
        return "shape"
    if key in FREE or key.startswith(FREE_PREFIXES):
        return "run"
    return "function"


def config_changes(old: Config, new: Config) -> list[Change]:
    """Every setting that differs between `old` (the checkpoint's) and `new`, classified."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b), key=lambda k: (k.split(".")[0] != "model", k))
    if not (a.get("model.moe") and b.get("model.moe")):  # MoE added or removed: one change says it
        keys = [k for k in keys if not k.startswith("moe.")]
    return [Change(k, a.get(k), b.get(k), _kind(k, a.get(k), b.get(k))) for k in keys if a.get(k) != b.get(k)]


def check_resume(stored_raw: dict | None, cfg: Config, *, where: str, allow_function_change: bool = False,
                 log=print) -> list[Change]:
    """Compare `cfg` with the config stored in checkpoint `where`; raise ConfigChangeError on a shape
    change (always) or a function change (unless allowed); log the rest. Returns the changes."""
    if not stored_raw:
        log(f"resume: {where} carries no run config; the new config is not compared with it")
        return []
    try:
        old = build_config(stored_raw)
    except (ValueError, TypeError) as e:
        log(f"resume: the config stored in {where} no longer validates ({e}); not compared")
        return []
    changes = config_changes(old, cfg)
    shape = [c for c in changes if c.kind == "shape"]
    if shape:
        raise ConfigChangeError(f"cannot resume {where} with another model shape: "
                                f"{', '.join(map(str, shape))}; drop these overrides, or start a new run "
                                f"in another train.out_dir")
    function = [c for c in changes if c.kind == "function"]
    if function and not allow_function_change:
        raise ConfigChangeError(f"resuming {where} would change the model's function: "
                                f"{', '.join(map(str, function))}; drop these overrides, or pass "
                                f"--allow-config-change to continue with them")
    if function:
        log(f"resume: changing the model's function (--allow-config-change): {', '.join(map(str, function))}")
    run = [c for c in changes if c.kind == "run"]
    if run:
        log(f"resume: settings changed from the checkpoint's config: {', '.join(map(str, run))}")
    return changes


def resume_config(preset: str | None, overrides: Sequence[str], *, stored_raw: dict | None, out_dir: str,
                  default_preset: str = "tiny_moe") -> Config:
    """The config a resume of the run in `out_dir` runs with: the run's own (`stored_raw`, from its
    checkpoint) unless a `preset` is named, then `overrides`; the checkpoint settings
    (`train.checkpoint`, `checkpoint_every`, `keep_checkpoints`, `keep_every`) come from the run unless
    overridden, and `train.out_dir` is where the run is (it may have been moved)."""
    if stored_raw is None:
        return build_config(apply_overrides(load_raw(preset or default_preset), overrides))
    raw = {s: (dict(v) if isinstance(v, dict) else v) for s, v in stored_raw.items()}
    if preset is not None:
        raw = load_raw(preset)
        given = {locate(o.split("=", 1)[0]) for o in overrides if "=" in o}
        train = dict(raw.get("train") or {})
        for k in CHECKPOINT_KEYS:
            if ("train", k) not in given and k in (stored_raw.get("train") or {}):
                train[k] = stored_raw["train"][k]
        raw["train"] = train
    raw["train"] = {**(raw.get("train") or {}), "out_dir": out_dir}
    return build_config(apply_overrides(raw, overrides))


def out_dir_of(preset: str | None, overrides: Sequence[str], default_preset: str = "tiny_moe") -> str:
    """`train.out_dir` as the command line sets it (the overrides, else the preset), without
    validating the rest."""
    raw = apply_overrides(load_raw(preset or default_preset), overrides)
    return str((raw.get("train") or {}).get("out_dir") or Config().train.out_dir)
