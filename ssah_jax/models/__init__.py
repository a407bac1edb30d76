"""Flax NNX decoder for the Llama family, its config and KV cache."""

from ssah_jax.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from ssah_jax.models.llama import CausalLM, DecoderOutput, KVCache, UnitInputs, default_mask

__all__ = [
    "CausalLM",
    "DecoderOutput",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "UnitInputs",
    "UnsupportedConfigError",
    "default_mask",
]
