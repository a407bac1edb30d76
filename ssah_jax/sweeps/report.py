"""A sweep's outputs in its workdir: ``sweep.csv`` (one row per point), ``selected.json`` (the
``select`` rules' choices), a plot per swept key and ``report.md`` (the table with mean and spread
over seeds, the choices, the failures), and their copy to ``config.report_dir``."""

from __future__ import annotations

import collections
import csv
import json
import shlex
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.evaluation.tasks import RATE_FIELDS
from ssah_jax.sweeps.results import RECORDS, groups, select, swept_keys, table
from ssah_jax.sweeps.spec import _UNSAFE, Point, _number, _readable, fixed_overrides


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _is_rate(config: ConfigDict, metric: str) -> bool:
    """Whether column ``metric`` reads a rate (an ASR, refusal rate or accuracy: its path ends in
    one of ``RATE_FIELDS``), which the report shows in percent like every other report."""
    return config.metrics[metric].rpartition(":")[2].rpartition(".")[2] in RATE_FIELDS


def _value(config: ConfigDict, metric: str, x: float | None, sd: float | None = None) -> str:
    """A cell: ``25.0%`` (``± 3.1`` points over seeds) for a rate, else four digits."""
    if x is None or not _is_rate(config, metric):
        return _fmt(x) + (f" ± {_fmt(sd)}" if sd is not None else "")
    return f"{100 * x:.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _change(config: ConfigDict, metric: str, limit: str, change: float) -> str:
    """A change against the baseline (now - baseline) as its limit measures it: relative (``x``
    limits) in percent, a rate's difference in points, another metric's difference in its units."""
    if str(limit).startswith("x"):
        return f"{100 * change:+.1f}%"
    change = -change if str(limit).startswith("-") else change  # the rule's fall, shown as now - baseline
    return f"{100 * change:+.1f} points" if _is_rate(config, metric) else f"{change:+.3g}"


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
            cells.append(_value(config, m, *_mean_sd(got)))
        lines.append("| " + " | ".join(cells) + " |")
    rates = [m for m in config.metrics if _is_rate(config, m)]
    if rates:
        lines += ["", "Rates (" + ", ".join(rates) + ") in percent."]
    if seeded:
        lines += ["", f"Mean ± standard deviation over the seeds {tuple(config.seeds)} that finished"
                  + (" (of a rate: in percentage points)." if rates else ".")]
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
                  f"Rule (Li & Kim, arXiv 2410.10862; `ssah_jax.attribution.sweep_fraction`): the largest "
                  f"`{c['key']}` before the "
                  "first value at which a metric moved past its limit against the point "
                  f"`{config.select[name].baseline}` "
                  "(limits: " + ", ".join(f"{m} {lim}" for m, lim in c["limits"].items()) + ").", "",
                  "| value | " + " | ".join(f"{m} (baseline {_value(config, m, b)})" for m, b in c["baseline"].items())
                  + " | within limits |", "|---|" + "---|" * (len(c["limits"]) + 1)]
        tried = {str(v): d for v, d in c["tried"]}
        for value, entry in c["changes"].items():
            cells = [value] + ["–" if e is None else f"{_value(config, m, e['value'])} "
                               f"({_change(config, m, c['limits'][m], e['change'])})" for m, e in entry.items()]
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
