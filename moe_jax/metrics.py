"""Training metrics: parameter counts, model FLOPs, MFU, expert-load statistics, TensorBoard, heatmap."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig

# bf16 dense tensor-core peak per device kind, in TFLOP/s (vendor datasheets; SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
               "B200": 2250.0}


def param_counts(model: nnx.Module) -> dict[str, int]:
    """total, active (experts scaled by top-k/E; input embedding excluded unless tied), embedding."""
    cfg: ModelConfig = model.cfg
    frac = cfg.moe.router_topk / cfg.moe.num_experts if cfg.moe else 1.0
    total = active = 0.0
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        n = math.prod(var.get_value().shape)
        total += n
        if path[0] == "embed_VD" and not cfg.tie_embeddings:
            continue
        active += n * frac if "exp" in (getattr(var, "logical_axes", None) or ()) else n
    embed = cfg.vocab_size * cfg.d_model
    return {"total": int(total), "active": int(active), "embedding": embed}


def flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward):

        6·N_active + 3·(L + D)·S·N·(H_qk + H_v) + 6·D·d_model·V

    N_active: every matmul weight a token meets (MLA's projections, MTP's eh_proj and blocks included;
    experts scaled by top-k/E); the second term causal attention (q·k and p·v, half the S×S scores) in
    the L layers and D MTP blocks, with H_qk = H_v = head_dim for GQA and qk_nope+qk_rope / v_head_dim
    for MLA (without the zero padding of v the kernel adds); the last, the LM head once more per MTP
    module (N_active counts it once)."""
    h_v = cfg.v_head_dim if cfg.attention_type == "mla" else cfg.head_dim_
    mtp = cfg.mtp_num_layers
    attn = 3.0 * (cfg.num_layers + mtp) * seq_len * cfg.num_heads * (cfg.head_dim_ + h_v)
    return 6.0 * active_params + attn + 6.0 * mtp * cfg.d_model * cfg.vocab_size


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """bf16 dense peak of the device, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, tf in PEAK_TFLOPS.items():
        if name in kind:
            return tf
    return None


def imbalance(counts_LE: np.ndarray) -> np.ndarray:
    """max/mean tokens per expert for each layer (1.0 = perfectly balanced)."""
    counts = np.asarray(counts_LE, np.float64)
    mean = counts.mean(-1)
    return np.where(mean > 0, counts.max(-1) / np.maximum(mean, 1e-9), 1.0)


def peak_memory_gib(device: jax.Device | None = None) -> float | None:
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 — some backends do not implement it
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def save_load_heatmap(load_LE: np.ndarray, moe_layers, path: str | Path, title: str = "") -> Path:
    """PNG heatmap of each MoE layer's share of routed tokens per expert (uniform = 1/E)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(load_LE, np.float64)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    n_layers, n_exp = share.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n_exp + 2), max(2.5, 0.4 * n_layers + 1.5)))
    rel = share * n_exp  # 1.0 = uniform load; diverging colours centred there
    im = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, float(rel.max())))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(i) for i in moe_layers])
    if n_exp <= 32:
        ax.set_xticks(range(n_exp))
    fig.colorbar(im, ax=ax, label="load / uniform load")
    ax.set_title(title or "expert load (routed tokens, whole run)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Writer:
    """TensorBoard scalars (tensorboardX); a no-op when disabled."""

    def __init__(self, log_dir: str | Path | None):
        self._w = None
        if log_dir is not None:
            from tensorboardX import SummaryWriter
            self._w = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
