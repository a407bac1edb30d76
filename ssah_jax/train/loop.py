"""The training loop: compiled steps over a random-access batch dataset, metrics, periodic
evaluation hooks, and orbax checkpoints that make a re-run resume exactly.

Batch ``s`` of the run is ``dataset[s]`` (a ``grain.MapDataset`` from
:func:`ssah_jax.data.batching.batch_dataset`), so the data position saved with a checkpoint
is the step itself, and a resumed run sees the same batches in the same order: on one
machine its final parameters are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from ssah_jax import hosts, runs
from ssah_jax.checkpoints.manager import TrainCheckpoints
from ssah_jax.checkpoints.params import CheckpointError
from ssah_jax.masking import frozen_masks_of
from ssah_jax.sharding import shard_batch
from ssah_jax.train.metrics import MetricWriter
from ssah_jax.train.setup import Training
from ssah_jax.train.step import TrainState

# (step, state) -> metrics to log under "eval/", or None.
Hook = Callable[[int, TrainState], dict[str, float] | None]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    checkpoint_every: int = 50
    keep_checkpoints: int = 2


def fit(
    training: Training,
    dataset: Any,
    config: LoopConfig,
    workdir: str | Path,
    *,
    data_id: dict[str, Any],
    hooks: Sequence[Hook] = (),
) -> tuple[TrainState, dict[str, Any]]:
    """Trains ``training.state`` with ``training.step`` for ``config.steps`` steps, resuming
    from ``workdir/checkpoints``.

    ``data_id`` describes the batches (dataset, sizes, seed); a checkpoint made with other
    data, under other ``training.settings`` (those both record) or with other frozen units is
    refused. Hooks run before step 0, every ``eval_every`` steps and after the last. Returns
    the final state and a summary (steps run now, wall time, last metrics).
    """
    workdir = Path(workdir)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", every=config.checkpoint_every,
                                   keep=config.keep_checkpoints)
    state, step_fn, start = training.state, training.step, 0
    if checkpoints.latest_step() is not None:
        # The metadata first: a run under other settings is refused by name, before a restore
        # that might fail on their shapes.
        meta = checkpoints.meta()
        if meta.get("data") != data_id:
            raise CheckpointError(
                f"{checkpoints.directory}: made with data {meta.get('data')}, this run has {data_id}; "
                "use a new --workdir")
        # Only the settings both record are compared: a checkpoint written before a setting
        # was recorded (or before any was) cannot be checked for it.
        made_under = runs.leaves(ConfigDict(meta.get("settings", {})))
        now = runs.leaves(ConfigDict(training.settings))
        both = made_under.keys() & now.keys()
        made_under, now = {k: made_under[k] for k in both}, {k: now[k] for k in both}
        if made_under != now:
            raise CheckpointError(f"{checkpoints.directory}: made under other training settings ("
                                  + runs.differences(made_under, now, prefix="")
                                  + ", checkpoint -> this run); use a new --workdir")
        state, _ = checkpoints.restore(state)
        # The masks travel in the optimizer state: restored, they would replace this run's.
        if not _same_masks(frozen_masks_of(state.opt_state), training.masks):
            raise CheckpointError(
                f"{checkpoints.directory}: made with other frozen units than this run's (was the units file "
                "or the freeze setting changed?); use a new --workdir")
        # The initial state is not needed any more (the first step would have donated it): free
        # it rather than hold two states (Qwen2.5-Coder-0.5B with Adam: 7 GiB more at the peak,
        # the parameters and moments of `ssah-jax plan --config=configs/reproduce.py:qwen_cpu --devices=1`).
        jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, training.state)
        start = int(state.step)
        print(f"Resuming from the checkpoint of step {start} ({checkpoints.directory})")
    writer = MetricWriter(workdir, resume_step=start)

    def run_hooks(step: int, state: TrainState) -> None:
        for hook in hooks:
            values = hook(step, state)
            if values:
                writer.write(step, values, "eval")
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    if start == 0:
        run_hooks(0, state)
    began, metrics = time.perf_counter(), {}
    try:
        with tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not hosts.is_main()) as bar:
            for step in range(start, config.steps):
                state, metrics = step_fn(state, shard_batch(dataset[step]))
                done = step + 1
                if done % config.log_every == 0 or done == config.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    writer.write(done, metrics, "train")
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                # Hooks run before the step's checkpoint: a run killed after its last checkpoint
                # resumes with the evaluations up to it logged, the final one included.
                if done == config.steps or (config.eval_every and done % config.eval_every == 0):
                    run_hooks(done, state)
                checkpoints.save(done, state, {"step": done, "data_position": done, "data": data_id,
                                               "settings": training.settings},
                                 force=done == config.steps)
                bar.update(1)
    finally:
        # Stopped or not (Ctrl-C included), the save in flight finishes: its arrays are off the
        # devices already, and a re-run resumes from it rather than from the one before.
        checkpoints.close()
    # The last step always logs its metrics (as numbers); a run resumed after it reads them back.
    summary = {"steps_run": config.steps - start, "resumed_from": start,
               "seconds": round(time.perf_counter() - began, 1), "last": metrics or writer.last("train")}
    writer.close()
    return state, summary


def _same_masks(restored: Any, masks: Any) -> bool:
    """Whether two freeze-mask trees freeze the same elements. Compared on the devices, as the
    restored masks may be sharded over hosts."""
    if jax.tree.structure(restored) != jax.tree.structure(masks) or \
            [np.shape(a) for a in jax.tree.leaves(restored)] != [np.shape(b) for b in jax.tree.leaves(masks)]:
        return False
    equal = jax.jit(lambda a, b: jnp.all(jnp.asarray([jnp.array_equal(x, y) for x, y in zip(a, b)])))
    return bool(equal(jax.tree.leaves(restored), jax.tree.leaves(masks)))
