"""The SSAH unit layout of a decoder layer (Li & Kim, arXiv 2410.10862), named once for every later stage.

A *unit* is one input channel of the ``B`` matrix of a two-matrix block ``f(X) = B · σ(A · X)``:
``o_proj`` for attention (``num_heads * head_dim`` units per layer), ``down_proj`` for the MLP
(``intermediate_size`` units). In our ``[in, out]`` kernels a unit is a *row* of ``B``; in the
transformers ``[out, in]`` weight it is a *column*. Unit masks and unit scores are
``{"attn": [layers, units], "mlp": [layers, units]}``.
"""

from __future__ import annotations

from ssah_jax.models.config import ModelConfig

MODULES = ("attn", "mlp")
B_MATRIX = {"attn": "o_proj", "mlp": "down_proj"}  # per module: the projection whose input channels are units


def unit_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Shape of a unit mask (or of unit scores) per module: ``[layers, units]``."""
    return {
        "attn": (config.num_layers, config.num_heads * config.head_dim),
        "mlp": (config.num_layers, config.intermediate_size),
    }
