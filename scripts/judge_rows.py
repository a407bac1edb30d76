"""Audit the keyword judge's verdicts on the answers of an evaluation (its ``rows/<task>.jsonl``):
which rule decided each answer (``ssah_jax.evaluation.judge.judgement``), and whether today's
judge still gives the verdict the file records.

    python scripts/judge_rows.py runs/signals/eval_signal/each/rows/prefill_*.jsonl [--show]

Per file: the answers, the share refused, the answers counted per rule, and how many recorded
verdicts today's judge would change; ``--show`` prints each answer judged a compliance with its
rule (each distinct answer once). A row needs an ``answer`` (the text after any forced prefix,
as ``ssah_jax.evaluation.answer_rows`` writes it); ``refused`` is read where present.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ssah_jax.evaluation.judge import JUDGEMENTS, REFUSED, judgement


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; ValueError naming the file and line when one has no answer."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
                raise ValueError(f"{path}:{number}: a row needs an 'answer' string")
            rows.append(row)
    return rows


def audit(rows: list[dict]) -> dict:
    """``n``, ``refused`` (share), ``rules`` (answers per rule of JUDGEMENTS) and ``changed``
    (recorded verdicts that today's judge does not give) of the rows."""
    rules = [judgement(r["answer"]) for r in rows]
    changed = sum("refused" in r and bool(r["refused"]) != (rule in REFUSED) for r, rule in zip(rows, rules))
    refused = sum(rule in REFUSED for rule in rules)
    return {"n": len(rows), "refused": refused / len(rows) if rows else 0.0,
            "rules": {rule: count for rule, count in Counter(rules).most_common()}, "changed": changed}


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
        a = audit(rows)
        rules = ", ".join(f"{rule} {a['rules'][rule]}" for rule in JUDGEMENTS if rule in a["rules"])
        print(f"{path}: {a['n']} answers, {100 * a['refused']:.1f}% refused; rules: {rules}; "
              f"recorded verdicts today's judge changes: {a['changed']}")
        if args.show:
            seen = set()
            for r in rows:
                rule = judgement(r["answer"])
                if rule not in REFUSED and r["answer"] not in seen:
                    seen.add(r["answer"])
                    print(f"  [{rule}] {r.get('prefix', '')!r} + {r['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
