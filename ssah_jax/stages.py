"""The stages of a pipeline in one workdir: identity, resume, timing (the engine that runs a
pipeline of them is :mod:`ssah_jax.pipeline`).

A stage runs in its own directory and leaves ``stage.json`` when it finishes: its identity and
its wall time summed over every invocation that worked on it (a killed stage resumes, and its
time keeps counting). A stage's identity is the hash of what it is *given* (its config, the
keys that only affect speed or logging excluded) and of the identities of the stages whose
results it reads, so a changed key, or a prerequisite redone with other values, reaches every
stage downstream. Paths inside the workdir are recorded as ``<workdir>/...``: a moved workdir
keeps its identities.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ssah_jax import hosts, runs

RECORD = "stage.json"


def stage_record(directory: Path) -> dict | None:
    """The record of a finished stage (None if it has not finished)."""
    marker = Path(directory) / RECORD
    return runs.read_json(marker) if marker.exists() else None


def identities(names: Iterable[str], given: Callable[[str], dict[str, Any]],
               inputs: Callable[[str], Iterable[str]], workdir: Path) -> dict[str, dict[str, Any]]:
    """Per stage of ``names`` (in order): ``given`` (``given(stage)``: the determining values of
    what the stage is given, :func:`ssah_jax.runs.determining`, with paths in ``workdir`` written
    ``<workdir>/...``), ``inputs`` (the identities of the stages ``inputs(stage)`` it reads) and
    ``identity`` (the hash of both)."""
    found: dict[str, dict[str, Any]] = {}
    prefix = str(workdir) + os.sep

    def identity(stage: str) -> dict[str, Any]:
        if stage not in found:
            values = portable(given(stage), prefix)
            read = {s: identity(s)["identity"] for s in inputs(stage)}
            found[stage] = {"identity": runs.fingerprint({"given": values, "inputs": read}), "given": values,
                            "inputs": read}
        return found[stage]

    return {stage: identity(stage) for stage in names}


def portable(value: Any, prefix: str) -> Any:
    """``value`` with every path in the workdir (a string, or a component of a comma-separated
    mixture, starting with ``prefix``) written ``<workdir>/...``."""
    if isinstance(value, str):
        return ",".join("<workdir>" + os.sep + part[len(prefix):] if part.startswith(prefix) else part
                        for part in value.split(","))
    if isinstance(value, dict):
        return {k: portable(v, prefix) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, prefix) for v in value]
    return value


def finished_elsewhere(workdir: str | Path) -> dict[str, Path]:
    """The finished stages of another pipeline's workdir, by identity: a stage whose identity is
    among them computes what it would compute again (the same config and inputs), so
    :func:`run_stage` copies it instead. A workdir that does not exist holds none; a record
    that cannot be read (a stage being rewritten) is left out."""
    found: dict[str, Path] = {}
    for marker in sorted(Path(workdir).glob(f"**/{RECORD}")):
        try:
            identity = runs.read_json(marker).get("identity")
        except (OSError, runs.WorkdirError):
            continue
        if identity:
            found.setdefault(identity, marker.parent)
    return found


def _source(directory: Path, identity: str | None, elsewhere: dict[str, Path]) -> Path | None:
    """Process 0's choice of the finished stage to copy into ``directory`` (None: compute it),
    on every process: the stage of ``identity`` in ``elsewhere`` if its record still says so."""
    source = None
    if hosts.is_main():
        found = elsewhere.get(identity) if identity else None
        if found is not None and found.resolve() != directory.resolve():
            try:
                still = (stage_record(found) or {}).get("identity") == identity
            except (OSError, runs.WorkdirError):
                still = False
            source = found if still else None
    chosen = hosts.gather([str(source) if source else ""])[0]
    return Path(chosen) if chosen else None


def _copy_stage(source: Path, directory: Path, record: dict[str, Any]) -> None:
    """Copies the finished stage ``source`` into ``directory`` (through a temporary directory,
    so a kill leaves no half copy; a partial run of the same computation there is replaced),
    and writes its record: ``source``'s (time, invocations, code) with ``record`` and ``copied_from``."""
    original = runs.read_json(source / RECORD)
    partial = directory.with_name(directory.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=lambda d, names: [RECORD] if Path(d) == source else [])
    (partial / RECORD).write_text(json.dumps({**original, **record, "copied_from": str(source)}, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)


def run_stage(directory: Path, fn: Callable[[Path], Any], record: dict[str, Any],
              elsewhere: dict[str, Path] | None = None) -> None:
    """Runs ``fn(directory)`` unless the stage finished before; then writes ``stage.json``: its
    wall time, invocations, the code they ran (:func:`ssah_jax.runs.code_version`, one entry
    per distinct version) and ``record`` (its identity). A stage of ``record``'s identity
    finished in another workdir (``elsewhere``, see :func:`finished_elsewhere`; every process
    passes the same) is copied from there instead: its files as they are (those naming paths
    name the other workdir's), its record with ``copied_from`` (the time and code are the original's)."""
    directory = Path(directory)
    done = stage_record(directory)
    if done is not None:
        print(f"[{directory.name}] finished in an earlier run ({done['seconds']} s), kept")
        return
    source = _source(directory, record.get("identity"), elsewhere) if elsewhere is not None else None
    if source is not None:
        print(f"[{directory.name}] finished with the same identity in {source}: copied, not computed again",
              flush=True)
        if hosts.is_main():
            _copy_stage(source, directory, record)
        hosts.sync(f"stage {directory.name} copied")
        return
    print(f"\n=== {directory} ===", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    with StageTimer(directory) as timer:
        fn(directory)  # its results are the files it writes
    release_memory()
    if hosts.is_main():
        runs.write_atomic(directory / RECORD, json.dumps({
            "seconds": round(timer.seconds, 1), "invocations": timer.invocations, "code": timer.codes,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), **record}, indent=2) + "\n")
        (directory / StageTimer.FILE).unlink()
    hosts.sync(f"stage {directory.name} finished")  # its files are complete for every process


NUMBERS = "numbers.json"


def write_numbers(workdir: str | Path, path: Path) -> Path:
    """Writes ``path`` (``numbers.json`` beside a report): per finished stage of ``workdir`` (by
    its path there) where its numbers came from (its record's ``identity``, ``code``,
    ``finished``, ``seconds``, ``invocations``, ``copied_from``) and what it measured
    (``files``: each ``metrics.json`` it wrote, by its path in the stage: its own and those of
    its subdirectories that are not stages themselves, e.g. an attack run's ``eval/``). Small
    enough to commit with the report, so a command that reads finished pipelines
    (``ssah-jax compare``) reads them there instead of needing their workdirs of checkpoints."""
    workdir = Path(workdir)
    kept = ("identity", "code", "finished", "seconds", "invocations", "copied_from")
    found = {}
    for marker in sorted(workdir.glob(f"**/{RECORD}")):
        directory, record = marker.parent, runs.read_json(marker)
        if any(part.endswith(".copying") for part in directory.relative_to(workdir).parts):
            continue  # a copy a kill interrupted (_copy_stage): not a finished stage
        files = [directory / "metrics.json", *sorted(directory.glob("*/metrics.json"))]
        found[str(directory.relative_to(workdir))] = {
            **{k: record[k] for k in kept if k in record},
            "files": {str(f.relative_to(directory)): runs.read_json(f) for f in files
                      if f.exists() and (f.parent == directory or not (f.parent / RECORD).exists())}}
    path.write_text(json.dumps({"stages": found}, indent=1) + "\n")
    return path


def release_memory() -> None:
    """Hands the memory a finished stage freed back to the operating system (where the C
    library has ``malloc_trim``).

    A stage's arrays are freed when it ends, but glibc keeps freed heap memory resident, and
    the next stage's allocations reuse it only in part: the third fine-tuning attack of
    Qwen2.5-Coder-0.5B in one reproduce process was OOM-killed at 24 GB resident, where an
    attack in a fresh process peaked at about 15 GB (both sampled with ``ps``).
    ``malloc_trim(0)`` returns the free pages."""
    gc.collect()  # reference cycles holding arrays first
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


class StageTimer:
    """Wall time of a stage summed over the invocations that worked on it.

    A killed invocation cannot report its time, so the running total is written to
    ``<stage>/elapsed.json`` every ``every`` seconds; a resumed stage starts from it (a kill
    loses at most ``every`` seconds of the count).
    """

    FILE = "elapsed.json"

    def __init__(self, directory: Path, every: float = 10.0):
        self.path, self.every = Path(directory) / self.FILE, every
        # Process 0 alone keeps the count (the others would read it while it is being rewritten).
        earlier = (runs.read_json(self.path) if self.path.exists() and hosts.is_main()
                   else {"seconds": 0.0, "invocations": 0})
        self.earlier, self.invocations = earlier["seconds"], earlier["invocations"] + 1
        now = runs.code_version()
        self.codes = earlier.get("codes", []) + ([now] if now not in earlier.get("codes", []) else [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    @property
    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self._start

    def _save(self) -> None:
        if not hosts.is_main():
            return
        runs.write_atomic(self.path, json.dumps({"seconds": round(self.seconds, 1),
                                                 "invocations": self.invocations, "codes": self.codes}))

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._save()

    def __enter__(self) -> StageTimer:
        self._start = time.perf_counter()
        self._save()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._save()


def times_table(records: list[tuple[str, dict[str, Any]]], invocations: list[dict[str, Any]], log: Path) -> list[str]:
    """A report's stage table (markdown lines): per ``(stage, stage.json record)`` its wall time,
    invocations, finish and code; the total; then the invocations of ``log`` with their code,
    and a warning when the stages came from different code."""
    lines = ["| stage | seconds | minutes | invocations | finished | code |", "|---|---|---|---|---|---|"]
    total = copied = 0.0
    shown = lambda codes: ", ".join(c or "not a checkout" for c in codes) if codes else "not recorded"  # noqa: E731
    for stage, rec in records:
        total += rec["seconds"]
        if rec.get("copied_from"):
            copied += rec["seconds"]
            stage += f" (copied from `{rec['copied_from']}`)"
        lines.append(f"| {stage} | {rec['seconds']:.0f} | {rec['seconds'] / 60:.1f} | {rec['invocations']} | "
                     f"{rec['finished']} | {shown(rec.get('code'))} |")
    lines.append(f"| **total** | {total:.0f} | {total / 60:.1f} | | | |")
    if any(rec.get("copied_from") for _, rec in records):
        lines.append(f"| **computed here** (the total without the copied stages) | {total - copied:.0f} | "
                     f"{(total - copied) / 60:.1f} | | | |")
    lines += ["", f"Invocations of the command (`{log}`):", "", "| started | stages | code |", "|---|---|---|"]
    lines += [f"| {i['started']} | {', '.join(i['stages'])} | {i.get('code') or 'not recorded'} |" for i in invocations]
    versions = {shown(rec.get("code")) for _, rec in records}
    if len(versions) > 1:
        lines += ["", f"**Note**: the stages ran on different code ({'; '.join(sorted(versions))}). A finished stage "
                  "is kept while its config identity holds, whatever the code: check that the commits in between "
                  "change nothing a kept stage computes."]
    return lines + [""]
