"""How the decoder layers are held and run: unrolled (``layers/{i}/...``, the canonical layout)
or stacked and scanned (``layers/...`` with a leading ``layers`` axis), and which activations
the backward pass recomputes (remat).

The unrolled layout is the one everything outside the model speaks: HF import / export, unit
maps and masks, pruning, LoRA, attribution, saved exports. The stacked layout is an execution
option of :class:`~ssah_jax.models.CausalLM` (``layout=Layout(scan=True, ...)``) whose
parameters convert losslessly both ways (:func:`stack_layers`, :func:`unstack_layers`,
:func:`~ssah_jax.models.with_layout`): layer ``i`` of the stack is ``layers/{i}``, bit for bit,
so a unit index, a mask or a checkpoint means the same in both once converted.

Which to use: unrolled for decoding and anything on CPU (a scan copies every layer's weights
out of the stack at each step, which made CPU decoding twice as slow), and for small models;
scanned for training large models on accelerators (compile time and program size independent
of depth), with ``remat`` to trade compute for activation memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS = "layers"  # the top-level name of the decoder layers, and the stacked axis's logical name

# Remat policies (jax.checkpoint_policies): which values of a layer's forward the backward pass
# keeps; everything else it recomputes.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no remat: every activation is kept (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input: least memory
    "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs kept, elementwise work redone
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls
    # kept, attention's batched dots redone
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """``scan``: the layers' parameters stacked on a leading ``layers`` axis and run with
    ``jax.lax.scan`` (else one module per layer, a Python loop unrolled by jit). ``remat``: a
    key of :data:`REMAT_POLICIES`, applied to each layer's forward in either layout."""

    scan: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose from {tuple(REMAT_POLICIES)}")


def checkpointed(fn, remat: str, *, in_scan: bool):
    """``fn`` under ``jax.checkpoint`` with the policy ``remat`` names (``fn`` itself for
    ``"none"``). Inside a scan, CSE cannot merge the recomputation into the forward pass, so
    JAX's guard against it is off there."""
    if REMAT_POLICIES[remat] is None:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


def is_stacked(tree: Any) -> bool:
    """Whether a parameter-shaped tree (pure dict or ``nnx.State``) holds stacked layers."""
    layers = tree[LAYERS]
    return len(layers) > 0 and all(isinstance(k, str) for k in layers.keys())


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _value(leaf: Any) -> jax.Array:
    return leaf.get_value() if _is_variable(leaf) else jnp.asarray(leaf)


def _names(leaf: Any) -> tuple | None:
    return leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None


def _rebuilt(leaf: Any, value: jax.Array, names: tuple | None) -> Any:
    if not _is_variable(leaf):
        return value
    return leaf.replace(value) if names is None else leaf.replace(value, out_sharding=names)


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", key))]
    return tree


def stack_trees(per_layer: list[Any], like: list[Any] | None = None) -> Any:
    """One tree whose every leaf stacks the matching leaves of ``per_layer`` on a new leading
    axis (see :func:`stack_layers`; ``like``: the per-layer parameters compact masks broadcast
    against)."""

    def stack(path, *leaves):
        values = [_value(leaf) for leaf in leaves]
        if like is not None:
            rank = len(_at(like[0], path).shape)
            values = [v.reshape((1,) * (rank - v.ndim) + v.shape) for v in values]
            common = np.broadcast_shapes(*(v.shape for v in values))
            values = [jnp.broadcast_to(v, common) for v in values]
        names = _names(leaves[0])
        return _rebuilt(leaves[0], jnp.stack(values), None if names is None else (LAYERS, *names))

    return jax.tree_util.tree_map_with_path(stack, per_layer[0], *per_layer[1:], is_leaf=_is_variable)


def _layer_list(layers: Mapping) -> list:
    keys = sorted(layers, key=int)
    if keys != list(range(len(keys))):
        raise ValueError(f"unrolled layers must be numbered 0..n-1, got {keys}")
    return [layers[k] for k in keys]


def stack_layers(tree: Any, like: Any = None) -> Any:
    """The stacked layout of a parameter-shaped tree in the unrolled one (pure dict or
    ``nnx.State``; the layers under ``"layers"``, keyed ``0 .. L-1``): each leaf of a layer
    becomes row ``i`` of one array ``[L, ...]``; variables gain ``"layers"`` in front of their
    logical axis names. Everything outside ``"layers"`` is kept as it is.

    ``like``: the unrolled parameters (arrays or ShapeDtypeStructs) that ``tree``'s leaves
    broadcast against, needed when they are compact masks (``[n, 1]``, a scalar, ... differing
    from layer to layer): each is then broadcast to a common shape of its parameter's rank, so
    that the stacked mask broadcasts against the stacked parameter (and stays compact)."""
    like_layers = None if like is None else _layer_list(like[LAYERS])
    return _replace_layers(tree, stack_trees(_layer_list(tree[LAYERS]), like_layers))


def unstack_layers(tree: Any) -> Any:
    """The unrolled layout of a parameter-shaped tree in the stacked one (the inverse of
    :func:`stack_layers`): row ``i`` of every stacked leaf becomes ``layers/{i}``; variables
    lose the leading ``"layers"`` axis name."""
    stacked = tree[LAYERS]
    sizes = {_value(leaf).shape[0] for leaf in jax.tree.leaves(stacked, is_leaf=_is_variable)}
    if len(sizes) != 1:
        raise ValueError(f"stacked layers disagree on their count: {sorted(sizes)}")
    (count,) = sizes

    def row(i):
        def take(leaf):
            names = _names(leaf)
            if names is not None and tuple(names[:1]) != (LAYERS,):
                raise ValueError(f"a stacked variable's axes are {names}, expected {LAYERS!r} first")
            return _rebuilt(leaf, _value(leaf)[i], None if names is None else tuple(names[1:]))

        return jax.tree.map(take, stacked, is_leaf=_is_variable)

    return _replace_layers(tree, {i: row(i) for i in range(count)})


def _replace_layers(tree: Any, layers: Any) -> Any:
    if isinstance(tree, nnx.State):
        return nnx.State({**{k: v for k, v in tree.items() if k != LAYERS}, LAYERS: nnx.State(layers)})
    return {**tree, LAYERS: layers}
