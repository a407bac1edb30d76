"""What every evaluation task shares: its signature, the resumable row files, and how a task
takes its records from a kit dataset (the first ``limit``, or ``limit`` spread over the set).

A task is ``task(model, tokenizer, spec, *, store, judge) -> entries``: ``spec`` is the
evaluation's typed settings (:class:`~ssah_jax.evaluation.tasks.spec.EvalSpec`: the keys of
``configs/evaluate.py``, typed at the experiment's edge), ``store`` the run's row files,
``judge`` the judge of an attack's success (``spec.judge``, loaded: the safety tasks' ASR). It
loads its records at once and returns its metrics entries, in the order they are written:
metric name -> a function that computes that metric (writing its rows through ``store``). The
caller calls only the functions of metrics it does not hold yet, so a resumed run recomputes
nothing that is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ssah_jax import hosts, runs
from ssah_jax.data import Record, load_local
from ssah_jax.evaluation.judges import Judge
from ssah_jax.evaluation.tasks.spec import EvalSpec

Entries = dict[str, Callable[[], dict]]  # metric name -> computes it (a dict of numbers)
RowFn = Callable[[Sequence[Record], int], list[dict]]  # (records, offset of the first) -> one row each


class RowStore:
    """The row files of a run, ``<directory>/<name>.jsonl``: one JSON row per record, appended
    a chunk at a time, so a killed run resumes after its last written chunk."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.jsonl"

    def rows(self, name: str, records: Sequence[Record], fn: RowFn, chunk: int) -> list[dict]:
        """Rows for ``records``, computed ``chunk`` at a time by ``fn(records, offset)`` and
        appended to ``<name>.jsonl``; rows already there are reused (a torn last line is
        dropped). Rows of other prompts there are a WorkdirError.

        In a multi-host run each host computes ``chunk`` rows of every ``chunk x hosts`` on its
        own devices, every process gets all the rows, and process 0 writes them."""
        path = self.path(name)
        done = runs.read_jsonl(path)
        if [r["prompt"] for r in done] != [r.prompt for r in records[: len(done)]] or len(done) > len(records):
            raise runs.WorkdirError(f"{path} holds rows of other prompts (the data changed?); rerun with --overwrite "
                                    "to start afresh, or use a new --workdir")
        main = hosts.is_main()
        hosts.sync(f"{name} rows read")  # every process read them before process 0 rewrites them
        if main:
            path.write_text("".join(json.dumps(r) + "\n" for r in done))  # drops a torn last line
        with open(path if main else os.devnull, "a") as f, \
                tqdm(total=len(records), initial=len(done), desc=name, unit="ex", disable=not main) as bar:
            for start in range(len(done), len(records), chunk * hosts.count()):
                part = records[start : start + chunk * hosts.count()]
                mine = hosts.my_block(len(part), chunk)
                new = hosts.gather(fn(part[mine], start + mine.start) if mine.stop > mine.start else [])
                for row in new:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                done.extend(new)
                bar.update(len(new))
        return done


class Task(Protocol):
    def __call__(self, model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries: ...


def load_records(data_dir: str | None, name: str, split: str | None = None, on_error: str = "raise") -> list[Record]:
    """A kit dataset's records (``data_dir`` empty or None: the default kit); logs skipped rows."""
    return load_local(name, split, data_dir or None, on_error)[0]


def first(records: list[Record], limit: int) -> list[Record]:
    """The first ``limit`` records (0: all)."""
    return records[:limit] if limit else records


def spread(records: list[Record], limit: int) -> list[Record]:
    """``limit`` records evenly spaced over the set (0: all; MMLU: every subject is represented)."""
    if not limit or limit >= len(records):
        return records
    step = len(records) / limit
    return [records[int(i * step)] for i in range(limit)]
