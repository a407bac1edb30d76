"""Run metrics: one JSON line per record (``metrics.jsonl``) and TensorBoard events
(``tensorboard/``). Resuming from step ``s`` drops what a killed run logged after ``s``. In a
multi-host run only process 0 writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ssah_jax import hosts
from ssah_jax.runs import read_jsonl, write_atomic


class MetricWriter:
    def __init__(self, workdir: str | Path, *, resume_step: int = 0):
        workdir = Path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.tensorboard = None
        if not hosts.is_main():
            return
        # A fresh start (resume_step 0: no checkpoint) keeps nothing of a killed run, not even
        # its step-0 evaluation, which the new run logs again; the rewrite replaces the file at
        # once, so a kill during it leaves the old records, never a truncated file.
        kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step] if resume_step else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides the events a killed run wrote after the resumed step
        # (all of them on a fresh start).
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else 0)

    def write(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        """Logs ``metrics`` (numbers) as ``<prefix>/<name>`` at ``step``."""
        if self.tensorboard is None:
            return
        values = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": prefix, **values}) + "\n")
        for name, value in values.items():
            if math.isfinite(value):
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, int(step))

    def last(self, kind: str) -> dict[str, float]:
        """The values of the last ``kind`` record (``{}`` if none, or on a host that does not write)."""
        records = [r for r in read_jsonl(self.path) if r["kind"] == kind] if self.tensorboard else []
        return {k: v for k, v in records[-1].items() if k not in ("step", "kind")} if records else {}

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
