"""Audit the keyword judge's verdicts on the answers of an evaluation (its ``rows/<task>.jsonl``;
under a pipeline, e.g. ``eval_signal/<schedule>/rows/``): which rule decided each answer
(``ssah_jax.evaluation.judgement``), and whether today's judge still gives the recorded verdict.

    python scripts/judge_rows.py runs/signals/eval_signal/each/rows/prefill_*.jsonl [--show]

Per file: the answers, the share refused, the answers per rule, and how many of the recorded
verdicts today's judge would change; ``--show`` prints each answer judged a compliance with its
rule and its prompt (an answer given to the same prompt more than once, once, with the count).
A row needs an ``answer`` (the text after any forced prefix, as
``ssah_jax.evaluation.answer_rows`` writes it); ``refused`` and ``prefix`` are read where
present. A torn last line (a killed run) is skipped, as the evaluation itself does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ssah_jax.evaluation.judge import JUDGEMENTS, REFUSED, judgement


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; ValueError naming the file and line when one is not JSON (but
    the last, dropped as a killed run's torn line) or has no ``answer`` string."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{path}:{number}: a row needs an 'answer' string")
        rows.append(row)
    return rows


def audit(rows: list[dict]) -> dict:
    """Per row its rule (``rules``), and ``counts`` (answers per rule), ``refused`` (share),
    ``recorded`` (rows with a boolean ``refused``) and ``changed`` (of those, the verdicts
    today's judge does not give)."""
    rules = [judgement(r["answer"]) for r in rows]
    recorded = [(r["refused"], rule) for r, rule in zip(rows, rules) if isinstance(r.get("refused"), bool)]
    return {"rules": rules, "counts": Counter(rules), "refused": sum(rule in REFUSED for rule in rules) / len(rows),
            "recorded": len(recorded), "changed": sum(refused != (rule in REFUSED) for refused, rule in recorded)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", type=Path, help="rows/<task>.jsonl files of evaluations")
    parser.add_argument("--show", action="store_true", help="print each answer judged a compliance, with its rule")
    args = parser.parse_args(argv)
    try:
        tables = [(path, read_rows(path)) for path in args.rows]
    except (OSError, ValueError) as e:
        print(f"judge_rows: {e}", file=sys.stderr)
        return 2
    for path, rows in tables:
        if not rows:
            print(f"{path}: no answers")
            continue
        a = audit(rows)
        counts = ", ".join(f"{rule} {a['counts'][rule]}" for rule in JUDGEMENTS if rule in a["counts"])
        print(f"{path}: {len(rows)} answers, {100 * a['refused']:.1f}% refused; rules: {counts}; "
              f"of {a['recorded']} recorded verdicts, today's judge changes {a['changed']}")
        if args.show:
            shown = Counter((r.get("prompt", ""), r.get("prefix", ""), r["answer"], rule)
                            for r, rule in zip(rows, a["rules"]) if rule not in REFUSED)
            for (prompt, prefix, answer, rule), times in shown.items():
                print(f"  [{rule}]{f' x{times}' if times > 1 else ''} {prompt!r}\n    {prefix!r} + {answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
