"""Flax NNX decoder for the Llama family, its config, KV cache, layer layouts (unrolled or
scanned), unit layout and token log-probs."""

from ssah_jax.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from ssah_jax.models.layout import REMAT_POLICIES, Layout, is_stacked, stack_layers, unstack_layers
from ssah_jax.models.llama import (
    CausalLM,
    DecoderOutput,
    KVCache,
    UnitInputs,
    default_mask,
    next_token_logprobs,
    with_layout,
)
from ssah_jax.models.units import B_MATRIX, MODULES, unit_shapes

__all__ = [
    "B_MATRIX",
    "CausalLM",
    "DecoderOutput",
    "KVCache",
    "Layout",
    "MODULES",
    "ModelConfig",
    "REMAT_POLICIES",
    "RopeConfig",
    "UnitInputs",
    "UnsupportedConfigError",
    "default_mask",
    "is_stacked",
    "next_token_logprobs",
    "stack_layers",
    "unit_shapes",
    "unstack_layers",
    "with_layout",
]
