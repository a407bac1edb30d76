"""The claim verdicts of the maker-aligned SSAH report (``experiments/reproduce/report.py`` with
``maker_aligned``): each verdict of the committed ``experiments/results/qwen_coder_0.5b/REPORT.md``
follows from the numbers in its tables, by the rules of ``experiments/reproduce/claims.py`` (whose
flips are tested in ``tests/experiments/test_reproduce_claims.py``)."""

import re
from pathlib import Path

import pytest

from experiments.reproduce.claims import (
    Verdict,
    redundant_units_are_cheap,
    refuses,
    safety_units_carry_refusal,
)
from tests.experiments.report_tables import (
    VERDICT,
    claim,
    freezing_claim,
    pruning_numbers,
    rate,
    read_report,
    section,
    table,
    verdict,
)

REPORT = Path(__file__).resolve().parents[2] / "experiments" / "results" / "qwen_coder_0.5b" / "REPORT.md"


@pytest.fixture(scope="module")
def report() -> dict:
    return read_report(REPORT)


def test_the_report_is_of_the_maker_aligned_model(report):
    assert report["text"].startswith("# SSAH reproduced on `qwen2.5-coder-0.5b-instruct`")
    assert "ssah-jax reproduce --config=configs/reproduce.py:qwen_cpu" in report["text"]
    assert (REPORT.parent / "config.json").exists()
    for plot in re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", report["text"]):
        assert (REPORT.parent / plot).stat().st_size > 0, plot


def refusal(report: dict):
    rows = table(section(report, "1. The model, aligned by its makers"), "| metric | n | value |")
    n, value = rows["ASR, no system prompt"]
    return rate(value, int(n))


def test_the_model_refuses(report):
    line = claim(report, "The model refuses")
    assert verdict(line) == refuses(refusal(report)).verdict


def test_safety_critical_units_carry_the_refusal(report):
    asr, _, _ = pruning_numbers(report)
    line = claim(report, "SCU carry the refusal")
    finding = safety_units_carry_refusal(asr["dense"], asr["minus_SCU"], asr["minus_random"],
                                         refuses(refusal(report)).held)
    assert re.search(r"without SCU \((\w+)\)", line).group(1) == finding.comparison
    assert verdict(line) == finding.verdict


def test_redundant_units(report):
    _, perplexity, pruned = pruning_numbers(report)
    line = claim(report, "RU are redundant")
    finding = redundant_units_are_cheap(perplexity["dense"], perplexity.get("minus_RU", perplexity["dense"]),
                                        pruned=pruned.get("minus_RU", 0))
    assert verdict(line) == finding.verdict


@pytest.mark.parametrize("name, label", [("SCU + top 6% CU", "freeze SCU + top 6% CU"),
                                         ("SCU + all CU", "freeze SCU + all CU")])
def test_freezing_protects(report, name, label):
    freezing_claim(report, name, label)


def test_every_verdict_of_the_report_is_covered(report):
    """The summary holds exactly the claims tested above, in this order, with the verdicts the
    README's summary cites."""
    written = [(t.split(" (")[0], verdict(line)) for t, line in report["claims"].items() if VERDICT.search(line)]
    assert written == [
        ("The model refuses", Verdict.HELD), ("SCU carry the refusal", Verdict.HELD),
        ("RU are redundant", Verdict.NOT_TESTABLE),
        ("Freezing SCU + top 6% CU protects during fine-tuning", Verdict.NOT_HELD),
        ("Freezing SCU + all CU protects during fine-tuning", Verdict.HELD)]
