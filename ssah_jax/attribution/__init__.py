"""SSAH attribution: per-unit scores streamed over calibration batches (WIFV, Wanda, SNIP),
the four unit kinds, the UnitMap that stores them, and cached scores of calibration sets."""

from ssah_jax.attribution.calibration import calibration_scores, load_scores, score_cache
from ssah_jax.attribution.kinds import (
    KINDS,
    UnitMap,
    UnitMapMismatch,
    classify,
    kind_transitions,
    model_identity,
    sweep_fraction,
    transition_matrix,
)
from ssah_jax.attribution.scorers import (
    SCORERS,
    TOKENS,
    activation_moments,
    gradient_sums,
    snip,
    token_mask,
    unit_scores,
    wanda,
    wifv,
)
from ssah_jax.attribution.stats import Moments

__all__ = [
    "KINDS",
    "SCORERS",
    "TOKENS",
    "Moments",
    "UnitMap",
    "UnitMapMismatch",
    "activation_moments",
    "calibration_scores",
    "classify",
    "gradient_sums",
    "load_scores",
    "model_identity",
    "score_cache",
    "snip",
    "sweep_fraction",
    "token_mask",
    "kind_transitions",
    "transition_matrix",
    "unit_scores",
    "wanda",
    "wifv",
]
