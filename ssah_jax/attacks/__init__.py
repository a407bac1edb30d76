"""Optimisation attacks on a model's safety, run through our own model: GCG (``gcg``), the
greedy coordinate gradient of Zou et al. 2023."""

from ssah_jax.attacks.gcg import GCGConfig, GCGState, Layout, attack, layout

__all__ = ["GCGConfig", "GCGState", "Layout", "attack", "layout"]
