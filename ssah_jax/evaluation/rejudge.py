"""Re-judging the answers an evaluation wrote, without running its model (``ssah-jax judge``).

An evaluation's answers are its ``rows/<name>.jsonl`` (:func:`ssah_jax.evaluation.answer_rows`;
under a pipeline, one ``rows/`` per evaluation of its workdir). Re-judged by another judge, a
file's rows are written unchanged but for their verdicts (``refused``; for an attack's rows,
``harmful`` and ``judge``) to ``rows.<judge>/<name>.jsonl`` beside ``rows/``, the originals kept.
``overrefusal`` rows are safe prompts (their verdict: refused); every other rows file with
answers is an attack's (its verdict: the attack's success). A row's recorded verdict is its
``harmful`` where it has one, and otherwise ``not refused`` by the rules of its time
(``keyword_v1``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ssah_jax import runs
from ssah_jax.evaluation.intervals import Rate
from ssah_jax.evaluation.judge import judgement
from ssah_jax.evaluation.judges import Judge
from ssah_jax.evaluation.safety import attacked

OVERREFUSAL = "overrefusal"
# Row files that hold no answers to judge (log-likelihood and utility tasks)
UNJUDGED = ("mmlu", "sst2", "gsm8k", "perplexity")


def read_rows(path: Path) -> list[dict]:
    """The answer rows of a JSONL file (:func:`ssah_jax.runs.read_jsonl`: a killed run's torn
    last line is dropped); a ``ValueError`` naming the file (and line) when it cannot be read,
    a line is not JSON or a row has no ``prompt`` and ``answer`` strings."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        rows = runs.read_jsonl(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise ValueError(f"{path}:{number}: not an answer row (it needs 'prompt' and 'answer' strings)")
    return rows


def is_attack(path: Path) -> bool:
    """Whether a rows file holds an attack's answers (harmful prompts), not over-refusal's."""
    return path.stem != OVERREFUSAL


def recorded(row: dict, attack: bool) -> bool:
    """A row's verdict as written: the attack's success, or (over-refusal) the refusal."""
    return attacked(row) if attack else bool(row["refused"])


@dataclass(frozen=True)
class Judged:
    """One rows file re-judged: where the new rows went, the recorded and the new verdicts,
    and the rule of the keyword judge behind each answer (what an audit reads)."""

    source: Path
    written: Path
    attack: bool
    before: list[bool]
    after: list[bool]
    rules: list[str]
    rows: list[dict]

    @property
    def changed(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.before, self.after)) if a != b]

    def rate(self, verdicts: Sequence[bool]) -> float:
        return sum(verdicts) / len(verdicts) if verdicts else float("nan")

    def summary(self) -> str:
        what = "ASR" if self.attack else "over-refusal"
        changed = self.changed
        turned = Counter(f"{'yes' if self.before[i] else 'no'} -> {'yes' if self.after[i] else 'no'}" for i in changed)
        rules = Counter(self.rules[i] for i in changed)
        line = (f"{self.source}: {len(self.rows)} answers, {what} {100 * self.rate(self.before):.1f}% recorded -> "
                f"{100 * self.rate(self.after):.1f}%; {len(changed)} verdict{'' if len(changed) == 1 else 's'} changed")
        if changed:
            line += (f" ({', '.join(f'{k}: {v}' for k, v in sorted(turned.items()))}; by the keyword rule: "
                     f"{', '.join(f'{k} {v}' for k, v in rules.most_common())})")
        return line


def rejudge_file(path: Path, judge: Judge) -> Judged:
    """Re-judges the rows of ``path`` with ``judge`` into ``rows.<judge>/<name>.jsonl``."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows to judge")
    attack = is_attack(path)
    answers = [r["answer"] for r in rows]
    refused = judge.refused(answers)
    harmful = judge.harmful([r["prompt"] for r in rows], answers) if attack else [None] * len(rows)
    new = []
    for row, r, h in zip(rows, refused, harmful):
        row = {k: v for k, v in row.items() if k not in ("refused", "harmful", "judge")}
        new.append({**row, "refused": r, **({"harmful": h, "judge": judge.name} if attack else {})})
    written = path.parent.with_name(f"{path.parent.name}.{judge.name}") / path.name
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new), encoding="utf-8")
    return Judged(path, written, attack, [recorded(r, attack) for r in rows],
                  [h if attack else r for r, h in zip(refused, harmful)],
                  [judgement(r["answer"], r["prompt"] if attack else None) for r in rows], new)


def rows_files(paths: Sequence[Path]) -> list[Path]:
    """The answer rows files of ``paths``: a file as given; a directory, every
    ``rows/<name>.jsonl`` under it (an evaluation's, or every evaluation of a pipeline's
    workdir) but the utility tasks' (:data:`UNJUDGED`)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.jsonl") if p.parent.name == "rows" and p.stem not in UNJUDGED)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    if not found:
        raise ValueError(f"no answer rows (rows/<task>.jsonl) under {', '.join(map(str, paths))}")
    return found


def table(judged: Sequence[Judged], root: Path | None, judge: str) -> str:
    """A markdown table of each file's recorded and re-judged rate (with Wilson 95% intervals)."""
    lines = [f"| rows | metric | n | recorded | {judge} | changed |", "|---|---|---|---|---|---|"]
    for j in judged:
        name = j.source.relative_to(root) if root is not None and j.source.is_relative_to(root) else j.source
        n = len(j.rows)
        lines.append(f"| `{name}` | {'ASR' if j.attack else 'over-refusal'} | {n} | {Rate(j.rate(j.before), n)} | "
                     f"{Rate(j.rate(j.after), n)} | {len(j.changed)} |")
    return "\n".join(lines)
