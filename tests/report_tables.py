"""Reading the committed reports' markdown back (``tests/test_claims.py``,
``tests/test_signals_claims.py``): their tables, printed rates and verdicts."""

import re

from experiments.reproduce.claims import Rate, Verdict

VERDICT = re.compile(r"\*\*(held|held partly|did not hold|not testable)\*\*")


def sections(text: str) -> dict[str, str]:
    """Title -> body of each ``## `` section."""
    return {s.split("\n")[0]: s for s in text.split("\n## ")[1:]}


def summary(text: str) -> list[str]:
    """The bullet lines of the report's "Summary: which claims held" section."""
    body = text.split("## Summary: which claims held\n")[1].split("\n## ")[0]
    return [line for line in body.splitlines() if line.startswith("- ")]


def table(body: str, header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header row starts with ``header``: first cell -> the
    others (the first row of each first cell)."""
    lines = body.split(header, 1)[1].splitlines()[2:]  # past the header and |---| rows
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], cells[1:])
    return rows


def rate(cell: str, n: int) -> Rate:
    """A rate printed as a percentage with one decimal (``98.5% [95.7, 99.5]``: its interval
    after it), back as the exact count of ``n`` (the reports' n are below 1000, so the printed
    value names one count)."""
    return Rate(round(float(cell.split("%")[0]) / 100 * n) / n, n)


def verdict(line: str) -> Verdict:
    return Verdict(VERDICT.search(line).group(1))
