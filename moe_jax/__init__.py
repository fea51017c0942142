"""moe_jax: Mixture-of-Experts GPT training in JAX / Flax NNX."""
from moe_jax.config import Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_jax.presets import load_config

__all__ = ["Config", "ModelConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "load_config"]
__version__ = "0.1.0"
