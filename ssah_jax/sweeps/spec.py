"""A sweep config and its points: ``sweep_config`` (the keys and their defaults), ``validate`` (each
key checked, the base config read, every swept key one of it), ``expand`` (the listed points x the
grid's product x the seeds, each a ``Point`` with a readable name) and ``arguments`` (a point's
``ssah-jax`` command line)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

import experiments
from ssah_jax import runs

EXECUTORS = ("local", "ray", "print")
DETERMINING = ("experiment", "base", "set")  # a workdir's sweep; the points' own runs check the rest
ROOT = Path(__file__).resolve().parents[2]  # the checkout, where a base config is also looked for
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


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
