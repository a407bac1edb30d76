"""Pure training functions: the state, the objective, the optimizer, the train step.

Everything here is a function of pytrees. The model enters as a static ``nnx.GraphDef`` (the
:class:`Trainee`, which also carries the :class:`Objective`: response-only NLL by default)
and a pure parameter dict (``nnx.to_pure_dict``), so the step can be compiled once with
explicit input / output shardings and donated buffers::

    trainee = Trainee.of(model, compute_dtype=jnp.bfloat16)       # graphdef, static
    tx, schedule = make_optimizer(OptimizerConfig(...), masks)    # freeze masks in its state
    state, shardings = create_state(params, tx, mesh=mesh, rng=jax.random.key(0))
    step = compile_train_step(trainee, tx, schedule, shardings, mesh, accum_steps=2)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ssah_jax.masking import FreezeState, freeze, frozen_masks_of, zero_frozen_gradients
from ssah_jax.models import CausalLM, is_stacked, next_token_logprobs
from ssah_jax.sharding import active_rules, logical_to_spec, param_shardings
from ssah_jax.train import lora

SCHEDULES = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
    """``params``: what the optimizer updates (the model's parameters, float32 master copies,
    or LoRA adapters). ``base``: frozen weights a LoRA run adapts (None otherwise).
    ``rng``: key data advanced every step, for stochastic parts of a loss."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    base: Any = None


class Objective(Protocol):
    """What a train step minimises: ``sum_t weights[t] * sums[t] / counts[t]`` over its terms.

    ``counts(batch)`` are the normalisers of a whole batch (tokens, examples), computed from
    the batch alone, before its micro-batches run; ``sums(model, batch)`` are each term's sum
    over a (micro-)batch. Summing sums over micro-batches and dividing by the whole batch's
    counts makes gradient accumulation exact for every term. A term of weight 0 is a metric
    only (e.g. an accuracy). ``weights`` is a tuple of ``(term, weight)`` pairs, so that an
    objective (a frozen dataclass) is hashable: the step is compiled for one."""

    weights: tuple[tuple[str, float], ...]

    def counts(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]: ...

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], **extra: Any) -> dict[str, jax.Array]: ...


def _response_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["loss_mask"][:, 1:].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ResponseLoss:
    """Mean NLL of the loss-mask tokens (the response and its end-of-turn token): SFT."""

    weights: tuple[tuple[str, float], ...] = (("nll", 1.0),)

    def counts(self, batch):
        return {"nll": jnp.sum(_response_tokens(batch))}

    def sums(self, model, batch):
        logp = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        return {"nll": -jnp.sum(logp * _response_tokens(batch))}


@dataclasses.dataclass(frozen=True)
class Trainee:
    """What the step runs: the model's graph in the compute dtype and layout (static), LoRA if any, the
    objective, and ``extra``: the top-level names of trained parameters outside the model's
    layout (a safety signal's ``"signal"``), which the objective receives by name."""

    graphdef: nnx.GraphDef
    compute_dtype: Any = jnp.float32
    lora: lora.LoraConfig | None = None
    objective: Objective = ResponseLoss()
    extra: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: CausalLM, compute_dtype=jnp.float32, lora_config: lora.LoraConfig | None = None,
           objective: Objective = ResponseLoss(), extra: tuple[str, ...] = ()) -> Trainee:
        abstract = nnx.eval_shape(lambda: CausalLM(model.config, dtype=compute_dtype, param_dtype=compute_dtype,
                                                   layout=model.layout, rngs=nnx.Rngs(0)))
        return cls(nnx.graphdef(abstract), compute_dtype, lora_config, objective, tuple(extra))

    def weights(self, params: Any, base: Any) -> Any:
        """The model's full parameter dict in the compute dtype (LoRA merged in, extras left out)."""
        own = {k: v for k, v in params.items() if k not in self.extra}
        full = own if self.lora is None else lora.merge(base, own, self.lora)
        return jax.tree.map(lambda w: w.astype(self.compute_dtype), full)

    def model(self, params: Any, base: Any = None) -> CausalLM:
        return nnx.merge(self.graphdef, self.weights(params, base))

    def extras(self, params: Any) -> dict[str, Any]:
        """The parameters outside the model's layout, by name (float32 master copies)."""
        return {k: params[k] for k in self.extra}


def objective_scale(trainee: Trainee, counts: dict[str, jax.Array]) -> jax.Array:
    """The count of the objective's first weighted term (at least 1)."""
    first = next(t for t, w in trainee.objective.weights if w)
    return jnp.maximum(counts[first], 1.0)


def objective_value(trainee: Trainee, counts: dict[str, jax.Array], scale: jax.Array, params: Any, base: Any,
                    batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(scale * sum_t weights[t] * sums[t] / counts[t], sums)`` of a (micro-)batch, ``counts``
    being the whole batch's (a count of 0 counts as 1) and ``scale`` :func:`objective_scale`.

    The step divides the summed gradients by ``scale`` once: the first term enters with the
    factor ``scale / counts = 1`` exactly, so a one-term objective is differentiated as its raw
    sum, the same arithmetic whatever other terms an objective adds."""
    sums = trainee.objective.sums(trainee.model(params, base), batch, **trainee.extras(params))
    value = sum(w * sums[t] * (scale / jnp.maximum(counts[t], 1.0)) for t, w in trainee.objective.weights if w)
    return jnp.asarray(value, jnp.float32), sums


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup from 0
    warmup_steps: int = 0
    total_steps: int = 1
    end_fraction: float = 0.0  # final learning rate / peak (cosine, linear)
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only (not norms or biases)
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
    if c.schedule not in SCHEDULES:
        raise ValueError(f"schedule {c.schedule!r}: must be one of {SCHEDULES}")
    decay_steps = max(c.total_steps - c.warmup_steps, 1)
    end = c.learning_rate * c.end_fraction
    after = {
        "cosine": optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_fraction),
        "linear": optax.linear_schedule(c.learning_rate, end, decay_steps),
        "constant": optax.constant_schedule(c.learning_rate),
    }[c.schedule]
    if not c.warmup_steps:
        return after
    # Step s < warmup_steps uses (s + 1) / warmup_steps of the peak: no update is wasted at 0.
    warmup = optax.linear_schedule(c.learning_rate / c.warmup_steps, c.learning_rate, c.warmup_steps - 1)
    return optax.join_schedules([warmup, after], [c.warmup_steps])


def _decay_mask(params: Any) -> Any:
    """Matrices decay, norms and biases do not, in either layout (a stacked ``layers`` axis is
    not a matrix dimension)."""
    stacked = isinstance(params, Mapping) and "layers" in params and is_stacked(params)

    def decays(path, p):
        per_layer = stacked and getattr(path[0], "key", None) == "layers"
        return p.ndim - per_layer >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: OptimizerConfig, masks: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip -> AdamW (schedule, decoupled weight decay) -> :func:`ssah_jax.masking.freeze`.

    ``masks``: True where a parameter is frozen, shaped like (or broadcastable to) the
    trained params. The freeze transform is always there (all-False masks when nothing is
    frozen), so every run has one code path."""
    schedule = learning_rate_schedule(c)
    chain = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    chain += [optax.adamw(schedule, c.b1, c.b2, c.eps, weight_decay=c.weight_decay, mask=_decay_mask), freeze(masks)]
    return optax.chain(*chain), schedule


# ---------------------------------------------------------------------------------------------
# State and shardings


def _compact_sharding(mask: Any, param: NamedSharding) -> NamedSharding:
    """A freeze mask sharded like its parameter on the axes where it is not broadcast."""
    spec = tuple(param.spec) + (None,) * (mask.ndim - len(param.spec))
    return NamedSharding(param.mesh, PartitionSpec(*(a if n > 1 else None for a, n in zip(spec, mask.shape))))


def model_shardings(model: CausalLM, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for ``model``'s pure parameter dict, from its logical axis names."""
    return nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh, active_rules()))


def create_state(
    params: Any,
    tx: optax.GradientTransformation,
    shardings: Any,
    *,
    rng: jax.Array,
    base: Any = None,
    base_shardings: Any = None,
) -> tuple[TrainState, TrainState]:
    """The initial state placed on the mesh, and the matching tree of NamedShardings (what
    the train step takes and returns, and what a checkpoint restores into).

    Parameters go where ``shardings`` says; Adam moments follow them; freeze masks are
    sharded like their parameter along the axes they are not broadcast on; the rest (counts,
    step, rng) is replicated."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, shardings)
    base = None if base is None else jax.device_put(base, base_shardings)
    opt_state = tx.init(params)

    def place_masks(node):
        if not isinstance(node, FreezeState):
            return node
        # From host copies: masks may share one array (a scalar False), and each leaf of a
        # donated state needs its own buffer.
        return FreezeState(jax.tree.map(lambda m, s: jax.device_put(np.array(m, bool), _compact_sharding(m, s)),
                                        node.masks, shardings))

    opt_state = jax.tree.map(place_masks, opt_state, is_leaf=lambda x: isinstance(x, FreezeState))
    rng = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    state = TrainState(params, opt_state, jnp.zeros((), jnp.int32), jnp.asarray(rng), base)

    def sharding_of(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape else replicated

    state_shardings = jax.tree.map(sharding_of, state)
    return jax.device_put(state, state_shardings), state_shardings


# ---------------------------------------------------------------------------------------------
# The step


def _micro_batches(batch: dict[str, jax.Array], accum_steps: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [accum_steps, B / accum_steps, ...]``; micro-batch ``k`` takes rows
    ``k, k + accum_steps, ...`` so each one spans every data shard."""
    def split(x):
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def train_step(
    trainee: Trainee,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum_steps: int,
    state: TrainState,
    batch: dict[str, jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (``accum_steps`` micro-batches, gradients of the
    trainee's objective summed in float32). Frozen gradients are zeroed before clipping and
    Adam, and the freeze transform ends the chain.

    Metrics: ``loss`` (the objective), each term's mean (``nll``, ...) and count
    (``nll_count``, ...), ``grad_norm``, ``learning_rate``."""
    counts = trainee.objective.counts(batch)
    scale = objective_scale(trainee, counts)
    grad_fn = jax.value_and_grad(functools.partial(objective_value, trainee, counts, scale), has_aux=True)

    def accumulate(carry, micro):
        grads, value, sums = carry
        (micro_value, micro_sums), g = grad_fn(state.params, state.base, micro)
        return (jax.tree.map(jnp.add, grads, g), value + micro_value, jax.tree.map(jnp.add, sums, micro_sums)), None

    if accum_steps == 1:  # no loop: inside a scan body XLA keeps extra copies of the gradients
        (value, sums), grads = grad_fn(state.params, state.base, batch)
    else:
        micro = _micro_batches(batch, accum_steps)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        no_sums = {t: jnp.zeros((), jnp.float32) for t, _ in trainee.objective.weights}
        (grads, value, sums), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), no_sums), micro)
    grads = jax.tree.map(lambda g, p: (g / scale).astype(p.dtype), grads, state.params)
    new, grad_norm = apply_gradients(tx, state, grads)
    metrics = {"loss": value / scale, **term_metrics(sums, counts), "grad_norm": grad_norm,
               "learning_rate": schedule(state.step)}
    return new, metrics


def term_metrics(sums: dict[str, jax.Array], counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Each term's mean (``sums / counts``, a count of 0 as 1) and its count (``<term>_count``)."""
    means = {t: s / jnp.maximum(counts[t], 1.0) for t, s in sums.items()}
    return means | {f"{t}_count": counts[t] for t in sums}


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any) -> tuple[TrainState, jax.Array]:
    """The optimizer half of a step: frozen gradients zeroed (NaN there included), ``tx``
    (ending in the freeze transform), parameters updated, step and rng advanced. Also
    returns the global norm of the gradients it used."""
    grads = zero_frozen_gradients(grads, frozen_masks_of(state.opt_state))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
    )
    return new, optax.global_norm(grads)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows over the batch axes of the mesh (``act_batch``), everything else whole."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",), active_rules()))


def compile_train_step(
    trainee: Trainee,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: TrainState,
    *,
    accum_steps: int = 1,
):
    """``step(state, batch) -> (state, metrics)`` jitted with the state's shardings in and
    out, the batch split over the batch axes, and the input state donated."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(train_step, trainee, tx, schedule, accum_steps)
    return jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated),
                   donate_argnums=0)


def compile_eval_step(trainee: Trainee, shardings: TrainState):
    """``evaluate(state, batch) -> (sums, counts)``: the objective's per-term sums and counts
    on ``batch``, jitted (add them up over batches, then divide: :func:`term_metrics`)."""
    mesh = jax.tree.leaves(shardings)[0].mesh

    def fn(state, batch):
        sums = trainee.objective.sums(trainee.model(state.params, state.base), batch, **trainee.extras(state.params))
        return sums, trainee.objective.counts(batch)

    return jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
