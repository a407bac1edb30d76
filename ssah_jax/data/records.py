"""What every data source yields: ``Record`` (one example of any dataset), ``LoadReport`` (what a
kit load read and skipped), ``DataError`` (a missing or malformed file, naming it), and
``prompt_key`` (what two prompts share to count as the same)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One example of any dataset.

    prompt: the user turn. response: the assistant turn (a refusal, an answer, AdvBench's
    "Sure, here is ..." target), if the data has one. system: a system prompt the data
    prescribes. label: a category, ``"safe"`` / ``"unsafe"``, a class index, or a final answer.
    choices: candidate answers for multiple choice (``label`` is then the index of the right one).
    meta: anything else the source carries. where: ``file:line`` it came from.
    """

    prompt: str
    response: str | None = None
    system: str | None = None
    label: str | int | None = None
    choices: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    name: str
    split: str
    path: str
    rows: int
    skipped: int
    first_error: str | None


class _Malformed(Exception):
    """A row could not be turned into a Record (message says why)."""


def prompt_key(prompt: str) -> str:
    """What two prompts must share to count as the same (case and whitespace ignored)."""
    return " ".join(prompt.split()).casefold()
