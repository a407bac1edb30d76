"""Memory plans: what a train step or a generation call needs per device, before any weight is
read or any device is used.

The model, the optimizer state and the batch are built abstractly (``jax.eval_shape``: shapes,
dtypes and shardings only), the step is lowered and compiled for the mesh (N fake CPU devices,
or a TPU topology compiled ahead of time with ``libtpu``), and XLA's buffer assignment
(``compiled.memory_analysis()``) gives the bill of one device: its arguments (parameters,
optimizer state, batch), its temporaries (activations kept for the backward pass, gradients,
workspace) and its outputs that do not reuse donated inputs. ``ssah-jax plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ssah_jax.generation import generate_tokens
from ssah_jax.models import B_MATRIX, CausalLM, Layout, ModelConfig, stack_layers, unstack_layers
from ssah_jax.sharding import active_rules, logical_to_spec, make_mesh, padded_rows, param_shardings, use_rules
from ssah_jax.train import lora as lora_lib
from ssah_jax.train.setup import TrainingSpec
from ssah_jax.train.step import (
    OptimizerConfig,
    Trainee,
    TrainState,
    compile_train_step,
    make_optimizer,
    model_shardings,
)

GIB = 1024**3


ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What a generation call's memory depends on: ``batch_size`` prompts decoded for
    ``max_new_tokens`` more tokens with the weights in ``dtype``, on a ``mesh`` of one host's
    devices (axis sizes, -1 the rest; see :func:`ssah_jax.sharding.stage_mesh`)."""

    batch_size: int
    max_new_tokens: int
    dtype: Any = jnp.float32
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(ONE_DEVICE))


@dataclasses.dataclass(frozen=True)
class AttributionSpec:
    """What a unit-scoring pass's memory depends on: ``scorer`` (``wifv`` / ``wanda``: activation
    statistics; ``snip``: gradients, of one layer at a time with ``by_layer``) over batches of
    ``batch_size`` x ``max_length`` tokens with the weights in ``dtype``, on a ``mesh`` of one
    host's devices."""

    scorer: str
    batch_size: int
    max_length: int
    dtype: Any = jnp.float32
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(ONE_DEVICE))
    by_layer: bool = False


@dataclasses.dataclass(frozen=True)
class PlanItem:
    """One thing an experiment runs, for ``ssah-jax plan``: a training (``spec`` a
    :class:`~ssah_jax.train.setup.TrainingSpec`), a decoding (a :class:`DecodeSpec`) or a unit
    scoring (an :class:`AttributionSpec`) of the
    architecture of ``model`` (a registered name, a directory or a hub id, as
    :func:`ssah_jax.checkpoints.model_config` reads it), shown as ``label``; ``keys``: the prefix
    of its config keys on the command line (``finetune.`` in a pipeline), for the advice."""

    label: str
    model: str
    spec: TrainingSpec | DecodeSpec | AttributionSpec
    keys: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryBill:
    """Bytes one device holds at the peak of a compiled call (``total``: arguments + outputs
    that do not alias a donated argument + temporaries + code), with the arguments split into
    ``parameters`` (the model's weights, or a LoRA run's frozen base and adapters),
    ``optimizer`` (moments and freeze masks) and ``inputs`` (batch, cache, the rest)."""

    what: str
    devices: int
    device_kind: str
    parameters: int
    optimizer: int
    inputs: int
    temporaries: int
    outputs: int
    code: int
    capacity: int | None  # bytes of one device (None: unknown)

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.inputs + self.temporaries + self.outputs + self.code

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / GIB:9.3f} GiB"  # noqa: E731
        rows = [("parameters", self.parameters), ("optimizer state", self.optimizer), ("inputs", self.inputs),
                ("activations and temporaries", self.temporaries), ("outputs (not donated)", self.outputs),
                ("code", self.code), ("total", self.total)]
        out = [f"{self.what}: per device ({self.devices} x {self.device_kind})"]
        out += [f"  {name:28} {gib(value)}" for name, value in rows]
        if self.capacity is None:
            out.append("  capacity unknown (give --memory_gb)")
        else:
            share = self.total / self.capacity
            out.append(f"  {'capacity':28} {gib(self.capacity)}  -> {'fits' if self.fits else 'DOES NOT FIT'} "
                       f"({share:.0%} of the device)")
        return out


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s arrays (ShapeDtypeStructs or arrays with a
    sharding; none: whole on every device), the largest shard of each."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _bill(what: str, compiled: Any, mesh: jax.sharding.Mesh, parameters: int, optimizer: int,
          capacity: int | None) -> MemoryBill:
    m = compiled.memory_analysis()
    arguments = m.argument_size_in_bytes
    return MemoryBill(what, mesh.devices.size, mesh.devices.flat[0].device_kind, parameters, optimizer,
                      max(arguments - parameters - optimizer, 0), m.temp_size_in_bytes,
                      max(m.output_size_in_bytes - m.alias_size_in_bytes, 0), m.generated_code_size_in_bytes,
                      capacity)


def _follow_parameters(opt_state: Any, params: Any, shardings: Any, replicated: NamedSharding) -> Any:
    """Shardings of an optimizer state as :func:`~ssah_jax.train.step.create_state` places it: a
    leaf at ``<state path>/<parameter path>`` of its parameter's shape (Adam's moments) is
    sharded like the parameter; the rest (counts, compact freeze masks) is replicated."""
    by_path = {jax.tree_util.keystr(path): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings))}

    def place(path, leaf):
        for start in range(len(path)):
            shape, sharding = by_path.get(jax.tree_util.keystr(path[start:]), (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(place, opt_state)


def abstract_model(config: ModelConfig, layout: Layout = Layout(), dtype=jnp.float32) -> CausalLM:
    """The model with ShapeDtypeStruct parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=dtype, layout=layout,
                                           rngs=nnx.Rngs(0)))


def plan_train_step(
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    *,
    batch_size: int,
    length: int,
    optimizer: OptimizerConfig = OptimizerConfig(),
    compute_dtype: Any = jnp.float32,
    accum_steps: int = 1,
    layout: Layout = Layout(),
    lora: lora_lib.LoraConfig | None = None,
    capacity: int | None = None,
) -> MemoryBill:
    """The bill of one device for a full fine-tuning step (or LoRA's) of ``config`` on ``mesh``:
    float32 master weights sharded by their logical axes, AdamW with the freeze transform,
    ``batch_size`` x ``length`` tokens in ``accum_steps`` micro-batches, ``compute_dtype``
    compute, ``layout`` (scan, remat). A unit freeze changes none of it (frozen elements keep
    their optimizer state), so it is not an argument."""
    with jax.set_mesh(mesh), use_rules():
        model = abstract_model(config, layout)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        shardings = model_shardings(model, mesh)
        base = base_shardings = None
        if lora is not None:  # as setup_training: adapters made unrolled, then stacked
            base, base_shardings = params, shardings
            unrolled = jax.eval_shape(unstack_layers, params) if layout.scan else params
            params = jax.eval_shape(lambda: lora_lib.init(jax.random.key(0), unrolled, lora))
            params = jax.eval_shape(stack_layers, params) if layout.scan else params
            shardings = lora_lib.shardings(params, base_shardings, lora)
        masks = jax.tree.map(lambda _: False, params)
        tx, schedule = make_optimizer(optimizer, masks)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_state = jax.eval_shape(tx.init, params)
        opt_state = _abstract(opt_state, _follow_parameters(opt_state, params, shardings, replicated))
        scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
        state = TrainState(_abstract(params, shardings), opt_state, scalar(jnp.int32), scalar(jnp.uint32, (2,)),
                           None if base is None else _abstract(base, base_shardings))
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        trainee = Trainee.of(model, compute_dtype, lora)
        step = compile_train_step(trainee, tx, schedule, state_shardings, accum_steps=accum_steps)
        rows = NamedSharding(mesh, logical_to_spec(("act_batch",), active_rules()))
        tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=rows)
        batch = {k: tokens for k in ("input_ids", "attention_mask", "loss_mask", "roles")}
        batch["label"] = batch["answer_label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
        compiled = step.lower(state, batch).compile()
    parameters = shard_bytes(state.params) + (0 if base is None else shard_bytes(state.base))
    return _bill(f"train step ({batch_size} x {length} tokens, {jnp.dtype(compute_dtype).name} compute, "
                 f"scan={layout.scan}, remat={layout.remat}, accum_steps={accum_steps}"
                 f"{', LoRA' if lora else ''})", compiled, mesh, parameters, shard_bytes(state.opt_state), capacity)


def _on_mesh(config: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any, layout: Layout = Layout()):
    """``(graphdef, abstract state)`` of ``config`` in ``dtype``, each parameter sharded on
    ``mesh`` by its logical axes (call under ``jax.set_mesh(mesh)`` and the rules)."""
    model = abstract_model(config, layout, dtype)
    graphdef, state = nnx.split(model)
    def place(var, sharding):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    shardings = param_shardings(state, mesh, active_rules())
    return graphdef, jax.tree.map(place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _one_device(device: Any) -> jax.sharding.Mesh:
    return make_mesh((1, 1, 1), devices=[device or jax.devices()[0]])


def _batch(mesh: jax.sharding.Mesh, rows: int, length: int) -> tuple[jax.ShapeDtypeStruct, NamedSharding]:
    """An abstract int32 ``[rows, length]`` batch (filled up to a multiple of the data-parallel
    size) split over the batch axes, and the replicated sharding of the call's scalars."""
    split = NamedSharding(mesh, logical_to_spec(("act_batch",), active_rules()))
    batch = jax.ShapeDtypeStruct((padded_rows(rows), length), jnp.int32, sharding=split)
    return batch, NamedSharding(mesh, PartitionSpec())


def plan_generation(
    config: ModelConfig,
    mesh: jax.sharding.Mesh | None = None,
    *,
    batch_size: int,
    prompt_tokens: int,
    max_new_tokens: int,
    dtype: Any = jnp.float32,
    device: Any = None,
    capacity: int | None = None,
) -> MemoryBill:
    """The bill of one device for greedy generation (:func:`ssah_jax.generation.generate_tokens`)
    on ``mesh`` (default: ``device`` alone): the weights in ``dtype`` sharded by their logical
    axes, ``batch_size`` prompts of ``prompt_tokens`` (filled up to a multiple of the
    data-parallel size) split over the data axes, a KV cache for ``max_new_tokens`` more with
    its kv heads over the tensor axis."""
    mesh = mesh or _one_device(device)
    with jax.set_mesh(mesh), use_rules():
        graphdef, state = _on_mesh(config, mesh, dtype)
        ids, one = _batch(mesh, batch_size, prompt_tokens)
        batch = ids.shape[0]
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=one)  # noqa: E731
        key = jax.eval_shape(lambda: jax.random.key(0))
        compiled = generate_tokens.lower(
            graphdef, state, ids, ids, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=one), scalar(jnp.float32),
            scalar(jnp.int32), scalar(jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32, sharding=one),
            scalar(jnp.int32), max_new_tokens=max_new_tokens, sample=False).compile()
    return _bill(f"generation ({batch} prompts x {prompt_tokens} tokens + {max_new_tokens} new, "
                 f"{jnp.dtype(dtype).name})", compiled, mesh, shard_bytes(state), 0, capacity)


def plan_attribution(
    config: ModelConfig,
    mesh: jax.sharding.Mesh | None = None,
    *,
    scorer: str,
    batch_size: int,
    length: int,
    dtype: Any = jnp.float32,
    by_layer: bool = False,
    device: Any = None,
    capacity: int | None = None,
) -> MemoryBill:
    """The bill of one device for one batch of unit scoring on ``mesh`` (default: ``device``
    alone): the activation statistics step of ``wifv`` / ``wanda``, or the gradient step of
    ``snip`` (its float32 gradient sums of the ``B`` kernels, of one layer's with ``by_layer``,
    are "optimizer state" here, sharded like the kernels), ``batch_size`` x ``length``
    calibration tokens split over the data axes."""
    from ssah_jax.attribution.scorers import gradient_step, is_b_kernel, layer_gradient_step, moments_step
    from ssah_jax.attribution.stats import Moments
    from ssah_jax.models import unit_shapes

    mesh = mesh or _one_device(device)
    with jax.set_mesh(mesh), use_rules():
        graphdef, state = _on_mesh(config, mesh, dtype)
        tokens, one = _batch(mesh, batch_size, length)
        batch_rows = tokens.shape[0]
        batch = {k: tokens for k in ("input_ids", "attention_mask", "loss_mask")}
        if scorer == "snip":
            model = nnx.merge(graphdef, state)
            graphdef, b_state, rest = nnx.split(model, is_b_kernel, ...)
            sums = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), b_state)
            count = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
            if by_layer:
                sums = {m: sums["layers"][0][m][proj]["kernel"] for m, proj in B_MATRIX.items()}
                compiled = layer_gradient_step.lower(graphdef, b_state, rest, count, (sums, count), batch,
                                                     "response").compile()
            else:
                compiled = gradient_step.lower(graphdef, b_state, rest, (sums, count), batch, "response").compile()
            extra = shard_bytes(sums)
        else:
            acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                               {m: jax.eval_shape(lambda s=shape: Moments.zeros(s))
                                for m, shape in unit_shapes(config).items()})
            compiled = moments_step.lower(graphdef, state, acc, batch, "response").compile()
            extra = 0
    what = f"{scorer}{' by layer' if by_layer and scorer == 'snip' else ''}"
    return _bill(f"attribution, {what} ({batch_rows} x {length} tokens, {jnp.dtype(dtype).name})", compiled,
                 mesh, shard_bytes(state), extra, capacity)
