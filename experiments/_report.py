"""What the experiments' reports share: sections with the claims they add to the summary, the
``REPORT.md`` a pipeline writes from them, the section of stage wall times, who judged the ASR,
and saving a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah_jax import runs, stages
from ssah_jax.evaluation import judges
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


def asr_judged(sections: dict[str, Any]) -> str:
    """A report's sentence saying how a run's evaluations judged ASR and over-refusal
    (``{config key: its evaluation section or typed spec}``, anything with ``judge`` and
    ``judge_model``): by their judge, or each one's where they differ; over-refusal by the
    keyword rules of the judge (``keyword_v1``'s, or the mended ``keyword``)."""
    named = {key: judges.describe(s.judge, s.judge_model) for key, s in sections.items()}
    refusals = sorted({judges.describe(s.judge if s.judge == "keyword_v1" else "keyword") for s in sections.values()})
    which = (f"{next(iter(named.values()))} calls an attack's success" if len(set(named.values())) == 1 else
             "its judge calls an attack's success: " + ", ".join(f"in `{key}` {judge}" for key, judge in named.items()))
    return (f"ASR is the share of harmful prompts whose answer {which}; over-refusal is the share of safe prompts "
            f"that {' and '.join(refusals)} calls refused (docs/results/judge.md: how far each judge agrees with "
            "labelled answers).")


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Lays out, writes and closes a matplotlib figure (``savefig``: e.g. ``dpi``); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, **savefig)
    runs.pyplot().close(fig)
    return path
