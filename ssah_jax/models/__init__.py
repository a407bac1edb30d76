"""Flax NNX decoder for the Llama family, its config, KV cache, unit layout and token log-probs."""

from ssah_jax.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from ssah_jax.models.llama import CausalLM, DecoderOutput, KVCache, UnitInputs, default_mask, next_token_logprobs
from ssah_jax.models.units import B_MATRIX, MODULES, unit_shapes

__all__ = [
    "B_MATRIX",
    "CausalLM",
    "DecoderOutput",
    "KVCache",
    "MODULES",
    "ModelConfig",
    "RopeConfig",
    "UnitInputs",
    "UnsupportedConfigError",
    "default_mask",
    "next_token_logprobs",
    "unit_shapes",
]
