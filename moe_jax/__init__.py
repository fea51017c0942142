"""moe_jax: Mixture-of-Experts GPT training in JAX / Flax NNX.

Shape suffixes on names (`x_BSD`, `w1_EDnF`, `counts_PE`), one meaning per letter everywhere:

    B batch            S sequence positions   T tokens (B·S, or a shard's / chunk's share)
    D d_model          V vocabulary           F hidden size of an MLP or expert
    N query heads      K key/value heads      H head dim
    E experts          L experts held here (E / expert-parallel size)
    k router slots per token (top-k)          n fc1 projections (2 for gated activations)
    R rows of an expert-sorted buffer (a device's dispatched or received rows)
    P devices of the `expert` mesh axis (sources / destinations of an exchange)
    MLA (moe_jax.mla): Q query latent (q_lora_rank)  C key/value latent (kv_lora_rank)
        Z per-head q/k dims without RoPE  Y with RoPE  U value dims (H = Z + Y for its q and k)
"""
from moe_jax.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_jax.presets import load_config

__all__ = ["Config", "ModelConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "load_config"]
__version__ = "0.1.0"
