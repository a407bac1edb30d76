"""``ssah-jax sweep``: a grid of experiment runs, run here, on a Ray cluster or elsewhere,
resumed after a kill, and put into one table.

A sweep config (``configs/sweeps/<name>.py``) names an experiment and its base config
(``base``: ``configs/<experiment>.py:<preset>``), fixed overrides (``set``, nested like the base
config), and the points: an explicit list (``points``: each a tuple of ``"key=value"`` strings,
the ``--config.key=value`` syntax, optionally led by a label) times the product of ``grid``
(nested like the base config, each leaf a tuple of values) times ``seeds``. Each point is the
ordinary experiment command, run in ``<workdir>/runs/<point name>/`` (same validation, run
identity and resume as by hand), its output in ``<workdir>/logs/<point name>.log``.

Executors: ``local`` (``parallel`` points at a time as subprocesses, the GPUs split between
them), ``ray`` (each point a Ray task with ``ray.num_cpus`` / ``num_gpus`` / ``tpus``; joins
``ray.address`` or starts a local cluster) and ``print`` (one shell command per point still to
run, for SLURM arrays, xpk or the TPU launcher; nothing runs).

A point is finished when its command ran to its end (``ssah-jax`` writes ``finished.json``
in its workdir last), however it was run; a re-run of the sweep skips finished points and runs
the others (each resumes as its experiment does). Each attempt is appended to
``<workdir>/points.jsonl``; a crash is retried ``retries`` times at once, a refused input
(ssah-jax's status 2) is not. At the end (and for ``print``,
of what has finished) ``sweep.csv`` has one row per point (its swept values, status, wall
time, error, the ``metrics``), ``report.md`` the table with mean and spread over seeds, a plot
per swept key, and the choices of the ``select`` rules (the SSAH fraction rule,
:func:`ssah_jax.attribution.sweep_fraction`).

The package, a module a job: ``spec`` (the sweep config, its checks, its points and their commands),
``executors`` (a point's process, the local and Ray executors, the workdir's lock), ``results``
(each point's record and metrics, the table, the ``select`` rules) and ``report`` (``sweep.csv``,
the plots, ``report.md``); here the command itself, :func:`run`, and its loop over the points.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.sweeps.executors import (
    PARENT_ENV,
    REFUSED,
    LocalExecutor,
    RayExecutor,
    _locked,
    device_groups,
    error_line,
    follow_parent,
    run_point,
)
from ssah_jax.sweeps.report import copy_report, plot_key, render_report, write_results
from ssah_jax.sweeps.results import RECORDS, _append, groups, metric, point_record, records, select, swept_keys, table
from ssah_jax.sweeps.spec import (
    DETERMINING,
    EXECUTORS,
    ROOT,
    Point,
    arguments,
    base_spec,
    command_value,
    expand,
    fixed_overrides,
    point_name,
    sweep_config,
    validate,
)

__all__ = [
    "DETERMINING",
    "EXECUTORS",
    "PARENT_ENV",
    "RECORDS",
    "REFUSED",
    "ROOT",
    "LocalExecutor",
    "Point",
    "RayExecutor",
    "arguments",
    "base_spec",
    "command_value",
    "copy_report",
    "device_groups",
    "error_line",
    "execute",
    "expand",
    "fixed_overrides",
    "follow_parent",
    "groups",
    "metric",
    "plot_key",
    "point_name",
    "point_record",
    "records",
    "render_report",
    "run",
    "run_point",
    "select",
    "sweep_config",
    "swept_keys",
    "table",
    "validate",
    "write_results",
]


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False, argv: Sequence[str] = ()) -> Path:
    """Runs the points of a sweep config that have not finished, then writes the table and the
    report; returns the report's path. With the ``print`` executor, stdout gets the commands
    alone (everything else goes to stderr)."""
    validate(config)
    commands = sys.stdout
    with contextlib.ExitStack() as stack:
        if config.executor == "print":
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        points = expand(config)
        excluded = tuple(k for k in config.keys() if k not in DETERMINING)
        out = runs.prepare_workdir(workdir, config, excluded, overwrite=overwrite).resolve()
        stack.enter_context(_locked(out))
        argv_of = {p: arguments(config, p, out) for p in points}
        todo = [p for p in points if point_record(out, p, argv_of[p]) is None]
        kept = len(points) - len(todo)
        print(f"Sweep of {len(points)} points ({config.experiment}, {config.base}): {kept} finished earlier, "
              f"{len(todo)} to run; their workdirs: {out / 'runs'}, logs: {out / 'logs'}")
        if config.executor == "print":
            for p in todo:
                print(shlex.join(["ssah-jax", *argv_of[p]]), file=commands)
            print("When they have run (each writes finished.json in its workdir), the same command tabulates them."
                  if todo else "Nothing to run.")
        elif todo:
            execute(config, out, todo, argv_of, kept, len(points))
        report = write_results(config, out, points, argv)
        if config.report_dir:
            copy_report(out, Path(config.report_dir))
            print(f"Report copied to {Path(config.report_dir) / report.name}")
    return report


def execute(config: ConfigDict, out: Path, todo: list[Point], argv_of: dict[Point, list[str]],
             kept: int, total: int) -> None:
    """Runs the points ``todo`` on the config's executor (``local`` or ``ray``), each attempt
    appended to ``points.jsonl``: a crash is run again at once, ``config.retries`` times; a refused
    input (``REFUSED``) is not. ``kept`` of the ``total`` points finished earlier."""
    cwd = os.getcwd()
    executor = (LocalExecutor(config.parallel, cwd) if config.executor == "local"
                else RayExecutor(config.ray, cwd))
    print(f"Running on {executor.describe()}")
    queue, attempts = collections.deque(todo), collections.Counter()
    ok = failed = 0
    try:
        while queue or executor.running:
            while queue and executor.has_room():
                point = queue.popleft()
                attempts[point] += 1
                executor.submit(point, argv_of[point], out / "logs" / f"{point.name}.log")
            for point, result in executor.wait():
                status = "ok" if result["exit"] == 0 else "failed"
                retry = status == "failed" and result["exit"] != REFUSED and attempts[point] <= config.retries
                _append(out, {"name": point.name, "status": status, **result, "attempt": attempts[point],
                              "command": argv_of[point],
                              "finished": datetime.datetime.now().isoformat(timespec="seconds")})
                if retry:
                    queue.append(point)
                else:
                    ok, failed = ok + (status == "ok"), failed + (status == "failed")
                what = "ok" if status == "ok" else f"FAILED (exit {result['exit']}: {result['error']})"
                print(f"[{kept + ok}/{total} done, {len(executor.running)} running, {failed} failed] {point.name}: "
                      f"{what} in {result['seconds']:.0f} s" + ("; trying again" if retry else ""), flush=True)
    finally:
        executor.close()

