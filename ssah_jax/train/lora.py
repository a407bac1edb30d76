"""LoRA adapters as a plain pytree beside frozen base weights (the parameter-efficient baseline).

For a target kernel ``W [in, out]`` (our layout) the adapted kernel is
``W + (alpha / rank) * a @ b`` with ``a [in, rank]`` (normal, std ``1 / sqrt(in)``) and
``b [rank, out]`` (zeros: training starts from the base model exactly).
:func:`merge` gives a full parameter tree, used both in the loss and for export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

TARGETS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {sorted(unknown) or '()'}: choose from {sorted(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be >= 1")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targets(base: Any, config: LoraConfig) -> list[tuple[int, str, str]]:
    return [(i, TARGETS[t], t) for i in sorted(base["layers"]) for t in config.targets]


def init(rng: jax.Array, base: Any, config: LoraConfig) -> dict:
    """Adapters for every target of every layer of ``base`` (a pure parameter dict):
    ``{"layers": {i: {module: {proj: {"a": [in, r], "b": [r, out]}}}}}``, float32.
    ``a`` ~ N(0, 1 / in) (Kaiming-style, as in Hu et al. 2021), ``b`` = 0."""
    out: dict = {"layers": {}}
    keys = jax.random.split(rng, len(_targets(base, config)))
    for key, (i, module, proj) in zip(keys, _targets(base, config)):
        d_in, d_out = base["layers"][i][module][proj]["kernel"].shape
        a = jax.random.normal(key, (d_in, config.rank), jnp.float32) / jnp.sqrt(d_in)
        b = jnp.zeros((config.rank, d_out), jnp.float32)
        out["layers"].setdefault(i, {}).setdefault(module, {})[proj] = {"a": a, "b": b}
    return out


def merge(base: Any, adapters: Any, config: LoraConfig) -> Any:
    """``base`` with every adapted kernel replaced by ``W + scale * a @ b`` (in ``W``'s dtype)."""
    layers = dict(base["layers"])
    for i, module, proj in _targets(base, config):
        ad = adapters["layers"][i][module][proj]
        kernel = base["layers"][i][module][proj]["kernel"]
        delta = config.scale * jnp.dot(ad["a"], ad["b"], preferred_element_type=jnp.float32)
        adapted = {**base["layers"][i][module][proj], "kernel": (kernel + delta).astype(kernel.dtype)}
        layer = dict(layers[i])
        layer[module] = {**layer[module], proj: adapted}
        layers[i] = layer
    return {**base, "layers": layers}


def shardings(adapters: Any, base_shardings: Any, config: LoraConfig) -> Any:
    """``a`` sharded like its kernel's input axis, ``b`` like its output axis."""
    out: dict = {"layers": {}}
    for i, module, proj in _targets(base_shardings, config):
        kernel: NamedSharding = base_shardings["layers"][i][module][proj]["kernel"]
        spec = tuple(kernel.spec) + (None,) * (2 - len(kernel.spec))
        out["layers"].setdefault(i, {}).setdefault(module, {})[proj] = {
            "a": NamedSharding(kernel.mesh, PartitionSpec(spec[0], None)),
            "b": NamedSharding(kernel.mesh, PartitionSpec(None, spec[1])),
        }
    return out


def count(adapters: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(adapters)))
