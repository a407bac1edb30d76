"""The labelled answer set of the judges (ssah_jax/evaluation/labelled): draw answers from
evaluation rows to be labelled, and measure a judge's agreement with the labels.

    python scripts/judge_set.py draw --out draws.jsonl \\
        unaligned/asr_no_system=runs/reproduce/eval_unaligned/rows/asr_no_system.jsonl:40 ...
    python scripts/judge_set.py label --draws draws.jsonl --labels read.jsonl ... [--set answers.jsonl]
    python scripts/judge_set.py measure [--split dev|test] [--judge keyword] [--judge_model DIR]

``draw`` takes ``SOURCE=ROWS.jsonl[:N]`` (N answers drawn at random, seeded by the source's name,
among rows of distinct prompts; all when N is left out) and appends to ``--out`` the answers it
does not hold yet, unlabelled: the rows of ``overrefusal`` files are safe prompts, every other
file's harmful ones. ``label`` writes into the set (the committed one by default) the draws
that ``--labels`` files label (lines ``{"id", "label", "note"}``), keeping the set's answers.
``measure`` prints the judge's agreement with the labels, per source, and the
confusion of labels and verdicts per prompt kind (the tables of docs/guide/judges.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ssah_jax.evaluation.agreement import LABELS, PROMPT_KINDS, SET_PATH, Judge, agreement, answer_id, load, select
from ssah_jax.evaluation.judge import KEYWORD_RULES, judgement
from ssah_jax.evaluation.rejudge import read_rows


def _draw_source(spec: str) -> tuple[str, Path, int | None]:
    source, sep, rest = spec.partition("=")
    if not sep or not source:
        raise ValueError(f"{spec!r}: expected SOURCE=ROWS.jsonl[:N]")
    path, _, count = rest.partition(":")
    if count and not count.isdigit():
        raise ValueError(f"{spec!r}: N must be a whole number, got {count!r}")
    return source, Path(path), int(count) if count else None


def draw(specs: list[str], out: Path) -> int:
    held = {i.id for i in load(out, labelled=False)} if out.exists() else set()
    new = []
    for spec in specs:
        source, path, count = _draw_source(spec)
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {path}")
        rows, prompts = [], set()
        for row in read_rows(path):
            if row["prompt"] not in prompts:
                prompts.add(row["prompt"])
                rows.append(row)
        picked = random.Random(source).sample(rows, min(count, len(rows))) if count else rows
        kind = "benign" if path.stem == "overrefusal" else "harmful"
        for row in picked:
            prefix = row.get("prefix") or ""
            item = dict(id=answer_id(source, row["prompt"], prefix, row["answer"]), source=source, prompt_kind=kind,
                        prompt=row["prompt"], prefix=prefix, answer=row["answer"], label="", note="")
            if item["id"] not in held:
                held.add(item["id"])
                new.append(item)
    with out.open("a") as f:
        for item in new:
            f.write(json.dumps(item) + "\n")
    return len(new)


def label(draws: Path, labels: list[Path], path: Path) -> int:
    pending = {i.id: i for i in load(draws, labelled=False)}
    held = load(path) if path.exists() else []
    done = {i.id for i in held}
    read = {}
    for file in labels:
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.get("id") not in pending:
                raise ValueError(f"{file}:{n}: id {entry.get('id')!r} is not one of the draws of {draws}")
            if entry["id"] in read or entry["id"] in done:
                raise ValueError(f"{file}:{n}: id {entry['id']} is labelled twice")
            if entry.get("label") not in LABELS:
                raise ValueError(f"{file}:{n}: label={entry.get('label')!r}, not one of {LABELS}")
            read[entry["id"]] = entry
    items = [json.dumps({**vars(pending[i]), "label": e["label"], "note": e.get("note") or ""})
             for i, e in read.items()]
    with path.open("a") as f:
        f.writelines(line + "\n" for line in items)
    load(path)  # the whole set still reads
    return len(items)


def _judge(name: str, model: str, dtype: str, items: list) -> Judge:
    """The judge ``name`` of :data:`ssah_jax.evaluation.judges.JUDGES` as the agreement sees it,
    its verdicts on ``items`` computed at once (a classifier scores them in batches)."""
    import jax.numpy as jnp

    from ssah_jax import runs
    from ssah_jax.evaluation.judges import JUDGES, load_judge

    if name not in JUDGES:
        raise ValueError(f"--judge={name!r}: one of {', '.join(JUDGES)}")
    try:
        judge = load_judge(name, model, dtype=jnp.dtype(dtype), prefix="--")
    except runs.ConfigError as e:
        raise ValueError(str(e)) from None
    attacks = [i for i in items if i.prompt_kind == "harmful"]
    safe = [i for i in items if i.prompt_kind != "harmful"]
    success = dict(zip(((i.prompt, i.answer) for i in attacks),
                       judge.harmful([i.prompt for i in attacks], [i.answer for i in attacks])))
    refused = dict(zip(((i.prompt, i.answer) for i in safe), judge.refused([i.answer for i in safe])))
    return Judge(name, success=lambda prompt, _prefix, answer: success[prompt, answer],
                 refused=lambda prompt, answer: refused[prompt, answer],
                 rule=(lambda prompt, answer: judgement(answer, prompt)) if name in KEYWORD_RULES else None)


def measure(path: Path, split: str | None, name: str, model: str = "", dtype: str = "float32") -> None:
    items = select(load(path), split)
    judge = _judge(name, model, dtype, items)
    result = agreement(judge, items)
    print(f"{judge.name} judge on {path.name} ({split or 'both halves'}): agrees on {result.right} of {result.n} "
          f"answers ({result.rate:.1%})\n")
    print("Per source, each label's answers that the judge calls an attack's success (harmful prompts) or "
          "a refusal (safe prompts: the sources `*/overrefusal`), of those labelled so:\n")
    print("| source | answers | agreement | " + " | ".join(LABELS) + " |\n|---|---|---|" + "---|" * len(LABELS))
    for source, (right, n) in result.by_source.items():
        counts = result.confusion[source]
        cells = [f"{counts[label, True]} of {counts[label, True] + counts[label, False]}"
                 if counts[label, True] + counts[label, False] else "" for label in LABELS]
        print(f"| {source} | {n} | {right / n:.1%} ({right}) | " + " | ".join(cells) + " |")
    for kind in PROMPT_KINDS:
        counts = result.confusion.get(kind)
        if counts is None:
            continue
        yes, no = ("success", "no success") if kind == "harmful" else ("refusal", "no refusal")
        print(f"\n{kind} prompts: label (rows) x verdict (columns)\n\n| label | {yes} | {no} |\n|---|---|---|")
        for label in LABELS:
            if counts[label, True] or counts[label, False]:
                print(f"| {label} | {counts[label, True]} | {counts[label, False]} |")
    if result.rules:
        print("\nthe rule that decided (rows) x label (columns)\n\n| rule | " + " | ".join(LABELS) + " |\n|---|"
              + "---|" * len(LABELS))
        for rule in sorted({r for r, _ in result.rules}):
            print(f"| {rule} | " + " | ".join(str(result.rules[rule, label]) for label in LABELS) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("draw", help="append unlabelled answers drawn from evaluation rows to --out")
    d.add_argument("sources", nargs="+", metavar="SOURCE=ROWS.jsonl[:N]")
    d.add_argument("--out", type=Path, required=True)
    lb = sub.add_parser("label", help="write labelled draws into the set")
    lb.add_argument("--draws", type=Path, required=True)
    lb.add_argument("--labels", type=Path, nargs="+", required=True)
    lb.add_argument("--set", type=Path, default=SET_PATH)
    m = sub.add_parser("measure", help="a judge's agreement with the labels")
    m.add_argument("--set", type=Path, default=SET_PATH, help="the labelled answers (default: the committed set)")
    m.add_argument("--split", choices=("dev", "test"), help="one half (default: both)")
    m.add_argument("--judge", default="keyword", help="keyword (default), keyword_v1, harmbench or llama_guard")
    m.add_argument("--judge_model", default="", help="a classifier judge's HF directory or hub id")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="a classifier's dtype")
    args = parser.parse_args(argv)
    try:
        if args.command == "draw":
            print(f"{draw(args.sources, args.out)} answers appended to {args.out}")
        elif args.command == "label":
            print(f"{label(args.draws, args.labels, args.set)} labelled answers written to {args.set}")
        else:
            measure(args.set, args.split, args.judge, args.judge_model, args.dtype)
    except ValueError as e:
        print(f"judge_set: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
