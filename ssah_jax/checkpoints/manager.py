"""Training checkpoints with orbax: the whole train state (parameters, optimizer state with
the freeze masks, step, rng) plus JSON metadata (the data position and what it indexes).

Saves are asynchronous (orbax copies the arrays off the devices, then writes in the
background); a checkpoint directory appears only once complete, so a run killed mid-save
resumes from the previous one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ssah_jax.checkpoints.params import CheckpointError


class TrainCheckpoints:
    """``CheckpointManager`` over ``{"state": <pytree>, "meta": <json>}`` items.

    Args:
      directory: where the step directories go (created).
      every: save when ``step % every == 0`` (``save(..., force=True)`` saves anyway), and
        on preemption; not at the first step, as orbax's default policy would: a save holds a
        host copy of the whole state while training goes on (Qwen2.5-Coder-0.5B with Adam: 2.35 GiB
        of parameters and 4.70 of moments by ``ssah-jax plan --config=configs/reproduce.py:qwen_cpu
        --devices=1``, which a 24 GB machine cannot spare beside its training step).
      keep: how many recent checkpoints to keep.
    """

    def __init__(self, directory: str | Path, *, every: int, keep: int):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policy, max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``meta`` as ``step``; True if a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved with ``step`` (default: the latest), without reading the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state at ``step`` (default: the latest), shaped, typed and sharded like ``like``
        (a state of the same structure, or ``jax.ShapeDtypeStruct`` leaves with shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.directory / str(step)}: does not hold a train state of this run's structure (another model, "
                f"freeze setting or optimizer?): {e}") from e
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        """Waits for the last save to finish."""
        self.manager.wait_until_finished()
        self.manager.close()
