"""``ssah-jax plan --config=configs/<experiment>.py:<preset>``: the memory bill of an experiment
before launching it.

Each experiment names what it runs (``plan_configs(config)``: its trainings and its
evaluation's decoding); each is compiled for the devices the run would have (N fake CPU devices
by default, or a TPU topology ahead of time with ``libtpu``) from abstract weights
(:mod:`ssah_jax.train.memory`), and its per-device bill is printed against the device's memory,
with "fits" or "does not fit" and, when it does not, the first of remat, the scanned layout and
more micro-batches that makes it fit.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import numpy as np

from ssah_jax import runs
from ssah_jax.models import Layout
from ssah_jax.train.setup import TrainingSpec
from ssah_jax.train.step import OptimizerConfig

# GiB of HBM per chip, by JAX's device kind (TPU topologies compiled without the chips).
TPU_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}
# Fake CPU devices stand for an 80 GB H100 / A100, of which JAX's GPU allocator takes 75% by
# default (XLA_PYTHON_CLIENT_MEM_FRACTION=.75): 60 GiB.
DEFAULT_MEMORY_GIB = 60


def devices(count: int, topology: str | None) -> list[Any]:
    """``count`` fake CPU devices, or the chips of a TPU ``topology`` (e.g. ``v5e:4x4``,
    ``v4:2x2x2``) without the hardware (``libtpu`` compiles for it)."""
    if topology:
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise runs.ConfigError(f"--topology={topology}: needs libtpu (pip install -e '.[tpu]')") from None
        from jax.experimental import topologies

        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
        except Exception as e:  # an unknown topology name: libtpu's message
            raise runs.ConfigError(f"--topology={topology}: {' '.join(str(e).split())[:300]}") from None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the CPU backend is already up (a library caller): use what it has
        pass
    found = jax.devices("cpu")
    if len(found) != count:
        raise runs.ConfigError(f"--devices={count}: the CPU backend has {len(found)} devices (XLA_FLAGS "
                               "--xla_force_host_platform_device_count sets it otherwise)")
    return found


def host_devices(found: list[Any], topology: str | None) -> list[Any]:
    """The devices of one host of ``found``: those of the first process; on a TPU ``topology``
    of several hosts, the chips of a slice of one host's shape (``v5e:4x4`` -> ``v5e:2x2``:
    libtpu compiles for a whole topology, not for a part of one)."""
    host = [d for d in found if d.process_index == found[0].process_index]
    if not topology or len(host) == len(found):
        return host
    generation, shape = topology.split(":")
    coords = np.asarray([d.coords for d in host])
    extent = coords.max(axis=0) - coords.min(axis=0) + 1
    return devices(len(host), f"{generation}:{'x'.join(str(e) for e in extent[: len(shape.split('x'))])}")


def capacity_bytes(device: Any, memory_gb: float | None) -> int:
    if memory_gb is None:
        memory_gb = TPU_MEMORY_GIB.get(device.device_kind, DEFAULT_MEMORY_GIB)
    return int(memory_gb * 1024**3)


def plan(name: str, config: Any, *, count: int = 8, memory_gb: float | None = None, topology: str | None = None,
         prompt_tokens: int = 256) -> list[str]:
    """The plan's lines for experiment ``name`` under ``config``: each of the experiment's
    ``plan_configs(config)`` (typed :class:`~ssah_jax.train.memory.PlanItem` values) compiled and billed."""
    from ssah_jax.checkpoints import model_config
    from ssah_jax.sharding import MeshMismatch, check_divides, make_mesh, stage_mesh
    from ssah_jax.train.memory import AttributionSpec, DecodeSpec, plan_attribution, plan_generation, plan_train_step

    module = importlib.import_module(f"experiments.{name}")
    if not hasattr(module, "plan_configs"):
        raise runs.ConfigError(f"ssah-jax plan: the {name} experiment names nothing to plan (no plan_configs)")
    module.validate(config)  # a bad value is the one-line error the run would give
    found = devices(count, topology)
    capacity = capacity_bytes(found[0], memory_gb)
    architectures: dict[str, Any] = {}
    bills: dict[tuple, Any] = {}
    usable = "" if memory_gb or topology else ": JAX's default 75% of an 80 GB GPU"
    lines = [f"ssah-jax plan: {name} on {len(found)} x {found[0].device_kind} "
             f"({capacity / 1024**3:.0f} GiB each{usable}{'' if memory_gb else '; --memory_gb to change'})", ""]
    for item in module.plan_configs(config):
        if item.model not in architectures:
            architectures[item.model] = model_config(item.model)
        arch, spec = architectures[item.model], item.spec
        if isinstance(spec, DecodeSpec | AttributionSpec):
            # a stage other than training runs on one host's devices (the hosts deal its work out)
            host = host_devices(found, topology)
            try:
                mesh = stage_mesh(dict(spec.mesh), host)
                check_divides(mesh.shape, arch.logical_sizes)
            except MeshMismatch as e:  # as the run says it
                raise runs.ConfigError(f"config.{item.keys}mesh.{e.axis}: {e} of the model") from None
            except ValueError as e:
                raise runs.ConfigError(f"config.{item.keys}mesh={dict(spec.mesh)}: {e}") from None
            if isinstance(spec, DecodeSpec):
                bill = plan_generation(arch, mesh, batch_size=spec.batch_size, prompt_tokens=prompt_tokens,
                                       max_new_tokens=spec.max_new_tokens, dtype=spec.dtype, capacity=capacity)
            else:
                bill = plan_attribution(arch, mesh, scorer=spec.scorer, batch_size=spec.batch_size,
                                        length=spec.max_length, dtype=spec.dtype, by_layer=spec.by_layer,
                                        capacity=capacity)
            lines += [f"[{item.label}] model {item.model}; mesh {dict(mesh.shape)} of a host's {len(host)} devices",
                      *bill.lines(), ""]
            continue
        try:
            mesh = make_mesh(dict(spec.mesh), devices=found)
        except ValueError as e:
            raise runs.ConfigError(f"config.{item.keys}mesh={dict(spec.mesh)}: {e}") from None
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if spec.batch_size % spec.accum_steps or (spec.batch_size // spec.accum_steps) % rows:
            raise runs.ConfigError(
                f"[{item.label}] a micro-batch of {spec.batch_size} / {spec.accum_steps} (batch_size / accum_steps) "
                f"does not split over the {rows} data x fsdp devices of {len(found)}, as the run would refuse")

        def train_bill(layout: Layout, accum_steps: int, item=item, spec=spec, arch=arch, mesh=mesh):
            # Trainings of one shape (a pipeline's alignment and attacks often are) compile once.
            key = (item.model, spec.batch_size, spec.max_length, spec.optimizer.weight_decay, spec.optimizer.clip_norm,
                   spec.compute_dtype, accum_steps, layout, spec.lora, tuple(mesh.shape.items()))
            if key not in bills:
                bills[key] = plan_train_step(
                    arch, mesh, batch_size=spec.batch_size, length=spec.max_length,
                    optimizer=OptimizerConfig(weight_decay=spec.optimizer.weight_decay,
                                              clip_norm=spec.optimizer.clip_norm),
                    compute_dtype=spec.compute_dtype, accum_steps=accum_steps, layout=layout, lora=spec.lora,
                    capacity=capacity)
            return bills[key]

        bill = train_bill(spec.layout, spec.accum_steps)
        lines += [f"[{item.label}] model {item.model}; mesh {dict(mesh.shape)}", *bill.lines()]
        if not bill.fits:
            lines.append("  " + _what_fits(train_bill, spec, mesh, item.keys))
        lines.append("")
    return lines


def _what_fits(train_bill, spec: TrainingSpec, mesh: Any, keys: str) -> str:
    """The first change, in order, that makes the step fit: remat ``dots``, remat ``full``, the
    scanned layout with full remat, then twice the micro-batches, again and again, while they
    still split over the data x fsdp devices."""
    layout = spec.layout

    def flags(candidate: Layout, accum_steps: int) -> str:
        changed = {"model_layout.scan": (layout.scan, candidate.scan),
                   "model_layout.remat": (layout.remat, candidate.remat),
                   "accum_steps": (spec.accum_steps, accum_steps)}
        return " ".join(f"--config.{keys}{k}={new}" for k, (old, new) in changed.items() if old != new)

    lighter = {"none": ("dots", "full"), "dots": ("full",), "dots_no_batch": ("full",)}.get(layout.remat, ())
    tries = [(Layout(layout.scan, remat), spec.accum_steps) for remat in lighter]
    best = Layout(True, "full")
    if layout != best:
        tries.append((best, spec.accum_steps))
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = spec.accum_steps * 2
    while spec.batch_size % accum == 0 and (spec.batch_size // accum) % rows == 0:
        tries.append((best, accum))
        accum *= 2
    for candidate, accum_steps in tries:
        bill = train_bill(candidate, accum_steps)
        if bill.fits:
            return f"fits with {flags(candidate, accum_steps)} ({bill.total / 1024**3:.3f} GiB)"
    return (f"no remat, scan or micro-batch setting makes it fit: shard over more devices (config.{keys}mesh) "
            "or shorten the sequences")
