"""The engine of staged experiments (``ssah-jax reproduce``, ``ssah-jax signals``, and any third).

A pipeline is a sequence of stages in one workdir. An experiment defines only what is its own:
its stages in order, which stages each needs finished first, the directories each records
(``runs``: one, or one per sub-run), what each recorded directory is given and the body that
runs it (a :class:`Stage`), the checks of its config, what ``ssah-jax plan`` compiles, and its
report. This module does the rest, the same way for every pipeline: the experiment's
``validate``, ``plan_configs`` and ``run`` (``functools.partial`` of :func:`validate`,
:func:`plan` and :func:`run` with the pipeline's class), ``config.stages`` selection, the
refusal of a finished stage whose identity the config changed (naming the keys), the check of
prerequisites, the workdir and its invocation log, the copy of stages finished with the same
identity in another workdir (``config.reuse``), resume and timing
(:func:`ssah_jax.stages.run_stage`), and the report with the stage table and ``numbers.json``.

The config keys read here are the ones every pipeline has: ``stages``, ``reuse``,
``report_dir`` and ``jax_cache``. The rest of a config is the experiment's, seen here only as
the values a stage is given (its identity) and, for the refusal's explanation, as the whole.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ml_collections import ConfigDict

from ssah_jax import hosts, runs, stages

REPORT = "report"  # the last stage of every pipeline: rendered from the stages' files on every run


@dataclasses.dataclass(frozen=True)
class Stage:
    """One recorded stage directory: ``body(given, directory)`` runs it and sees nothing of the
    pipeline's config but ``given``; ``excluded``: the keys of ``given`` that only affect speed or
    logging and ``added``: keys added to it later at their old values (both out of its identity,
    as the ``EXCLUDED`` and ``ADDED`` of the experiment whose run it is); ``reads``: the recorded
    stages whose results it reads (their identities enter its own)."""

    given: ConfigDict
    body: Callable[[ConfigDict, Path], Any]
    excluded: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    added: runs.Added = dataclasses.field(default_factory=dict)


class Pipeline(Protocol):
    """What a staged experiment defines, built for one config and workdir (see the module doc)."""

    order: tuple[str, ...]  # its stages, in the order they run; REPORT last
    requires: Mapping[str, tuple[str, ...]]  # stage -> the stages it needs finished first
    added: runs.Added  # the config's keys added later, its sub-runs' included (runs.determining)
    sections: tuple[str, ...]  # the config's top-level sections added later (runs.prepare_workdir)

    def runs(self, stage: str) -> list[str]:
        """The directories (relative to the workdir) in which ``stage`` records its identity:
        ``[stage]``, or one per sub-run (``attacks/<attack>/<variant>/seed<k>``)."""
        ...

    def stage(self, recorded: str) -> Stage:
        """What the recorded directory ``recorded`` is given and how it runs."""
        ...

    def check(self) -> None:
        """Raises a :class:`ssah_jax.runs.ConfigError` naming the key of a config value this
        pipeline cannot run, its sub-runs' own checks included (before hours of work rather than
        after); ``config.dtype`` and ``config.stages`` are checked by the engine."""
        ...

    def plan(self) -> list[Any]:
        """What ``ssah-jax plan`` compiles and bills (:class:`ssah_jax.train.memory.PlanItem`
        values): the pipeline's trainings and decoding, built for the workdir ``<workdir>``."""
        ...

    def report(self, out: Path, report_dir: Path, invocations: list[dict[str, Any]]) -> Path:
        """Writes ``report_dir/REPORT.md`` from the stages' files in ``out`` (the engine has put
        ``config.json`` and ``numbers.json`` beside it); ``invocations``: the invocation log."""
        ...


Build = Callable[[ConfigDict, Path], Pipeline]  # an experiment's pipeline for (config, workdir)


def recorded(pipeline: Pipeline) -> list[str]:
    """Every directory that records a stage identity, in pipeline order (the report records none)."""
    return [r for s in pipeline.order if s != REPORT for r in pipeline.runs(s)]


def identities(pipeline: Pipeline, out: Path) -> dict[str, dict[str, Any]]:
    """Per recorded stage, in pipeline order: its identity (see :func:`ssah_jax.stages.identities`)."""
    plans: dict[str, Stage] = {}

    def plan(name: str) -> Stage:
        if name not in plans:
            plans[name] = pipeline.stage(name)
        return plans[name]

    def given(name: str) -> dict[str, Any]:  # what determines its results
        stage = plan(name)
        return runs.determining(stage.given, stage.excluded, stage.added)

    return stages.identities(recorded(pipeline), given, lambda name: plan(name).reads, out)


def done(pipeline: Pipeline, out: Path, stage: str) -> bool:
    """Whether ``stage`` finished in ``out``: each of its recorded directories did (a stage with
    sub-runs reopens when a sub-run is added)."""
    directories = pipeline.runs(stage)
    return bool(directories) and all(stages.stage_record(out / r) is not None for r in directories)


def selected(config: ConfigDict, order: tuple[str, ...]) -> list[str]:
    """``config.stages`` (``all``, or stage names; ``"a,b"`` in one string works too) in the
    pipeline order ``order``; anything else is a ConfigError naming ``config.stages``."""
    chosen = {s.strip() for entry in config.stages for s in entry.split(",") if s.strip()}
    chosen = set(order) if chosen == {"all"} else chosen
    runs.check(config, "stages", lambda v: chosen and chosen <= set(order),
               f"must be 'all' or a non-empty subset of {order}")
    return [s for s in order if s in chosen]


def check_finished(config: ConfigDict, out: Path, found: dict[str, dict[str, Any]],
                   identities_of: Callable[[ConfigDict], dict[str, dict[str, Any]]], added: runs.Added) -> None:
    """Refuses a workdir holding a finished stage (scheduled or not) of another identity than
    ``config`` gives it (``found``), naming the config keys whose old values would give it back,
    e.g. ``config.attack.learning_rate: 5e-05 -> 0.001 (stages attacks/aoa/none, ...)``.
    ``identities_of(config)``: the stage identities of a config (to try each changed key's old
    value); ``added``: the config's keys added later (the pipeline's ``added``)."""
    changed: dict[str, list[str]] = {}  # a difference -> the stages it explains
    for stage, now in found.items():
        record = stages.stage_record(out / stage)
        if record is None or record.get("identity") == now["identity"]:
            continue
        for difference in _explain(config, stage, record, now, identities_of, added):
            changed.setdefault(difference, []).append(stage)
    if changed:
        def names(directories: list[str]) -> str:
            return ", ".join(directories[:4]) + (f" and {len(directories) - 4} more" if len(directories) > 4 else "")

        raise runs.ConfigError(
            f"{out} holds stages finished with other config values: "
            + "; ".join(f"{d} (stages {names(directories)})" for d, directories in changed.items())
            + ". Restore them, delete those stages' directories to redo them, rerun with --overwrite to start "
            "afresh, or use a new --workdir")


def _explain(config: ConfigDict, stage: str, record: dict, now: dict,
             identities_of: Callable[[ConfigDict], dict[str, dict[str, Any]]], added: runs.Added) -> list[str]:
    """Why ``stage``'s identity changed since ``record``: each changed config key that reaches
    the stage (its old value changes the stage's identity; ``config.k: old -> new``); else how
    what it is given, or the identity of a stage it reads, changed."""
    old, new = record.get("config", {}), runs.determining(config, added=added)
    reasons = []
    for key in sorted(k for k in old.keys() & new.keys() if old[k] != new[k]):
        try:
            reverted = copy.deepcopy(config)
            runs.set_values(reverted, {key: old[key]})
            again = identities_of(reverted)[stage]["identity"]
        except (KeyError, TypeError, ValueError):
            continue
        if again != now["identity"]:  # the key reaches this stage
            reasons.append(runs.differences({key: old[key]}, {key: new[key]}))
    if reasons:
        return reasons
    if record.get("given") != now["given"]:
        return [f"{stage} is given {runs.differences(record.get('given', {}), now['given'], prefix='')}"]
    return [f"{stage} reads stages redone with other values: "
            + ", ".join(s for s in now["inputs"] if record.get("inputs", {}).get(s) != now["inputs"][s])]


def open_workdir(config: ConfigDict, workdir: str | Path, todo: list[str], requires: Mapping[str, tuple[str, ...]],
                 finished: Callable[[str], bool], *, sections: tuple[str, ...] = (), overwrite: bool) -> Path:
    """Starts an invocation in ``workdir``: refuses a stage of ``todo`` whose prerequisites
    (``requires``) are neither scheduled nor ``finished``, prepares the workdir, points jax's
    persistent compilation cache into it (``config.jax_cache``) and appends the invocation
    (argv, stages, the code's commit, machine) to ``invocations.jsonl``; ``sections``: the
    config's top-level sections added later (a workdir from before them is resumed)."""
    for stage in todo:
        missing = [r for r in requires.get(stage, ()) if r not in todo and (overwrite or not finished(r))]
        if missing:
            raise runs.ConfigError(f"config.stages: stage {stage!r} needs {missing} finished first "
                                   f"(in {workdir}) or in config.stages")
    out = runs.prepare_workdir(workdir, config, sections=sections, overwrite=overwrite, staged=True)
    if config.jax_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    if hosts.is_main():
        with open(out / INVOCATIONS, "a") as f:
            f.write(json.dumps({"argv": sys.argv, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                "stages": todo, "code": runs.code_version(), **runs.machine()}) + "\n")
    return out


INVOCATIONS = "invocations.jsonl"


def _reusable(config: ConfigDict, out: Path, found: dict[str, dict[str, Any]]) -> dict[str, Path] | None:
    """The stages finished in ``config.reuse`` (another pipeline's workdir) by identity, and a
    line saying how many of the stages still to run they hold; None without ``config.reuse``."""
    if not config.reuse:
        return None
    elsewhere = stages.finished_elsewhere(config.reuse)
    if not Path(config.reuse).is_dir():
        print(f"config.reuse: {config.reuse} does not exist (relative to {Path.cwd()}): nothing to copy")
    else:
        todo = [r for r in found if stages.stage_record(out / r) is None]
        print(f"config.reuse: of the stages still to run, {sum(found[r]['identity'] in elsewhere for r in todo)} "
              f"are finished in {config.reuse} with the same identity and will be copied")
    return elsewhere


def validate(build: Build, config: ConfigDict) -> None:
    """Checks ``config`` for the pipeline ``build``: its dtype, its stage selection, then the
    pipeline's own checks (:meth:`Pipeline.check`); a bad value is a ConfigError naming its key."""
    runs.dtype(config)
    pipeline = build(config, Path("."))
    selected(config, pipeline.order)
    pipeline.check()


def plan(build: Build, config: ConfigDict) -> list[Any]:
    """What ``ssah-jax plan`` compiles for the pipeline ``build`` (:meth:`Pipeline.plan`)."""
    return build(config, Path("<workdir>")).plan()


def run(build: Build, config: ConfigDict, workdir: str | Path, *, overwrite: bool = False) -> Path:
    """Validates ``config`` (:func:`validate`), runs the stages of ``config.stages`` of the
    pipeline ``build(config, workdir)``, then its report if scheduled; returns the report's path
    (or the workdir without a report)."""
    validate(build, config)
    out = Path(workdir)
    pipeline = build(config, out)
    todo = selected(config, pipeline.order)
    found = identities(pipeline, out)
    if not overwrite:  # every finished stage, scheduled or not
        check_finished(config, out, found, lambda c: identities(build(c, out), out), pipeline.added)
    out = open_workdir(config, out, todo, pipeline.requires, lambda s: done(pipeline, Path(workdir), s),
                       sections=pipeline.sections, overwrite=overwrite)
    elsewhere = _reusable(config, out, found)
    # the whole config too: a later refusal names the keys whose values then give the identity back
    whole = runs.determining(config, added=pipeline.added)
    for stage in todo:
        for name in (pipeline.runs(stage) if stage != REPORT else []):
            plan = pipeline.stage(name)
            stages.run_stage(out / name, lambda d, plan=plan: plan.body(plan.given, d),
                             {**found[name], "config": whole}, elsewhere)
    if REPORT not in todo:
        print(f"Stages done: {todo} in {out}; add '{REPORT}' to config.stages for the report")
        return out
    report_dir = Path(config.report_dir) if config.report_dir else out / REPORT
    report = report_dir / "REPORT.md"
    if hosts.is_main():  # the report only reads the stages' files
        report_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "config.json", report_dir / "config.json")
        stages.write_numbers(out, report_dir / stages.NUMBERS)
        report = pipeline.report(out, report_dir, runs.read_jsonl(out / INVOCATIONS))
    print(f"Report: {report}")
    return report
