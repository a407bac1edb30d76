"""Meshes and logical axis rules.

Every parameter and the main activations carry *logical* axis names ("embed", "mlp", ...).
One table of rules maps them onto the physical mesh axes ``data`` / ``fsdp`` / ``tensor``.
A logical name without a rule is an error, never a silent replication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers: each device holds every layer's shard
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_kv_len", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A ``data x fsdp x tensor`` mesh; ``shape`` is a dict or a 3-tuple. -1 takes the rest."""
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} are unknown (use {MESH_AXES})")
        sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries")
    devices = jax.devices() if devices is None else devices
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(sizes)}: at most one axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % rest:
            given = {n: s for n, s in zip(MESH_AXES, sizes) if s != -1}
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: the other axes {given} ({rest} devices) do "
                             f"not divide the {len(devices)} devices available")
        sizes[sizes.index(-1)] = len(devices) // rest
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def stage_mesh(shape: Mapping[str, int], devices: Sequence[Any]) -> jax.sharding.Mesh:
    """The mesh of a stage other than training: ``shape`` over one host's ``devices`` (a mesh
    of fewer devices without a -1 takes the first ones; :func:`make_mesh`'s errors otherwise)."""
    size = int(np.prod(list(shape.values())))
    if -1 not in shape.values() and size < len(devices):
        devices = list(devices)[:size]
    return make_mesh(shape, devices=devices)


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; an unknown name is an error."""
    table = dict(rules)
    missing = [n for n in names if n is not None and n not in table]
    if missing:
        raise KeyError(f"logical axis names {missing} have no sharding rule (rules: {sorted(table)})")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


@contextlib.contextmanager
def use_rules(rules=DEFAULT_RULES) -> Iterator[None]:
    """Makes ``rules`` the active logical-axis rules (for parameters and activations)."""
    with core_spmd.logical_axis_rules(tuple(rules)):
        yield


def active_rules():
    return core_spmd.get_logical_axis_rules() or DEFAULT_RULES


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, active_rules()))


def param_specs(state: Any, rules=DEFAULT_RULES) -> Any:
    """PartitionSpec tree for an ``nnx.State`` whose variables carry ``out_sharding`` names."""

    def spec(var):
        names = var.get_metadata().get("out_sharding")
        if names is None:
            return PartitionSpec()
        return logical_to_spec(names, rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding tree matching ``state``."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(state, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Places every parameter of ``model`` on ``mesh`` according to its logical names."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


def batch_multiple() -> int:
    """How many rows a batch's size must be a multiple of on the active mesh: its data-parallel
    size (``data x fsdp``, the axes of ``act_batch``); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = dict(active_rules())["act_batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of :func:`batch_multiple`: the rows a batch of ``rows``
    has on the active mesh, the added ones filler (results never depend on them)."""
    multiple = batch_multiple()
    return -(-rows // multiple) * multiple


def put_rows(x: Any) -> Any:
    """Host arrays of one batch (an array or a tree of them), placed with their leading axis
    split over the batch axes of the active mesh (``act_batch``); a batch whose rows are not a
    multiple of :func:`batch_multiple` is first filled up with zero rows (whose results the
    caller drops). Without a mesh, on the default device. Every process passes the whole batch
    (on the meshes of the stages other than training, each host's own devices, it is that
    host's batch)."""
    if jax.sharding.get_abstract_mesh().empty:
        return jax.tree.map(jax.numpy.asarray, x)
    mesh = jax.sharding.get_mesh()
    batch = NamedSharding(mesh, logical_to_spec(("act_batch",), active_rules()))

    def put(a):
        a = np.asarray(a)
        fill = padded_rows(len(a)) - len(a)
        if fill:
            a = np.concatenate([a, np.zeros((fill, *a.shape[1:]), a.dtype)])
        # each device takes its block of the whole batch (a mesh over several hosts, where each
        # host holds the same batch, included)
        return jax.make_array_from_callback(a.shape, batch, lambda index: a[index])

    return jax.tree.map(put, x)


class MeshMismatch(ValueError):
    """A mesh axis that does not divide a dimension sharded over it; ``axis`` names it."""

    def __init__(self, axis: str, message: str):
        super().__init__(message)
        self.axis = axis


def check_divides(shape: Mapping[str, int], sizes: Mapping[str, int], rules=DEFAULT_RULES) -> None:
    """Raises :class:`MeshMismatch` unless every dimension of ``sizes`` (a logical axis name ->
    its size, e.g. ``{"heads": 32, "kv_heads": 8, "vocab": 128256}``) is divisible by the mesh
    axes its rule shards it over: a parameter cut unevenly would not place. ``shape``: the mesh
    axis sizes (``mesh.shape``, or a config's, whose -1 and missing axes are not checked)."""
    table = dict(rules)
    for name, size in sizes.items():
        axes = table[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for axis in axes:
            if shape.get(axis, -1) > 0 and size % shape[axis]:
                others = ", ".join(f"{n}={s}" for n, s in sizes.items()
                                   if n != name and axis in ((table[n],) if isinstance(table[n], str)
                                                             else tuple(table[n] or ())))
                raise MeshMismatch(axis, f"{axis}={shape[axis]} does not divide {name}={size}"
                                   + (f" (also sharded over {axis}: {others})" if others else ""))


def shard_batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """One global array per key from this host's rows of a batch (what
    :func:`ssah_jax.data.batching.batch_dataset` yields), split over the batch axes of the active
    mesh (``jax.set_mesh``); without a mesh, on the default device."""
    if jax.sharding.get_abstract_mesh().empty:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    target = NamedSharding(jax.sharding.get_mesh(), logical_to_spec(("act_batch",), active_rules()))
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}
