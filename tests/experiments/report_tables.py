"""Reading the committed reports' markdown back (``test_reproduce_claims.py``,
``test_reproduce_claims_qwen.py``, ``test_signals_claims.py`` beside it): their tables, printed
rates and verdicts."""

import re

from experiments.reproduce.claims import AttackRates, FreezingFinding, Rate, Verdict, freezing_protects

VERDICT = re.compile(r"\*\*(held|held partly|did not hold|not testable)\*\*")
PCT = r"[\d.]+%(?: \[[\d.]+, [\d.]+\])?"  # a printed rate, with or without its interval


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


# ---------------------------------------------------------------------------------------------
# The SSAH report (``experiments/reproduce/report.py``)


def read_report(path) -> dict:
    """A committed SSAH report: its text, summary lines by claim title, sections by title."""
    text = path.read_text()
    claims = {re.match(r"- \*\*(.+?)\*\*", line).group(1): line for line in summary(text)}
    return {"text": text, "claims": claims, "sections": sections(text)}


def section(report: dict, start: str) -> str:
    return next(body for title, body in report["sections"].items() if title.startswith(start))


def claim(report: dict, title_start: str) -> str:
    return next(line for title, line in report["claims"].items() if title.startswith(title_start))


def pruning_numbers(report: dict) -> tuple[dict[str, Rate], dict[str, float], dict[str, int]]:
    """Section 2's table (``| dense | 0 (0.0%) | 24.0% [16.7, 33.2] | ... | 6.39 | 1.5% [0.5, 4.3] | ...``;
    the ASR n from the line ``n: ASR 200, ...`` below it): ASR, perplexity and units pruned per
    pruned model."""
    body = section(report, "2. Pruning")
    n = int(re.search(r"n: ASR (\d+)", body).group(1))
    rows = table(body, "| model | units pruned |")
    names = {"dense": "dense", "− SCU": "minus_SCU", "− UCU": "minus_UCU", "− RU": "minus_RU"}
    named = {names.get(label, "minus_random" if label.startswith("− random") else label): cells
             for label, cells in rows.items()}
    return ({k: rate(c[4], n) for k, c in named.items()}, {k: float(c[3]) for k, c in named.items()},
            {k: int(c[0].split(" ")[0]) for k, c in named.items()})


def attack_numbers(report: dict) -> tuple[Rate, dict[str, dict[str, Rate]]]:
    """Section 3's table, one column per attack: the initial row (``| initial (aligned) | 1.5%
    [0.5, 4.3] | ...``) and one row per protection, each cell the seeds' answers pooled then each
    seed's ASR (``51.3% [47.3, 55.3] (55.0%, 37.5%, 61.5%)``); n from ``n = 200 per run``. The
    initial ASR, and protection -> attack -> the pooled ASR, recomputed from the seeds' (and
    checked against the printed one)."""
    body = section(report, "3. Fine-tuning attacks")
    n = int(re.search(r"n = (\d+) per run", body).group(1))
    header = next(line for line in body.splitlines() if line.startswith("| protection |"))
    attacks = [cell.strip().split(" ")[0] for cell in header.strip("|").split("|")[1:-1]]
    rows = table(body, "| protection |")
    initial = rate(rows.pop("initial (aligned)")[0], n)

    def pooled(cell: str) -> Rate:
        seeds = [rate(s, n) for s in re.search(r"\((.+)\)$", cell).group(1).split(", ")]
        result = Rate.pooled(seeds)
        assert result == rate(cell, n * len(seeds)), cell
        return result

    return initial, {label: dict(zip(attacks, (pooled(c) for c in cells[:-1]))) for label, cells in rows.items()}


def freezing_claim(report: dict, name: str, label: str) -> tuple[FreezingFinding, str]:
    """The finding of "Freezing ``name`` protects" recomputed from section 3's table (``label``:
    its row), checked against the summary line's verdict, counts and per-attack comparisons."""
    initial, asr = attack_numbers(report)
    unprotected, control = asr["no protection"], asr["freeze as many random units (control)"]
    finding = freezing_protects(initial, {a: AttackRates(unprotected[a], asr[label][a], control[a])
                                          for a in unprotected})
    line = claim(report, f"Freezing {name} protects")
    assert verdict(line) == finding.verdict
    counts = re.search(r"of the (\d+) attacks that raised ASR without protection, ASR is lower with the freeze in "
                       r"(\d+) \(", line).groups()
    assert counts == (str(len(finding.testable)), str(len(finding.protected)))
    written = re.findall(rf"(\w+): {PCT} vs {PCT} unprotected, (\w+); vs the random control (\w+)"
                         r"( \(the attack did not raise ASR\))?", line)
    assert [(o.attack, o.vs_unprotected, o.vs_control, not o.raised) for o in finding.outcomes] == [
        (a, vs, vc, bool(did_not)) for a, vs, vc, did_not in written]
    return finding, line
