"""Where an experiment's model runs: the ``mesh`` section every experiment that runs a model
takes (``data``, ``fsdp``, ``tensor``; -1 takes the rest), turned into a mesh once and the
model loaded straight onto it by the logical rules, never whole on one device first.

Training (``finetune``) lays its mesh over every process's devices (one global batch per step).
Every other stage (decoding, log-likelihoods, attribution, probing, the signal's classifier)
lays it over *this host's* devices: each host runs the whole model on its own mesh; the hosts
deal the prompts of decoding and scoring out (``ssah_jax.evaluation.tasks.RowStore``), so a
decode loop never waits on another host's longest answer and every row is written once, and
each computes attribution's sums whole (process 0 writes them). ARCHITECTURE.md says why.

The mesh only decides where the work runs, never what it computes, so ``mesh`` is a key of
every experiment's ``EXCLUDED`` (a workdir is the same run on any mesh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.checkpoints import load_model, model_config
from ssah_jax.sharding import MESH_AXES, MeshMismatch, check_divides, stage_mesh, use_rules


def check_mesh(config: ConfigDict, model: str | None = None) -> None:
    """One-line errors naming ``config.mesh.<axis>``: sizes >= 1 or -1, at most one -1; with
    ``model`` (a pipeline's, checked before its hours of work), axes that divide its heads, kv
    heads, vocabulary and widths (those of -1 are known only on the devices)."""
    unknown = sorted(set(config.mesh) - set(MESH_AXES))
    if unknown:
        raise runs.ConfigError(f"config.mesh.{unknown[0]}: not a mesh axis (the axes: {', '.join(MESH_AXES)})")
    for axis in MESH_AXES:
        runs.check(config, f"mesh.{axis}", lambda v: isinstance(v, int) and (v >= 1 or v == -1),
                   "must be a device count >= 1, or -1 (the remaining devices)")
    if list(config.mesh.values()).count(-1) > 1:
        raise runs.ConfigError(f"config.mesh={dict(config.mesh)}: at most one axis may be -1")
    if model is not None:
        try:
            check_divides(dict(config.mesh), model_config(model).logical_sizes)
        except MeshMismatch as e:
            raise runs.ConfigError(f"config.mesh.{e.axis}: {e} of the model {model}") from None


def mesh_of(config: ConfigDict) -> jax.sharding.Mesh:
    """``config.mesh`` over this host's devices (its first ones, for a mesh of fewer without a
    -1: they are named); a mesh larger than them is a ConfigError."""
    check_mesh(config)
    devices, shape = jax.local_devices(), dict(config.mesh)
    try:
        mesh = stage_mesh(shape, devices)
    except ValueError as e:
        raise runs.ConfigError(f"config.mesh={shape}: {e}") from None
    if mesh.size < len(devices):
        print(f"config.mesh={shape}: {mesh.size} of this host's {len(devices)} devices ({devices[0].platform})")
    return mesh


def load_on_mesh(config: ConfigDict, mesh: jax.sharding.Mesh, source: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``source`` (``config.model`` by default) in ``config.dtype``,
    each parameter placed on ``mesh`` as it is read. A mesh axis that does not divide the
    heads, kv heads, vocabulary or widths sharded over it is a ConfigError naming the key."""
    try:
        return load_model(config.model if source is None else source, runs.dtype(config), mesh=mesh)
    except MeshMismatch as e:
        raise runs.ConfigError(f"config.mesh.{e.axis}: {e} of the model") from None


@contextlib.contextmanager
def model_on_mesh(config: ConfigDict) -> Iterator[tuple[Any, Any]]:
    """``(model, tokenizer)`` of ``config.model`` on ``config.mesh``, the block run on that mesh."""
    with on_mesh(config) as mesh:
        yield load_on_mesh(config, mesh)


@contextlib.contextmanager
def on_mesh(config: ConfigDict) -> Iterator[jax.sharding.Mesh]:
    """Runs the block on ``config.mesh`` (``jax.set_mesh`` and the logical rules): every
    stage of the library below lays its batches and caches out on it."""
    mesh = mesh_of(config)
    with jax.set_mesh(mesh), use_rules():
        yield mesh
