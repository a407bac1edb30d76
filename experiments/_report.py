"""What the experiments' reports share: sections with the claims they add to the summary, the
``REPORT.md`` a pipeline writes from them, the section of stage wall times, and saving a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah_jax import runs, stages
from ssah_jax.pipeline import INVOCATIONS

Section = tuple[list[str], list[str]]  # (the section's lines, its claims for the summary)


def write(report_dir: Path, header: list[str], sections: list[Section]) -> Path:
    """``report_dir/REPORT.md``: the header, the summary of every section's claims, then the sections."""
    summary = [claim for _, claims in sections for claim in claims]
    body = [line for lines, _ in sections for line in lines]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join([*header, "## Summary: which claims held", "", *summary, "", *body]))
    return path


def stage_times(out: Path, intro: str, records: list[tuple[str, dict[str, Any]]],
                invocations: list[dict[str, Any]]) -> Section:
    """The section of stage wall times: ``intro``, then the table of ``(stage, record)`` and the
    invocations (:func:`ssah_jax.stages.times_table`)."""
    lines = ["## Stage wall times", "", intro, ""]
    return lines + stages.times_table(records, invocations, out / INVOCATIONS), []


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Lays out, writes and closes a matplotlib figure (``savefig``: e.g. ``dpi``); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, **savefig)
    runs.pyplot().close(fig)
    return path
