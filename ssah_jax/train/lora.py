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

from ssah_jax.models import is_stacked

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


def _targets(tree: Any, config: LoraConfig) -> list[tuple]:
    """Where the adapted projections are inside ``tree["layers"]``: ``(i, module, proj)`` for
    each layer of the unrolled layout, ``(module, proj)`` once in the stacked one."""
    prefixes = [()] if is_stacked(tree) else [(i,) for i in sorted(tree["layers"])]
    return [(*prefix, TARGETS[t], t) for prefix in prefixes for t in config.targets]


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replaced(tree: Any, path: tuple, value: Any) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}


def _put(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init(rng: jax.Array, base: Any, config: LoraConfig) -> dict:
    """Adapters for every target of every layer of ``base`` (a pure parameter dict in the
    unrolled layout; :func:`ssah_jax.models.stack_layers` them for a scanned model):
    ``{"layers": {i: {module: {proj: {"a": [in, r], "b": [r, out]}}}}}``, float32.
    ``a`` ~ N(0, 1 / in) (Kaiming-style, as in Hu et al. 2021), ``b`` = 0."""
    if is_stacked(base):
        raise ValueError("lora.init takes the unrolled layout (unstack_layers the base, stack_layers the adapters)")
    out: dict = {"layers": {}}
    keys = jax.random.split(rng, len(_targets(base, config)))
    for key, path in zip(keys, _targets(base, config)):
        d_in, d_out = _at(base["layers"], path)["kernel"].shape
        a = jax.random.normal(key, (d_in, config.rank), jnp.float32) / jnp.sqrt(d_in)
        b = jnp.zeros((config.rank, d_out), jnp.float32)
        _put(out["layers"], path, {"a": a, "b": b})
    return out


def merge(base: Any, adapters: Any, config: LoraConfig) -> Any:
    """``base`` with every adapted kernel replaced by ``W + scale * a @ b`` (in ``W``'s dtype);
    ``base`` and ``adapters`` both in the unrolled layout or both stacked (a batched product)."""
    layers = base["layers"]
    for path in _targets(base, config):
        ad = _at(adapters["layers"], path)
        entry = _at(base["layers"], path)
        kernel = entry["kernel"]
        delta = config.scale * jnp.matmul(ad["a"], ad["b"], preferred_element_type=jnp.float32)
        layers = _replaced(layers, path, {**entry, "kernel": (kernel + delta).astype(kernel.dtype)})
    return {**base, "layers": layers}


def shardings(adapters: Any, base_shardings: Any, config: LoraConfig) -> Any:
    """``a`` sharded like its kernel's input axis, ``b`` like its output axis (a stacked
    ``layers`` axis in front like the kernel's)."""
    out: dict = {"layers": {}}
    for path in _targets(adapters, config):
        kernel: NamedSharding = _at(base_shardings["layers"], path)["kernel"]
        rank = _at(adapters["layers"], path)["a"].ndim
        spec = tuple(kernel.spec) + (None,) * (rank - len(kernel.spec))
        adapter = {"a": NamedSharding(kernel.mesh, PartitionSpec(*spec[:-1], None)),
                   "b": NamedSharding(kernel.mesh, PartitionSpec(*spec[:-2], None, spec[-1]))}
        _put(out["layers"], path, adapter)
    return out


def count(adapters: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(adapters)))
