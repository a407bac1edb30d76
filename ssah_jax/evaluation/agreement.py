"""How far a judge's verdicts hold up: the labelled answer set and a judge's agreement with it.

The set (``labelled/answers.jsonl``, labelled against ``labelled/RUBRIC.md``) holds answers of
our own evaluations, each labelled ``refusal`` / ``harmful`` / ``benign`` / ``nonsense``. A judge
is right on an answer to a harmful prompt when it calls the attack a success exactly for
``harmful`` (ASR), and on an answer to a safe prompt when it calls it a refusal exactly for
``refusal`` (over-refusal). The set is split once, by a hash of each answer's id, into a
development half (where judge rules may be mended) and a test half (reported once, after).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LABELS = ("refusal", "harmful", "benign", "nonsense")
PROMPT_KINDS = ("harmful", "benign")
SPLITS = ("dev", "test")
SET_PATH = Path(__file__).parent / "labelled" / "answers.jsonl"
_FIELDS = ("id", "source", "prompt_kind", "prompt", "prefix", "answer", "label", "note")


@dataclass(frozen=True)
class Labelled:
    """One labelled answer (the fields of RUBRIC.md)."""

    id: str
    source: str
    prompt_kind: str
    prompt: str
    prefix: str
    answer: str
    label: str
    note: str = ""

    @property
    def split(self) -> str:
        return split_of(self.id)

    @property
    def truth(self) -> bool:
        """What a judge should say: attack success (harmful prompt) or refusal (safe prompt)."""
        return self.label == ("harmful" if self.prompt_kind == "harmful" else "refusal")


def answer_id(source: str, prompt: str, prefix: str, answer: str) -> str:
    """12 hex digits naming an answer (the same answer of the same source has the same id)."""
    return hashlib.sha256(json.dumps([source, prompt, prefix, answer]).encode()).hexdigest()[:12]


def split_of(answer_id: str) -> str:
    """``dev`` or ``test``: a function of the id alone, fixed once for the set's lifetime."""
    return SPLITS[int(hashlib.sha256(f"split:{answer_id}".encode()).hexdigest()[:8], 16) % 2]


def load(path: str | Path = SET_PATH, *, labelled: bool = True) -> list[Labelled]:
    """The answers of ``path``; every line is checked (a bad one is a ``ValueError`` naming the
    file, line and field). ``labelled=False`` also takes answers whose ``label`` is empty (a
    draw waiting to be read)."""
    out, seen = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        missing = [f for f in _FIELDS if f not in record and f != "note"]
        if missing:
            raise ValueError(f"{where}: lacks {', '.join(missing)}")
        item = Labelled(**{f: record.get(f, "") or "" for f in _FIELDS})
        if item.prompt_kind not in PROMPT_KINDS:
            raise ValueError(f"{where}: prompt_kind={item.prompt_kind!r}, not one of {PROMPT_KINDS}")
        if item.label not in LABELS and (labelled or item.label):
            raise ValueError(f"{where}: label={item.label!r}, not one of {LABELS}")
        if item.id != answer_id(item.source, item.prompt, item.prefix, item.answer):
            raise ValueError(f"{where}: id {item.id} is not the hash of its source, prompt, prefix and answer")
        if item.id in seen:
            raise ValueError(f"{where}: id {item.id} appears twice")
        seen.add(item.id)
        out.append(item)
    return out


@dataclass(frozen=True)
class Judge:
    """A judge as the agreement sees it: ``success(prompt, prefix, answer)`` (the attack
    succeeded), ``refused(prompt, answer)`` (a safe prompt was refused) and, where the judge
    has one, ``rule(prompt, answer)``: the name of the rule that decided (the keyword judge's
    :func:`~ssah_jax.evaluation.judge.judgement`)."""

    name: str
    success: Callable[[str, str, str], bool]
    refused: Callable[[str, str], bool]
    rule: Callable[[str, str], str] | None = None

    def verdict(self, item: Labelled) -> bool:
        if item.prompt_kind == "harmful":
            return self.success(item.prompt, item.prefix, item.answer)
        return self.refused(item.prompt, item.answer)


@dataclass(frozen=True)
class Agreement:
    """A judge's verdicts on a set of labelled answers."""

    n: int
    right: int
    by_source: dict[str, tuple[int, int]]  # source -> (right, n)
    confusion: dict[str, Counter]  # "<prompt_kind>" or "<source>" -> Counter((label, verdict) -> count)
    rules: Counter  # (rule, label) -> count, where the judge names its rules

    @property
    def rate(self) -> float:
        return self.right / self.n if self.n else float("nan")


def agreement(judge: Judge, items: Iterable[Labelled]) -> Agreement:
    """The share of ``items`` where ``judge`` says what the label says (:attr:`Labelled.truth`),
    per source, the confusion of labels and verdicts per prompt kind and per source, and of rules
    and labels."""
    n = right = 0
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    confusion: dict[str, Counter] = defaultdict(Counter)
    rules: Counter = Counter()
    for item in items:
        verdict = judge.verdict(item)
        ok = verdict == item.truth
        n, right = n + 1, right + ok
        by_source[item.source][0] += ok
        by_source[item.source][1] += 1
        confusion[item.prompt_kind][item.label, verdict] += 1
        confusion[item.source][item.label, verdict] += 1
        if judge.rule is not None:
            rules[judge.rule(item.prompt, item.answer), item.label] += 1
    return Agreement(n, right, {s: (r, m) for s, (r, m) in sorted(by_source.items())}, dict(confusion), rules)


def select(items: Sequence[Labelled], split: str | None) -> list[Labelled]:
    """The items of one split (``None``: all)."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split={split!r}: must be one of {SPLITS} or None")
    return [i for i in items if split is None or i.split == split]
