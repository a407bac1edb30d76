"""What a sweep's points produced: each point's record (the ``finished.json`` of its command, its
attempts in ``points.jsonl``), its metrics, the table of every point, and the choices of the
``select`` rules (the SSAH fraction rule, :func:`ssah_jax.attribution.sweep_fraction`)."""

from __future__ import annotations

import collections
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.attribution import sweep_fraction
from ssah_jax.sweeps.spec import _LIMIT, Point, arguments

RECORDS = "points.jsonl"


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

