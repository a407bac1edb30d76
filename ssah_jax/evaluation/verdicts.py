"""A claim's verdict, shared by every pipeline's claims (``experiments/*/claims.py``): the claim
functions there are pure, from a run's numbers (rates compared by
:func:`ssah_jax.evaluation.intervals.compare`) to a :class:`Finding`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ssah_jax.evaluation.intervals import Comparison


class Verdict(StrEnum):
    HELD = "held"
    PARTLY = "held partly"
    NOT_HELD = "did not hold"
    NOT_TESTABLE = "not testable"


@dataclass(frozen=True)
class Finding:
    """A claim's verdict and what it rests on: ``comparison`` (the rate comparison the rule
    reads, if any), ``control`` (the second one, against a control, if any) and ``reason``
    (why it is not testable)."""

    verdict: Verdict
    comparison: Comparison | None = None
    control: Comparison | None = None
    reason: str = ""

    @property
    def held(self) -> bool:
        return self.verdict is Verdict.HELD


class Verdicted(Protocol):
    verdict: Verdict
    reason: str


def markdown(finding: Verdicted) -> str:
    """A report's verdict: ``**held**``, or ``**not testable** (why)``."""
    return f"**{finding.verdict}**" + (f" ({finding.reason})" if finding.reason else "")
