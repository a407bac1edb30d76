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
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

import experiments
from ssah_jax import runs
from ssah_jax.attribution import sweep_fraction

EXECUTORS = ("local", "ray", "print")
DETERMINING = ("experiment", "base", "set")  # a workdir's sweep; the points' own runs check the rest
RECORDS = "points.jsonl"
REFUSED = 2  # ssah-jax's exit status for a problem of the run's input: running it again cannot help
ROOT = Path(__file__).resolve().parents[1]  # the checkout, where a base config is also looked for
_LIMIT = re.compile(r"^([+-]|x)(\d+(?:\.\d*)?|\.\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+:-]+")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: ``overrides`` are ``(key, command-line value)`` pairs."""

    name: str
    label: str
    overrides: tuple[tuple[str, str], ...]

    def values(self) -> dict[str, str]:
        return dict(self.overrides)


def sweep_config(experiment: str, base: str) -> ConfigDict:
    """A sweep config of ``experiment`` from ``base`` (``configs/<experiment>.py:<preset>``) with
    every key at its default; a ``configs/sweeps/<name>.py`` fills in the points (unlocked)."""
    c = ConfigDict()
    c.experiment = experiment
    c.base = base  # the experiment's config file and preset, relative to the working directory or the checkout
    # fixed overrides of every point, nested like the base config (e.g. set.model); "{workdir}" in a
    # value is the sweep's workdir (e.g. a cache the points share)
    c.set = ConfigDict()
    c.points = ()  # ("label", "key=value", ...) each; empty: the base alone
    c.grid = ConfigDict()  # nested like the base config, each leaf a tuple of values; the product
    c.seeds = ()  # each point once per seed (config key `seed`); empty: the base's seed
    # column -> "[file:]dotted.path" in a point's workdir (file: metrics.json; "*" is the one key there)
    c.metrics = ConfigDict()
    # rule name -> key (the swept fraction), baseline (a point's label), limits (metric -> "+d" may
    # rise by d, "-d" may fall by d, "xf" may grow by the factor f): the paper's fraction rule
    c.select = ConfigDict()
    c.executor = "local"  # local | ray | print
    c.parallel = 1  # local: points at a time (the GPUs dealt out between them)
    c.retries = 1  # a point that crashed (not one whose input was refused) is run again at once
    # ray: address "" starts a local cluster (of cluster_cpus CPUs, 0: all), "auto" or host:port joins
    # one; each point a task with num_cpus, num_gpus and tpus (Ray's TPU resource: the chips of a host)
    c.ray = ConfigDict(dict(address="", cluster_cpus=0, num_cpus=1.0, num_gpus=0.0, tpus=0))
    c.report_dir = ""  # also copy report.md, sweep.csv, selected.json and the plots here
    return c


# ---------------------------------------------------------------------------------------------
# The points


_PLAIN = re.compile(r"^[A-Za-z0-9_./:+-]+$")


def command_value(value: Any) -> str:
    """``value`` as ``--config.key=<value>`` gives it: a tuple of plain strings comma-separated
    (``a,b``), any other tuple as a Python literal."""
    if isinstance(value, tuple | list):
        if value and all(isinstance(v, str) and _PLAIN.match(v) for v in value):
            return ",".join(value)
        return repr(tuple(value))
    return str(value)


def _readable(value: str) -> str:
    """A command-line value in a point's name: a tuple's elements joined by '+'."""
    if value.startswith("(") and value.endswith(")"):
        value = value[1:-1]
    return "+".join(part.strip().strip("'\"") for part in value.split(",") if part.strip())


def point_name(label: str, overrides: Sequence[tuple[str, str]]) -> str:
    """A readable directory name: the label, then ``key=value`` of each override (long names
    keep a hash of the whole)."""
    text = ",".join(([label] if label else []) + [f"{k}={_readable(v)}" for k, v in overrides]) or "base"
    name = _UNSAFE.sub("-", text).strip("-.") or "point"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return name


def base_spec(config: ConfigDict) -> tuple[str, Path, str]:
    """(``base`` as the points' commands give it, its file, its preset): a relative path is
    looked up in the working directory, then in the checkout."""
    path, _, preset = config.base.partition(":")
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            shown = path if candidate == Path(path) else str(candidate)
            return (f"{shown}:{preset}" if preset else shown), candidate, preset
    raise runs.ConfigError(f"config.base={config.base!r}: {path}: no such file (looked in {Path.cwd()} and {ROOT})")


def _leaves(section: ConfigDict) -> dict[str, Any]:
    """The dotted keys of ``set`` / ``grid`` and their values (an empty section has none)."""
    return {k: v for k, v in runs.leaves(section).items() if v != {}}


def fixed_overrides(config: ConfigDict) -> list[tuple[str, str]]:
    return [(k, command_value(v)) for k, v in _leaves(config.set).items()]


def expand(config: ConfigDict, base: ConfigDict | None = None) -> list[Point]:
    """The points of a sweep config, in order: each listed point (or the base alone) times the
    grid's product times the seeds. ``base`` (the experiment's config) checks every key."""
    listed: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for i, entry in enumerate(config.points):
        entry = (entry,) if isinstance(entry, str) else tuple(entry)
        label = entry[0] if entry and "=" not in entry[0] else ""
        pairs = []
        for item in entry[1 if label else 0:]:
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise runs.ConfigError(f"config.points[{i}]: {item!r} is not key=value")
            pairs.append((key.strip(), value))
        listed.append((label, tuple(pairs)))
    axes = []
    for key, values in _leaves(config.grid).items():
        if not isinstance(values, tuple | list) or not values:
            raise runs.ConfigError(f"config.grid.{key}={values!r}: must be a non-empty tuple of values")
        axes.append([(key, command_value(v)) for v in values])
    seeds = [[("seed", str(s))] for s in config.seeds] or [[]]
    if base is not None:
        known = runs.leaves(base)
        where = ([(f"config.set.{k}", k) for k in _leaves(config.set)]
                 + [(f"config.points[{i}]", k) for i, (_, pairs) in enumerate(listed) for k, _ in pairs]
                 + [(f"config.grid.{k}", k) for k in _leaves(config.grid)]
                 + ([("config.seeds", "seed")] if config.seeds else []))
        for location, key in where:
            if key not in known:
                raise runs.ConfigError(f"{location}: {config.base} has no config key {key!r}")
    points, names = [], set()
    for (label, pairs), combo, seed in itertools.product(listed or [("", ())], itertools.product(*axes), seeds):
        overrides = pairs + tuple(combo) + tuple(seed)
        name = point_name(label, overrides[len(pairs):] if label else overrides)
        if name in names:
            raise runs.ConfigError(f"config.points / config.grid: two points are both {name!r}")
        names.add(name)
        points.append(Point(name, label, overrides))
    return points


def arguments(config: ConfigDict, point: Point, workdir: Path) -> list[str]:
    """The point's ``ssah-jax`` arguments (after the program)."""
    spec = base_spec(config)[0]
    overrides = [(k, v.replace("{workdir}", str(workdir))) for k, v in fixed_overrides(config) + list(point.overrides)]
    return ([config.experiment, f"--config={spec}"] + [f"--config.{k}={v}" for k, v in overrides]
            + [f"--workdir={workdir / 'runs' / point.name}"])


# ---------------------------------------------------------------------------------------------
# Config checks


def validate(config: ConfigDict) -> ConfigDict:
    """Checks a sweep config; returns the experiment's base config."""
    missing = [k for k in sweep_config("", "").keys() if k not in config]
    if missing:
        raise runs.ConfigError(f"not a sweep config (it lacks {', '.join('config.' + k for k in missing[:4])}); "
                               "use one of configs/sweeps/")
    runs.check(config, "experiment", lambda v: v in experiments.names(), f"must be one of {experiments.names()}")
    runs.check(config, "executor", lambda v: v in EXECUTORS, f"must be one of {EXECUTORS}")
    runs.check(config, "parallel", lambda v: v >= 1, "must be >= 1")
    runs.check(config, "retries", lambda v: v >= 0, "must be >= 0")
    runs.check(config, "seeds", lambda v: all(isinstance(s, int) for s in v), "must be a tuple of integers")
    for key in ("num_cpus", "num_gpus"):
        runs.check(config, f"ray.{key}", lambda v: v >= 0, "must be >= 0")
    runs.check(config, "ray.tpus", lambda v: v >= 0, "must be >= 0")
    _, path, preset = base_spec(config)
    try:
        base = runs.config_from_file(path, preset)
    except ValueError as e:  # an unknown preset
        raise runs.ConfigError(f"config.base={config.base!r}: {e}") from None
    except SyntaxError as e:
        raise runs.ConfigError(f"config.base={config.base!r}: {e.filename}:{e.lineno}: {e.msg}") from None
    own = ROOT / "configs" / f"{config.experiment}.py"
    if own.is_file() and set(runs.config_from_file(own, None).keys()) != set(base.keys()):
        raise runs.ConfigError(f"config.base={config.base!r}: not a {config.experiment} config (its keys are not "
                               f"those of configs/{config.experiment}.py)")
    for label, spec in config.metrics.items():
        runs.check(config, f"metrics.{label}", lambda v: isinstance(v, str) and bool(v.rpartition(":")[2]),
                   'must be "[file:]dotted.path" into a point\'s JSON (file: metrics.json by default)')
    points = expand(config, base)
    labels = {p.label for p in points}
    for name, rule in config.select.items():
        for key in ("key", "baseline", "limits"):
            if key not in rule:
                raise runs.ConfigError(f"config.select.{name}: needs key, baseline and limits")
        runs.check(config, f"select.{name}.baseline", lambda v: v in labels, "must be the label of a listed point")
        values = [p.values()[rule.key] for p in points if rule.key in p.values()]
        runs.check(config, f"select.{name}.key", lambda v: bool(values) and all(_number(x) is not None for x in values),
                   "must be a key the points set to numbers")
        for metric, limit in rule.limits.items():
            runs.check(config, f"select.{name}.limits.{metric}", lambda v: metric in config.metrics and
                       bool(_LIMIT.match(str(v))), 'must be "+d" (may rise by d), "-d" (may fall by d) or "xf" '
                       "(may grow by the factor f) for a metric of config.metrics")
    return base


# ---------------------------------------------------------------------------------------------
# Running a point


# a point's process ends when the process that started it does (the cli checks it before importing us)
PARENT_ENV = "SSAH_SWEEP_PARENT"


def follow_parent() -> None:
    """In a point's process (``ssah-jax`` started by a sweep or its Ray worker): SIGTERM when that
    process dies, so a killed sweep leaves no run behind that a re-run would start again (Linux;
    elsewhere a no-op). Set here rather than between fork and exec: JAX's threads are running."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def error_line(log: Path) -> str:
    """What went wrong, from the end of a point's log: ssah-jax's one-line error, else the last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    ours = [line for line in lines if line.startswith("ssah-jax: ")]
    return (ours or lines or ["(empty log)"])[-1][:500]


def _start(args: list[str], cwd: str, log: Path, env: dict[str, str] | None) -> subprocess.Popen:
    """``ssah-jax <args>`` with this machine's Python, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')}: {shlex.join(args)}\n".encode())
        return subprocess.Popen([sys.executable, "-m", "ssah_jax.cli", *args], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())})


def _result(code: int | None, start: float, log: Path) -> dict[str, Any]:
    return {"exit": code, "seconds": round(time.time() - start, 1), "error": "" if code == 0 else error_line(log)}


def run_point(argv: list[str], cwd: str, log: str) -> dict[str, Any]:
    """Runs one point's ``ssah-jax`` arguments to their end: ``{"exit", "seconds", "error"}``
    (a Ray task: on the worker, with the worker's Python)."""
    start = time.time()
    return _result(_start(argv, cwd, Path(log), None).wait(), start, Path(log))


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def device_groups(parallel: int) -> list[dict[str, str] | None]:
    """The environment of each of ``parallel`` local slots: the GPUs dealt out evenly; on CPU
    every slot sees the same (virtual) devices; a TPU host's chips belong to one process."""
    if parallel == 1:
        return [None]
    gpus = _gpus()
    if gpus:
        if len(gpus) < parallel:
            raise runs.ConfigError(f"config.parallel={parallel}: this machine has {len(gpus)} GPUs")
        per = len(gpus) // parallel
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(parallel)]
    if Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        raise runs.ConfigError(f"config.parallel={parallel}: a TPU host's chips serve one process; use parallel=1, "
                               "or config.executor=ray with one TPU host per point")
    return [None] * parallel


class LocalExecutor:
    """Points as subprocesses of this process, ``parallel`` at a time."""

    def __init__(self, parallel: int, cwd: str):
        self.free, self.cwd, self.running = device_groups(parallel), cwd, {}

    def describe(self) -> str:
        return f"the local executor ({len(self.free)} at a time)"

    def has_room(self) -> bool:
        return bool(self.free)

    def submit(self, point: Point, argv: list[str], log: Path) -> None:
        env = self.free.pop(0)
        self.running[point] = (_start(argv, self.cwd, log, env), env, time.time(), log)

    def wait(self) -> list[tuple[Point, dict[str, Any]]]:
        while True:
            done = []
            for point, (proc, env, start, log) in list(self.running.items()):
                code = proc.poll()
                if code is not None:
                    del self.running[point]
                    self.free.append(env)
                    done.append((point, _result(code, start, log)))
            if done:
                return done
            time.sleep(0.5)

    def close(self) -> None:
        for proc, *_ in self.running.values():
            proc.terminate()


class RayExecutor:
    """Points as Ray tasks (``run_point`` on a worker with the resources of ``config.ray``)."""

    def __init__(self, settings: ConfigDict, cwd: str):
        try:
            import ray
        except ImportError:
            raise runs.ConfigError("config.executor=ray: Ray is not installed (pip install -e '.[ray]')") from None
        self.ray, self.cwd, self.running = ray, cwd, {}
        if not ray.is_initialized():
            local = not settings.address
            try:  # "local": a new cluster on this machine even where RAY_ADDRESS names one
                ray.init(address=settings.address or "local",
                         num_cpus=(settings.cluster_cpus or None) if local else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster at the address
                raise runs.ConfigError(f"config.ray.address={settings.address!r}: {' '.join(str(e).split())}") from None
        wanted = {"CPU": settings.num_cpus, "GPU": settings.num_gpus, "TPU": settings.tpus}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
            ray.shutdown()
            raise runs.ConfigError(f"config.ray: no node of the cluster has num_cpus={settings.num_cpus}, num_gpus="
                                   f"{settings.num_gpus}, tpus={settings.tpus} (its nodes: "
                                   f"{[{k: n.get(k, 0) for k in wanted} for n in nodes]})")
        if not settings.num_gpus and any(node.get("GPU", 0) for node in nodes):
            print("Note: the cluster has GPUs but config.ray.num_gpus=0: the points run without one")
        resources = {"TPU": settings.tpus} if settings.tpus else None
        self.task = ray.remote(run_point).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
                                                  resources=resources, max_retries=0)
        self.address = settings.address or "a local cluster"

    def describe(self) -> str:
        return f"Ray ({self.address}: {self.ray.cluster_resources().get('CPU', 0):g} CPUs)"

    def has_room(self) -> bool:
        return True  # Ray queues a task until its resources are free

    def submit(self, point: Point, argv: list[str], log: Path) -> None:
        self.running[self.task.remote(argv, self.cwd, str(log))] = (point, time.time(), log)

    def wait(self) -> list[tuple[Point, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        point, start, log = self.running.pop(ready[0])
        try:
            return [(point, self.ray.get(ready[0]))]
        except self.ray.exceptions.RayError as e:  # the worker died: a crash, retried like one
            message = " ".join(str(e).split())[:500]
            return [(point, {"exit": None, "seconds": round(time.time() - start, 1), "error": message})]

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The sweep


# flags that change how a command runs, not what it computes
_RUN_FLAGS = ("--overwrite", "--traceback", "--multihost", "--coordinator_address", "--num_processes", "--process_id")


def _what(args: Sequence[str]) -> list[str]:
    return [a for a in args if a.split("=", 1)[0] not in _RUN_FLAGS]


def point_record(out: Path, point: Point, args: Sequence[str]) -> dict[str, Any] | None:
    """The ``finished.json`` of the point's workdir (``ssah-jax`` writes it last, however it was
    run) when it records this point's command ``args``; None otherwise (a point whose overrides
    changed runs again, and its workdir refuses or resumes it)."""
    record = runs.read_finished(out / "runs" / point.name)
    return record if record is not None and _what(record["argv"][1:]) == _what(args) else None


def records(workdir: Path) -> dict[str, dict[str, Any]]:
    """The last record of each point in ``points.jsonl``."""
    return {r["name"]: r for r in runs.read_jsonl(workdir / RECORDS)}


def _append(workdir: Path, record: dict[str, Any]) -> None:
    with open(workdir / RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")


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


@contextlib.contextmanager
def _locked(out: Path):
    """One sweep command at a time in a workdir (a second would start the same points)."""
    with open(out / "sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise runs.WorkdirError(f"{out}: another ssah-jax sweep is running in it") from None
        yield


def execute(config: ConfigDict, out: Path, todo: list[Point], argv_of: dict[Point, list[str]],
             kept: int, total: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# Results


def metric(out: Path, point: Point, spec: str) -> float | None:
    """A point's value of a metric spec ``[file:]dotted.path`` (None when it is not there)."""
    file, _, path = spec.rpartition(":")
    try:
        value: Any = json.loads((out / "runs" / point.name / (file or "metrics.json")).read_text())
    except (OSError, ValueError):
        return None
    for part in path.split("."):
        if isinstance(value, dict) and part == "*" and len(value) == 1:  # the one key there is
            part = next(iter(value))
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def table(config: ConfigDict, out: Path, points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: its label, swept values, seed, status, wall time, error, metrics."""
    done = records(out)
    rows = []
    for p in points:
        r = done.get(p.name, {})
        row: dict[str, Any] = {"point": p.name, "label": p.label, **p.values()}
        record = point_record(out, p, arguments(config, p, out))
        if record is not None:
            row.update(status="ok", seconds=record["seconds"], error="", code=record.get("code"))
        else:
            failed = r.get("status") == "failed"  # (an "ok" of other overrides is stale: pending)
            row.update(status="failed" if failed else "pending", seconds=r.get("seconds") if failed else None,
                       error=r.get("error", "") if failed else "")
        for label, spec in config.metrics.items():
            row[label] = metric(out, p, spec) if row["status"] == "ok" else None
        rows.append(row)
    return rows


def swept_keys(points: list[Point]) -> list[str]:
    keys: list[str] = []
    for p in points:
        keys += [k for k, _ in p.overrides if k not in keys]
    return keys


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def groups(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by everything but the seed, in order."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["label"], *(row.get(k, "") for k in keys if k != "seed")), []).append(row)
    return out


def select(config: ConfigDict, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The choices of the ``select`` rules: per rule, the largest value of its key before the first
    one whose metrics moved past a limit against the baseline point (mean over seeds)."""

    def mean(of: list[dict[str, Any]], label: str) -> float | None:
        values = [r[label] for r in of if r["status"] == "ok" and r[label] is not None]
        return statistics.fmean(values) if values else None

    chosen = {}
    for name, rule in config.select.items():
        base = {m: mean([r for r in rows if r["label"] == rule.baseline], m) for m in rule.limits}
        by_value: dict[float, list] = collections.defaultdict(list)
        for r in rows:
            if r.get(rule.key) not in (None, "") and r["label"] != rule.baseline:
                by_value[float(r[rule.key])].append(r)
        changes: dict[float, dict[str, Any]] = {}
        for value, of in sorted(by_value.items()):
            entry: dict[str, Any] = {}
            for m, limit in rule.limits.items():
                sign, amount = _LIMIT.match(str(limit)).groups()
                now = mean(of, m)
                if now is None or base[m] is None:
                    entry[m] = None
                    continue
                if sign == "x":
                    change = now / base[m] - 1 if base[m] else (math.inf if now > 0 else 0.0)
                else:
                    change = (now - base[m]) if sign == "+" else (base[m] - now)
                allowed = float(amount) - (1 if sign == "x" else 0)
                ratio = change / allowed if allowed > 0 else (math.inf if change > 0 else 0.0)
                entry[m] = {"value": now, "change": change, "ratio": ratio}
            changes[value] = entry
        # the rule walks up the values: it stops at the first one not measured yet
        missing = next((v for v, e in changes.items() if any(x is None for x in e.values())), None)
        usable = [v for v in changes if missing is None or v < missing]
        value, tried = sweep_fraction(lambda v: max(x["ratio"] for x in changes[v].values()), usable, tolerance=1.0)
        if any(b is None for b in base.values()):
            value, note = None, f"the baseline point {rule.baseline!r} has not finished"
        elif missing is not None and len(tried) == len(usable):  # every usable value passed: undecided
            note = f"{rule.key}={missing:g} has not finished; the choice may grow"
        else:
            note = ""
        chosen[name] = {"key": rule.key, "value": value, "note": note,
                        "baseline": {m: base[m] for m in rule.limits}, "limits": dict(rule.limits),
                        "tried": [[v, d] for v, d in tried], "changes": {str(v): e for v, e in changes.items()}}
    return chosen


def write_results(config: ConfigDict, out: Path, points: list[Point], argv: Sequence[str]) -> Path:
    rows = table(config, out, points)
    keys = swept_keys(points)
    labelled = any(p.label for p in points)
    columns = (["point"] + (["label"] if labelled else []) + keys + ["status", "seconds", "error"]
               + list(config.metrics))
    with open(out / "sweep.csv.partial", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    (out / "sweep.csv.partial").replace(out / "sweep.csv")
    chosen = select(config, rows) if config.select else {}
    if chosen:
        (out / "selected.json").write_text(json.dumps(chosen, indent=2) + "\n")
    # a key with one value in every point is described once, not tabulated or plotted
    varying = [k for k in keys if len({r.get(k, "") for r in rows}) > 1]
    constant = [(k, rows[0][k]) for k in keys if k not in varying]
    plotted = (["label"] if len({r["label"] for r in rows}) > 1 else []) + [k for k in varying if k != "seed"]
    for stale in out.glob("plot_*.png"):  # of keys an earlier version of the sweep swept
        stale.unlink()
    plots = [plot_key(config, rows, key, out / f"plot_{_UNSAFE.sub('-', key)}.png") for key in plotted
             if len({r.get(key) for r in rows if r.get(key) not in (None, "")}) > 1]
    report = out / "report.md"
    report.write_text(render_report(config, out, rows, varying, constant, labelled, chosen,
                                    [p for p in plots if p], argv))
    counts = collections.Counter(r["status"] for r in rows)
    print(f"{counts['ok']} of {len(rows)} points ok, {counts['failed']} failed, {counts['pending']} pending. "
        f"Table: {out / 'sweep.csv'}\nReport: {report}")
    return report


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_key(config: ConfigDict, rows: list[dict[str, Any]], key: str, path: Path) -> Path | None:
    """Each metric against ``key``'s value: every finished point (dots) and the mean per value."""
    of = [r for r in rows if r.get(key) not in (None, "") and r["status"] == "ok"]
    labels = [m for m in config.metrics if any(r[m] is not None for r in of)]
    if not of or not labels:
        return None
    plt = runs.pyplot()
    values = list(dict.fromkeys(r[key] for r in of))
    numeric = all(_number(v) is not None for v in values)
    order = sorted(values, key=_number) if numeric else values
    spread = numeric and min(map(_number, values)) > 0 and max(map(_number, values)) >= 100 * min(map(_number, values))
    x = {v: (_number(v) if numeric else i) for i, v in enumerate(order)}
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for ax, m in zip(axes[0], labels, strict=True):
        ax.scatter([x[r[key]] for r in of if r[m] is not None], [r[m] for r in of if r[m] is not None],
                   s=14, alpha=0.6)
        means = [(x[v], _mean_sd([r[m] for r in of if r[key] == v and r[m] is not None])[0])
                 for v in order if any(r[key] == v and r[m] is not None for r in of)]
        # the mean per value: a line through numbers, a bar mark per category
        ax.plot([a for a, _ in means], [b for _, b in means], "-o" if numeric else "_", markersize=3 if numeric else 16)
        ax.set_xlabel(key)
        ax.set_title(m)
        if spread:  # values over decades (a learning rate, lambda)
            ax.set_xscale("log")
        ys = [r[m] for r in of if r[m] is not None]
        if min(ys) > 0 and max(ys) >= 100 * min(ys):  # e.g. the perplexity of a broken model
            ax.set_yscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), [_tick(of, key, v) for v in order], rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tick(rows: list[dict[str, Any]], key: str, value: str, width: int = 32) -> str:
    """A category's tick: the label of its points when they share one (a long value such as a
    dataset mixture reads better by name), else the value, cut to ``width`` characters."""
    labels = {r.get("label") for r in rows if r[key] == value}
    text = labels.pop() if len(labels) == 1 and None not in labels and "" not in labels else _readable(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_report(config: ConfigDict, out: Path, rows: list[dict[str, Any]], keys: list[str],
                  constant: list[tuple[str, str]], labelled: bool, chosen: dict[str, Any], plots: list[Path],
                  argv: Sequence[str]) -> str:
    counts = collections.Counter(r["status"] for r in rows)
    fixed = fixed_overrides(config) + constant
    lines = [f"# sweep: {config.experiment}", "",
             f"Command: `{shlex.join(['ssah-jax', *argv[1:]]) if argv else 'ssah-jax sweep'}`", "",
             f"Each point is `ssah-jax {config.experiment} --config={config.base}`"
             + (" with " + ", ".join(f"`{k}={v}`" for k, v in fixed) if fixed else "")
             + " and its own overrides, in `runs/<point>/` (its log: `logs/<point>.log`). "
             f"{counts['ok']} of {len(rows)} runs ok, {counts['failed']} failed, {counts['pending']} pending. "
             f"Metrics (`[file:]path` in each run): " + ", ".join(f"{k} = `{v}`" for k, v in config.metrics.items())
             + ". Every run: [`sweep.csv`](sweep.csv).", ""]
    shown = [k for k in keys if k != "seed"]
    seeded = "seed" in keys
    header = (["label"] if labelled else []) + shown + (["runs ok"] if seeded else ["status"]) + list(config.metrics)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, *values), of in groups(rows, keys).items():
        good = [r for r in of if r["status"] == "ok"]
        cells = ([label] if labelled else []) + [_readable(v) if v else "" for v in values]
        cells.append(f"{len(good)}/{len(of)}" if seeded else of[0]["status"])
        for m in config.metrics:
            got = [r[m] for r in good if r[m] is not None]
            if not got:
                cells.append("–")
                continue
            mean, sd = _mean_sd(got)
            cells.append(_fmt(mean) + (f" ± {_fmt(sd)}" if sd is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    if seeded:
        lines += ["", f"Mean ± standard deviation over the seeds {tuple(config.seeds)} that finished."]
    attempts = runs.read_jsonl(out / RECORDS)
    if attempts:
        minutes = sum(r["seconds"] for r in attempts) / 60
        lines += ["", f"Wall time: {minutes:.1f} min over the {len(attempts)} attempts this sweep's commands ran "
                  f"(`{RECORDS}`; a point resumed after a kill counts each attempt)."]
    codes = sorted({str(r.get("code")) for r in rows if r["status"] == "ok"})
    if len(codes) > 1:
        lines += ["", f"**Warning**: the finished points ran on different code: {', '.join(codes)} "
                  "(`finished.json` of each)."]
    elif codes:
        lines += ["", f"Code: {codes[0]}."]
    for name, c in chosen.items():
        lines += ["", f"## Selected: {name} (`{c['key']}`)", "",
                  f"Rule (DESIGN.md 2.2, `ssah_jax.attribution.sweep_fraction`): the largest `{c['key']}` before the "
                  "first value at which a metric moved past its limit against the point "
                  f"`{config.select[name].baseline}` "
                  "(limits: " + ", ".join(f"{m} {lim}" for m, lim in c["limits"].items()) + ").", "",
                  "| value | " + " | ".join(f"{m} (baseline {_fmt(c['baseline'][m])})" for m in c["limits"])
                  + " | within limits |", "|---|" + "---|" * (len(c["limits"]) + 1)]
        tried = {str(v): d for v, d in c["tried"]}
        for value, entry in c["changes"].items():
            cells = [value] + ["–" if e is None else f"{_fmt(e['value'])} ({e['change']:+.3g})" for e in entry.values()]
            verdict = ("missing" if any(e is None for e in entry.values()) else
                       "not tried (after the first beyond)" if value not in tried else
                       "yes" if tried[value] <= 1 else "no")
            lines.append("| " + " | ".join(cells + [verdict]) + " |")
        if c["value"] is None:
            lines += ["", f"**Not chosen: {c['note']}.**"]
        else:
            lines += ["", f"**Chosen: `{c['key']}={c['value']:g}`**"
                      + (" (even the smallest value moved past a limit)" if c["value"] == 0 else "")
                      + (f" (incomplete: {c['note']})" if c["note"] else "")]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{r['point']}`: {r['error']} (log: `logs/{r['point']}.log`)"
                                          for r in failed]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def copy_report(out: Path, destination: Path) -> None:
    """The report, table, selections and plots of a sweep, copied to ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in [out / "report.md", out / "sweep.csv", out / "selected.json", *out.glob("plot_*.png")]:
        if path.exists():
            shutil.copy2(path, destination / path.name)
