"""How well a safety signal's classifier separates two prompt sets: AUROC and the rates at its
decision threshold, from the probabilities :func:`ssah_jax.signals.classify` gives."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The area under the ROC curve of scores ``positive`` (label 1) against ``negative``: the
    Mann-Whitney U statistic over ``len(positive) * len(negative)`` (ties count half)."""
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def separation(p_positive: np.ndarray, p_negative: np.ndarray, threshold: float) -> dict[str, Any]:
    """p(malicious) of a positive set (should be flagged) against a negative one: ``auroc``,
    ``accuracy`` at ``threshold`` (flagged: p above it), ``true_positive_rate``,
    ``false_positive_rate`` and the two counts."""
    p_positive, p_negative = np.asarray(p_positive), np.asarray(p_negative)
    correct = np.concatenate([p_positive > threshold, p_negative <= threshold])
    return {"auroc": auroc(p_positive, p_negative), "accuracy": float(correct.mean()),
            "n_positive": len(p_positive), "n_negative": len(p_negative),
            "true_positive_rate": float(np.mean(p_positive > threshold)),
            "false_positive_rate": float(np.mean(p_negative > threshold))}
