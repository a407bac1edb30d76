"""One typed training set-up: what stays frozen, the masks, the optimizer, the sharded state and
the compiled step, built in one call that every trainer (the ``finetune`` experiment, the
benchmark) shares.

Call :func:`setup_training` inside ``with jax.set_mesh(mesh), sharding.use_rules():``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ssah_jax.attribution import UnitMap
from ssah_jax.masking import GROUPS, freeze_masks
from ssah_jax.models import MODULES, CausalLM, Layout, is_stacked, stack_layers, unstack_layers
from ssah_jax.train import lora
from ssah_jax.train.step import (
    Objective,
    OptimizerConfig,
    ResponseLoss,
    Trainee,
    TrainState,
    compile_eval_step,
    compile_train_step,
    create_state,
    make_optimizer,
    model_shardings,
)


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """The settings that shape a training run's computation, typed once at an experiment's edge
    (``experiments.finetune.training_spec``) and read by the trainer and by ``ssah-jax plan``:
    ``optimizer`` (its ``total_steps`` the run's steps), ``batch_size`` examples a step in
    ``accum_steps`` micro-batches of at most ``max_length`` tokens, ``compute_dtype``, the layer
    ``layout``, the ``mesh`` axis sizes (:func:`ssah_jax.sharding.make_mesh`'s ``-1`` takes the
    rest), ``lora`` adapters (None: the weights themselves train) and the ``seed``."""

    optimizer: OptimizerConfig
    batch_size: int
    accum_steps: int
    max_length: int
    compute_dtype: Any = jnp.float32
    layout: Layout = Layout()
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    lora: lora.LoraConfig | None = None
    seed: int = 0

    def setup(self, model: CausalLM, mesh: jax.sharding.Mesh, freeze: Freeze, **objective: Any) -> Training:
        """:func:`setup_training` of ``model`` on ``mesh`` under these settings (``objective``: its
        ``objective``, ``extra`` and ``extra_lr_scale``)."""
        return setup_training(model, mesh, freeze, self.optimizer, seed=self.seed, compute_dtype=self.compute_dtype,
                              accum_steps=self.accum_steps, **objective)


@dataclasses.dataclass(frozen=True, eq=False)
class Freeze:
    """What does not train (the defaults: full fine-tuning).

    ``frozen_units`` / ``trained_units``: unit masks (``{module: bool [layers, units]}``, see
    :func:`ssah_jax.masking.freeze_masks`), at most one of them; ``layers``: decoder layers frozen
    whole; ``groups``: embeddings / norms / head; ``lora``: train LoRA adapters on a frozen base
    instead (then nothing else may be set). ``description`` is the one line reports print
    (default: "full fine-tuning", or the LoRA setting; under LoRA, :func:`setup_training`
    appends the adapters' size)."""

    frozen_units: Mapping[str, np.ndarray] | None = None
    trained_units: Mapping[str, np.ndarray] | None = None
    layers: Sequence[int] = ()
    groups: Sequence[str] = ()
    lora: lora.LoraConfig | None = None
    description: str = ""

    def __post_init__(self):
        if self.frozen_units is not None and self.trained_units is not None:
            raise ValueError("Freeze: give frozen_units or trained_units, not both")
        if self.lora is not None and (self.frozen_units is not None or self.trained_units is not None
                                      or self.layers or self.groups):
            raise ValueError("Freeze: LoRA trains adapters on a frozen base; units, layers and groups do not apply")


FREEZE_MODES = ("none", "units", "only_units", "layers", "lora", "all")


def parse_layers(spec: str) -> list[int]:
    """``"10-15"`` -> ``[10, ..., 15]``; ``"3"`` -> ``[3]``; an empty range is a ValueError."""
    first, _, last = spec.partition("-")
    first, last = int(first), int(last or first)
    if last < first:
        raise ValueError(f"layer range {spec!r} is empty")
    return list(range(first, last + 1))


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
    """A freeze setting as a config states it, typed: ``mode`` one of FREEZE_MODES (``units``:
    freeze the units ``selection`` of the unit map ``units_file``; ``only_units``: train only
    them; ``random``: as many random units instead, drawn with ``seed``; ``layers``: freeze the
    decoder layers ``layers`` (``"i-j"``); ``lora``: train ``lora`` adapters; ``all``: the whole
    model, so that only extra parameters such as the safety signal's train); ``groups``:
    embeddings / norms / head frozen besides. :meth:`build` makes the :class:`Freeze` of a model."""

    mode: str = "none"
    units_file: str = ""
    selection: str = ""
    random: bool = False
    layers: str = ""
    groups: tuple[str, ...] = ()
    lora: lora.LoraConfig | None = None
    seed: int = 0

    def build(self, model: CausalLM) -> Freeze:
        """The :class:`Freeze` of ``model`` (its unit map read and checked against the model);
        a selection the map cannot make is a ValueError."""
        if self.mode == "lora":
            c = self.lora
            return Freeze(lora=c, description=f"LoRA rank {c.rank}, alpha {c.alpha} on {', '.join(c.targets)}")
        kw: dict[str, Any] = {"groups": tuple(self.groups)}
        if self.mode in ("units", "only_units"):
            umap = UnitMap.load(self.units_file, model=model)
            units = umap.select(self.selection)
            count = int(sum(units[m].sum() for m in MODULES))
            what = f"{self.selection} of {self.units_file} ({count} units)"
            if self.random:
                units = umap.random_units(count, self.seed)
                what = (f"{count} random units (as many as {self.selection} of {self.units_file}; "
                        f"seed {self.seed})")
            kw["frozen_units" if self.mode == "units" else "trained_units"] = units
            description = f"frozen: {what}" if self.mode == "units" else f"trained: only {what}"
        elif self.mode == "all":
            kw.update(layers=list(range(model.config.num_layers)), groups=GROUPS)
            description = "frozen: the whole model (only the extra parameters train)"
        elif self.mode == "layers":
            kw["layers"] = parse_layers(self.layers)
            description = f"frozen: decoder layers {self.layers}"
        else:
            description = "full fine-tuning"
        if self.groups and self.mode != "all":
            description += f"; frozen groups: {', '.join(self.groups)}"
        return Freeze(**kw, description=description)


@dataclasses.dataclass(frozen=True)
class Training:
    """The set-up of one training run, used once: ``state`` is the initial state, which the step
    donates (keep the state each step returns; :func:`~ssah_jax.train.loop.fit` starts from it);
    ``masks`` (True = frozen) are over ``state.params``, which are the LoRA adapters under LoRA;
    ``step(state, batch) -> (state, metrics)`` is compiled; ``settings`` (JSON values: the
    optimizer, seed, compute dtype, objective, LoRA setting and extra parameters) are what the
    run's trajectory depends on besides its data and masks: :func:`~ssah_jax.train.loop.fit`
    stores them with each checkpoint and refuses to resume one made under others."""

    trainee: Trainee
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    shardings: TrainState
    masks: Any
    step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
    description: str
    frozen_elements: int
    total_elements: int
    settings: dict[str, Any]

    def eval_step(self):
        """``evaluate(state, batch) -> (sums, counts)`` (:func:`compile_eval_step`)."""
        return compile_eval_step(self.trainee, self.shardings)

    def final_params(self, state: TrainState) -> Any:
        """The model's full parameter dict of ``state`` in the unrolled layout, whatever layout
        trained (LoRA merged into the base; without the extra parameters, which
        :meth:`final_extras` gives), float32 master weights: what an export saves."""
        own = {k: v for k, v in state.params.items() if k not in self.trainee.extra}
        full = own if self.trainee.lora is None else lora.merge(state.base, own, self.trainee.lora)
        return unstack_layers(full) if is_stacked(full) else full

    def final_extras(self, state: TrainState) -> dict[str, Any]:
        """The extra parameters of ``state`` by name (``{"signal": ...}``)."""
        return self.trainee.extras(state.params)

    def frozen_checksum(self, state: TrainState) -> int:
        """:func:`frozen_checksum` of ``state``'s parameters under the freeze masks."""
        return int(_checksum(state.params, self.masks))


def frozen_checksum(params: Any, masks: Any) -> jax.Array:
    """Sum of the bit patterns of every frozen element (uint32, wrapping): equal before and
    after training when no frozen element changed."""
    def leaf(p, m):
        bits = jax.lax.bitcast_convert_type(p.astype(jnp.float32), jnp.uint32)
        return jnp.sum(jnp.where(m, bits, jnp.uint32(0)), dtype=jnp.uint32)

    return sum(jax.tree.leaves(jax.tree.map(leaf, params, masks)), jnp.uint32(0))


_checksum = jax.jit(frozen_checksum)


def _count(params: Any, masks: Any) -> tuple[int, int]:
    frozen = sum(int(np.broadcast_to(np.asarray(m), p.shape).sum()) for p, m in
                 zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
    return frozen, int(sum(p.size for p in jax.tree.leaves(params)))


def setup_training(
    model: CausalLM,
    mesh: jax.sharding.Mesh,
    freeze: Freeze,
    optimizer: OptimizerConfig,
    *,
    seed: int = 0,
    compute_dtype: Any = jnp.float32,
    accum_steps: int = 1,
    objective: Objective = ResponseLoss(),
    extra: Mapping[str, Any] | None = None,
    extra_lr_scale: float = 1.0,
) -> Training:
    """Everything a training loop needs for ``model`` (its float32 weights are the master
    weights) on ``mesh``: freeze masks, the masked optimizer, the sharded initial state (LoRA
    adapters initialised from ``seed``, which also seeds the state's rng) and the compiled step
    in ``compute_dtype`` with ``accum_steps`` micro-batches. ``extra``: trained parameters
    outside the model's layout by top-level name (``{"signal": signal.params}``), replicated,
    never frozen, given to ``objective.sums`` by name; their updates are scaled by
    ``extra_lr_scale`` (a freshly initialised head may learn faster than the weights under it).

    ``model`` may be in either layout (:class:`~ssah_jax.models.Layout`); the state, masks and
    step follow it. Freeze masks and LoRA adapters are built in the unrolled layout and
    stacked for a scanned model, so that a unit, a layer or a seed means the same in both."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scanned = model.layout.scan
    unrolled = jax.eval_shape(unstack_layers, params) if scanned else params  # shapes suffice
    shardings = model_shardings(model, mesh)
    base = base_shardings = None
    if freeze.lora is not None:
        base, base_shardings = params, shardings
        params = lora.init(jax.random.key(seed), unrolled, freeze.lora)
        params = stack_layers(params) if scanned else params
        shardings = lora.shardings(params, base_shardings, freeze.lora)
        masks = jax.tree.map(lambda _: False, params)
    else:
        masks = freeze_masks(unrolled, model.config, frozen_units=freeze.frozen_units,
                             trained_units=freeze.trained_units, frozen_layers=tuple(freeze.layers),
                             frozen_groups=tuple(freeze.groups))
        masks = stack_layers(masks, like=unrolled) if scanned else masks
    if extra:
        clash = sorted(set(extra) & set(params))
        if clash:
            raise ValueError(f"setup_training: extra parameters {clash} would replace the model's own")
        replicated = NamedSharding(mesh, PartitionSpec())
        params = {**params, **extra}
        shardings = {**shardings, **jax.tree.map(lambda _: replicated, dict(extra))}
        masks = {**masks, **jax.tree.map(lambda _: False, dict(extra))}
    frozen, total = _count(params, masks)
    description = freeze.description
    if freeze.lora is not None:
        lc = freeze.lora
        description = description or f"LoRA rank {lc.rank}, alpha {lc.alpha} on {', '.join(lc.targets)}"
        adapters = {k: v for k, v in params.items() if k not in (extra or {})}
        description += f" ({lora.count(adapters):,} adapter parameters; the base model is frozen)"
    elif not description:
        description = "full fine-tuning" if frozen == 0 else f"{frozen:,} of {total:,} elements frozen"
    tx, schedule = make_optimizer(optimizer, masks)
    if extra and extra_lr_scale != 1.0:
        tx = optax.chain(tx, optax.masked(optax.scale(extra_lr_scale),
                                          lambda p: {k: jax.tree.map(lambda _: k in extra, v) for k, v in p.items()}))
    state, state_shardings = create_state(params, tx, shardings, rng=jax.random.key(seed), base=base,
                                          base_shardings=base_shardings)
    trainee = Trainee.of(model, compute_dtype, freeze.lora, objective, tuple(extra or ()))
    step = compile_train_step(trainee, tx, schedule, state_shardings, accum_steps=accum_steps)
    # accum_steps is left out: it splits each batch, and changes no update beyond rounding. An
    # objective is its class and, when a dataclass, its fields (numpy scalars as numbers).
    kind = type(objective)
    named = {"class": f"{kind.__module__}.{kind.__qualname__}",
             **(dataclasses.asdict(objective) if dataclasses.is_dataclass(objective) else {})}
    settings = json.loads(json.dumps({
        "optimizer": dataclasses.asdict(optimizer), "seed": seed, "compute_dtype": jnp.dtype(compute_dtype).name,
        "objective": named,
        "lora": None if freeze.lora is None else dataclasses.asdict(freeze.lora),
        "extra": sorted(extra or ()), "extra_lr_scale": extra_lr_scale}, default=lambda v: v.item()))
    return Training(trainee, tx, schedule, state, state_shardings, masks, step, description, frozen, total, settings)
