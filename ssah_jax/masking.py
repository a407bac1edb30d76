"""Unit masks -> parameter masks, structured pruning, and the optax freeze transform.

A *unit mask* selects SSAH units: ``{"attn": bool [layers, num_heads * head_dim],
"mlp": bool [layers, intermediate_size]}`` (True = selected). Unit ``j`` of a layer is input
channel ``j`` of its ``B`` matrix (``o_proj`` / ``down_proj``): a row of our kernel, a column
of the transformers weight (see :mod:`ssah_jax.models.llama`). Its ``A`` part is the matching
output channel of ``gate_proj`` and ``up_proj`` (MLP) or of ``v_proj`` (attention).

Grouped-query attention: query head ``h`` reads kv head ``h // groups``, so one ``v_proj``
channel feeds ``groups`` units. ``shared`` says when such a channel counts as selected:
``"any"`` of its units (freezing: a frozen unit must keep every input it reads) or ``"all"``
of them (pruning: zeroing the channel must not remove units that were not selected).

Parameter trees here are in the unrolled layout (``layers/{i}/...``). For a scanned model,
build on :func:`ssah_jax.models.unstack_layers` of its parameters and convert the result with
:func:`ssah_jax.models.stack_layers` (``like=`` the unrolled parameters for compact masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssah_jax.models import MODULES, ModelConfig, is_stacked, unit_shapes

SHARED = ("any", "all")


def _names(path) -> tuple:
    """``('layers', 0, 'mlp', 'down_proj', 'kernel')`` from a pytree path (nnx.State or dicts)."""
    out = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name != "value":  # the array inside an nnx.Variable
            out.append(name)
    return tuple(out)


def _check_unrolled(params: Any) -> None:
    if "layers" in params and is_stacked(params):
        raise ValueError("these parameters hold stacked (scanned) layers: masks and pruning take the unrolled "
                         "layout (ssah_jax.models.unstack_layers, then stack_layers the result)")


def _check_units(units: dict[str, Any], config: ModelConfig) -> None:
    expected = unit_shapes(config)
    if set(units) != set(MODULES):
        raise ValueError(f"a unit mask has the keys {MODULES}, got {sorted(units)}")
    for module, shape in expected.items():
        if tuple(units[module].shape) != shape:
            raise ValueError(f"unit mask {module!r} has shape {tuple(units[module].shape)}, this model needs {shape}")


def v_channels(attn_units: jax.Array, config: ModelConfig, shared: str = "any") -> jax.Array:
    """``[..., num_heads * head_dim]`` unit mask -> ``[..., num_kv_heads * head_dim]`` mask of
    the ``v_proj`` channels those units read."""
    if shared not in SHARED:
        raise ValueError(f"shared={shared!r}: must be one of {SHARED}")
    c = config
    grouped = jnp.asarray(attn_units).reshape(*attn_units.shape[:-1], c.num_kv_heads, c.num_query_groups, c.head_dim)
    reduce = jnp.any if shared == "any" else jnp.all
    return reduce(grouped, axis=-2).reshape(*attn_units.shape[:-1], c.num_kv_heads * c.head_dim)


def parameter_masks(params: Any, units: dict[str, Any], config: ModelConfig, *, shared: str = "any") -> Any:
    """Boolean masks shaped like ``params`` (an ``nnx.State`` or nested dicts), True on the
    parameters of the selected units: rows of ``o_proj`` / ``down_proj`` kernels, columns of
    ``gate_proj`` / ``up_proj`` / ``v_proj`` kernels and their biases. Masks are compact
    (``[n, 1]``, ``[1, n]``, ``[n]`` or a scalar False) and broadcast against their parameter.
    """
    _check_unrolled(params)
    _check_units(units, config)
    attn = jnp.asarray(units["attn"], bool)
    mlp = jnp.asarray(units["mlp"], bool)
    v = v_channels(attn, config, shared)
    none = jnp.zeros((), bool)

    def mask(path, leaf):
        names = _names(path)
        if len(names) != 5 or names[0] != "layers":
            return none
        _, layer, module, proj, kind = names
        per_module = {
            ("mlp", "down_proj"): (mlp, "rows"), ("mlp", "gate_proj"): (mlp, "cols"), ("mlp", "up_proj"): (mlp, "cols"),
            ("attn", "o_proj"): (attn, "rows"), ("attn", "v_proj"): (v, "cols"),
        }
        if (module, proj) not in per_module:
            return none
        selected, side = per_module[(module, proj)]
        selected = selected[layer]
        if kind == "kernel":
            return selected[:, None] if side == "rows" else selected[None, :]
        if kind == "bias" and side == "cols":  # a B matrix's bias is per output, not per unit
            return selected
        return none

    return jax.tree_util.tree_map_with_path(mask, params)


GROUPS = ("embeddings", "norms", "head")


def _group(names: tuple) -> str | None:
    """The parameter group of a path outside the units: embeddings, norms or head."""
    if names[:1] == ("embed",):
        return "embeddings"
    if names[:1] == ("lm_head",):
        return "head"
    if names[-1:] == ("scale",):  # every RMSNorm: input_norm, post_attn_norm, final_norm
        return "norms"
    return None


_LAYER_PARAMETERS = {(m, p) for m, ps in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                           ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps}


def _in_layout(names: tuple) -> bool:
    """Whether a parameter path belongs to the Llama layout of :class:`ssah_jax.models.CausalLM`."""
    if names[:1] == ("layers",):
        return (len(names) == 5 and (names[2], names[3]) in _LAYER_PARAMETERS and names[4] in ("kernel", "bias")
                or len(names) == 4 and names[2] in ("input_norm", "post_attn_norm") and names[3] == "scale")
    return names in (("embed", "embedding"), ("final_norm", "scale"), ("lm_head", "kernel"))


def freeze_masks(
    params: Any,
    config: ModelConfig,
    *,
    frozen_units: dict[str, Any] | None = None,
    trained_units: dict[str, Any] | None = None,
    frozen_layers: Sequence[int] = (),
    frozen_groups: Sequence[str] = (),
    other: dict[str, bool] | None = None,
) -> Any:
    """Boolean masks shaped like ``params``, True where a parameter is frozen (for :func:`freeze`).

    A parameter is frozen when any of these holds:
      - it belongs to a unit of ``frozen_units`` (``shared="any"``: a frozen unit keeps every
        ``v_proj`` channel it reads);
      - ``trained_units`` is given and it belongs to none of those units (``shared="all"``: a
        shared ``v_proj`` channel is trained only if every unit reading it is), and it is not
        an embedding / norm / head parameter (those follow ``frozen_groups``);
      - it lives in a layer of ``frozen_layers`` (the layer-freeze baseline);
      - it is in one of ``frozen_groups``, a subset of :data:`GROUPS`: ``embeddings`` (the
        token embedding, also the head when tied), ``norms`` (every RMSNorm scale), ``head``;
      - it lies outside the Llama layout, under a top-level name that ``other`` maps to True
        (e.g. ``{"signal": False}``: a safety signal's ``[CLS]`` embedding and head train).
        Any other parameter outside the layout is an error naming it: a new parameter is never
        silently trained or frozen.

    Masks stay compact (a unit's row or column, or a scalar per parameter).
    """
    if frozen_units is not None and trained_units is not None:
        raise ValueError("give frozen_units or trained_units, not both")
    _check_unrolled(params)
    unknown = set(frozen_groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"frozen_groups {sorted(unknown)}: choose from {GROUPS}")
    bad_layers = [i for i in frozen_layers if not 0 <= i < config.num_layers]
    if bad_layers:
        raise ValueError(f"frozen_layers {bad_layers}: this model has layers 0..{config.num_layers - 1}")
    false = jnp.zeros((), bool)
    if frozen_units is not None:
        units = parameter_masks(params, frozen_units, config, shared="any")
    elif trained_units is not None:
        units = jax.tree.map(jnp.logical_not, parameter_masks(params, trained_units, config, shared="all"))
    else:
        units = jax.tree.map(lambda _: false, params)
    layers = {int(i) for i in frozen_layers}

    other = other or {}

    def mask(path, unit_mask):
        names = _names(path)
        group = _group(names)
        if not _in_layout(names):
            if names[0] not in other:
                raise ValueError(f"parameter {'/'.join(map(str, names))} is outside the Llama layout and has no "
                                 f"freeze rule: give other={{{names[0]!r}: True or False}}")
            return jnp.asarray(bool(other[names[0]]))
        if names[0] == "layers" and names[1] in layers:
            return jnp.ones((), bool)
        if group is not None:
            return jnp.asarray(group in frozen_groups)
        return unit_mask

    return jax.tree_util.tree_map_with_path(mask, units)


def prune_units(params: Any, units: dict[str, Any], config: ModelConfig) -> Any:
    """Zeroes the selected units: their column of ``B`` (``o_proj`` / ``down_proj``) and the
    matching rows of ``A`` (``gate_proj`` and ``up_proj``; ``v_proj`` channels whose every
    reading unit is selected). Pure: returns new params shaped like ``params``."""
    masks = parameter_masks(params, units, config, shared="all")
    return jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros((), p.dtype), p), params, masks)


# ---------------------------------------------------------------------------------------------
# Freezing


class FreezeState(NamedTuple):
    """The freeze masks live in the optimizer state: jit arguments (never closed over), sharded
    and checkpointed with it."""

    masks: Any


def _frozen_update(update: jax.Array, frozen: jax.Array) -> jax.Array:
    # -0.0, not 0.0: p + (-0.0) == p bit for bit for every p, including p = -0.0
    # (and jnp.where, not a multiplication: NaN * 0 is NaN).
    return jnp.where(frozen, jnp.asarray(-0.0, update.dtype), update)


def freeze(masks: Any) -> optax.GradientTransformation:
    """An optax transform that makes the updates of frozen elements exactly ``-0.0``.

    ``masks`` is a pytree shaped like the parameters whose boolean leaves are True where a
    parameter is frozen, full-shaped or broadcastable (``[n, 1]``, ``[1, n]``, a scalar).
    Put it *last* in the chain (after weight decay, clipping and the learning rate): then
    ``optax.apply_updates`` leaves frozen elements bit-identical, whatever comes before.
    Pair it with :func:`zero_frozen_gradients` so frozen gradients stay out of the global norm.
    A mask leaf is a scalar or has its parameter's rank (a unit mask over a kernel's rows is
    ``[n, 1]``, not ``[n]``, which would broadcast over its columns); any other shape is refused
    at ``init``, naming the parameter. Nothing may wrap the chain after it (``optax.apply_if_finite``
    would emit ``+0.0`` for frozen ``-0.0`` weights on a skipped step), nor may it sit inside
    ``optax.masked``.
    """

    def init_fn(params):
        def check(path, param, mask):
            shape, mask_shape = np.shape(param), np.shape(mask)
            if len(mask_shape) not in (0, len(shape)) or any(m not in (1, n) for m, n in zip(mask_shape, shape)):
                raise ValueError(f"freeze: the mask of {jax.tree_util.keystr(path)} has shape {mask_shape}, "
                                 f"its parameter {shape}: give a scalar or a mask of the parameter's rank that "
                                 "broadcasts to it")
            return jnp.asarray(mask, bool)

        return FreezeState(jax.tree_util.tree_map_with_path(check, params, masks))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(_frozen_update, updates, state.masks), state

    return optax.GradientTransformation(init_fn, update_fn)


def frozen_masks_of(opt_state: Any) -> Any:
    """The masks of the :func:`freeze` transform inside an optimizer state (any nesting)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, FreezeState))
             if isinstance(x, FreezeState)]
    if len(found) != 1:
        raise ValueError(f"the optimizer state holds {len(found)} freeze transforms, expected one")
    return found[0].masks


def zero_frozen_gradients(grads: Any, masks: Any) -> Any:
    """Gradients with frozen elements set to zero (NaN or inf there included), before the
    optimizer sees them: clipping norms and Adam moments then ignore the frozen elements."""
    return jax.tree.map(lambda g, m: jnp.where(m, jnp.zeros((), g.dtype), g), grads, masks)
