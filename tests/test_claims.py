"""The claim verdicts of the SSAH report (``experiments/reproduce/claims.py``): each verdict of
the committed ``experiments/results/smollm2/REPORT.md`` follows from the numbers in its tables,
and each verdict flips where its number crosses the rule."""

import re
from pathlib import Path

import pytest

from experiments.reproduce.claims import (
    NO_ATTACK_RAISED_ASR,
    NOT_ALIGNED,
    OVERREFUSAL_CAVEAT,
    PERPLEXITY_RATIO,
    AttackRates,
    Comparison,
    Mean,
    Rate,
    Verdict,
    alignment_budget,
    alignment_tax,
    alignment_took,
    compare,
    freezing_protects,
    indiscriminate_refusal,
    kind_transfer,
    reasoning_direction,
    redundant_units_are_cheap,
    safety_units_carry_refusal,
    steers_toward_refusal,
)
from ssah_jax.attribution import KINDS
from tests.report_tables import (
    PCT,
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

REPORT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "smollm2" / "REPORT.md"

# ---------------------------------------------------------------------------------------------
# Reading the committed report


@pytest.fixture(scope="module")
def report() -> dict:
    return read_report(REPORT)


def alignment_numbers(report: dict) -> dict[str, list]:
    """Section 1's table (lines ``| ASR, no system prompt | 96 | 99.0% | 13.5% | 13.5% |`` ...):
    label -> [unaligned, aligned, RU only] as rates."""
    rows = table(section(report, "1. Alignment"), "| metric | n |")
    return {label: [rate(c, int(cells[0])) for c in cells[1:]] for label, cells in rows.items()
            if cells[0] and label != "perplexity, held-out alpaca_libre"}


def took(report: dict):
    asr = alignment_numbers(report)["ASR, no system prompt"]
    return alignment_took(asr[0], asr[1])


# ---------------------------------------------------------------------------------------------
# Every verdict of the committed report from its numbers


def test_the_alignment_took_and_its_tax(report):
    line = claim(report, "Alignment took")
    assert re.search(r"aligned \((\w+)\); the alignment tax", line).group(1) == took(report).comparison == "lower"
    assert took(report).held
    numbers = alignment_numbers(report)
    labels = {"over-refusal": "over-refusal, XSTest safe prompts", "MMLU": "MMLU", "SST-2": "SST-2", "GSM8K": "GSM8K"}
    taxes = re.findall(rf"([\w-]+) {PCT} -> {PCT} \((\w+)\)", line.split("alignment tax")[1])
    assert [t[0] for t in taxes] == list(labels)
    for name, written in taxes:
        before, after, _ = numbers[labels[name]]
        assert alignment_tax(before, after) == written, name
    over = numbers["over-refusal, XSTest safe prompts"][1].value
    assert indiscriminate_refusal(True, over) == ("Caveat" in report["claims"])


def test_the_alignment_budget(report):
    line = claim(report, "Alignment budget")
    numbers = alignment_numbers(report)
    asr, system = numbers["ASR, no system prompt"], numbers["ASR, safety system prompt"]
    finding = alignment_budget(asr[2], asr[1], took(report).held)
    assert re.search(r"\(full\), (\w+);", line).group(1) == finding.comparison
    assert verdict(line) == finding.verdict == Verdict.HELD
    written = re.search(rf"with the safety system prompt {PCT} vs {PCT} \((\w+), not part", line).group(1)
    assert compare(system[2], system[1]) == written == "higher"


def test_safety_critical_units_carry_the_refusal(report):
    asr, _, _ = pruning_numbers(report)
    line = claim(report, "SCU carry the refusal")
    finding = safety_units_carry_refusal(asr["dense"], asr["minus_SCU"], asr["minus_random"], took(report).held)
    assert re.search(r"without SCU \((\w+)\)", line).group(1) == finding.comparison == "higher"
    assert finding.control == "higher"
    assert verdict(line) == finding.verdict == Verdict.HELD


def test_redundant_units(report):
    _, perplexity, pruned = pruning_numbers(report)
    line = claim(report, "RU are redundant")
    assert f"perplexity within {PERPLEXITY_RATIO - 1:.0%} of dense" in line
    assert f"{perplexity['dense']:.2f} dense, {perplexity['minus_RU']:.2f} without RU" in line
    finding = redundant_units_are_cheap(perplexity["dense"], perplexity["minus_RU"], pruned=pruned["minus_RU"])
    assert verdict(line) == finding.verdict == Verdict.HELD


@pytest.mark.parametrize("name, label", [("SCU + top 6% CU", "freeze SCU + top 6% CU"),
                                         ("SCU + all CU", "freeze SCU + all CU")])
def test_freezing_protects(report, name, label):
    freezing_claim(report, name, label)


def test_the_freezing_verdicts_are_those_written(report):
    assert verdict(claim(report, "Freezing SCU + top 6% CU")) == Verdict.NOT_HELD
    assert verdict(claim(report, "Freezing SCU + all CU")) == Verdict.HELD


def test_attribute_transfer(report):
    """Section 4's matrices (cells ``0.64 (529)``: the count in brackets)."""
    body = section(report, "4. Attribute transfer")
    matrices = []
    for part in body.split("| before \\ after |")[1:]:
        rows = table("| before \\ after |" + part, "| before \\ after |")
        matrices.append([[int(re.search(r"\((\d+)\)", c).group(1)) for c in rows[k]] for k in KINDS])
    aligned, attacked = (kind_transfer(m, KINDS.index("SCU")) for m in matrices)
    line = claim(report, "Attribute transfer")
    assert f"{aligned.kept} of {aligned.of} SCU of the unaligned model are SCU after alignment" in line
    assert f"{attacked.kept} of {attacked.of} SCU of the aligned model stay SCU" in line
    assert f"units keeping their kind: {aligned.kept_share:.0%} (alignment), {attacked.kept_share:.0%} (fine-tuning)" \
        in line
    assert VERDICT.search(line) is None  # reported, no verdict


def test_probing(report):
    """The per-query gaps are not in the report; their means and intervals are, in the summary
    line. A report of the earlier rule (one phrasing, mean gaps without intervals) is checked
    with degenerate intervals, which is that rule."""
    line = claim(report, "Aligned models steer toward refusal")
    rows = table(section(report, "5. Reasoning-direction probing"), "| model | continuation |")  # refusal rows
    number = r"([+-][\d.]+)"
    found = re.search(rf"by {number} \[{number}, {number}\] .* by {number} \[{number}, {number}\]", line)
    if found:
        v = [float(g) for g in found.groups()]
        gap, gain = Mean(*v[:3]), Mean(*v[3:])
        assert re.search(r"refusal: (\d+/\d+) aligned", line).group(1) == rows["aligned"][-1]
    else:
        aligned, unaligned = (float(g) for g in re.search(rf"mean gap {number}\) and .* \({number}\);", line).groups())
        gap, gain = Mean(aligned, aligned, aligned), Mean(aligned - unaligned, aligned - unaligned, aligned - unaligned)
        assert re.search(r"in (\d+/\d+) layers for the aligned model", line).group(1) == rows["aligned"][-1]
    assert verdict(line) == steers_toward_refusal(gap, gain).verdict


def test_every_verdict_of_the_report_is_covered(report):
    """The verdicts of the summary, in order, are the ones the tests above reproduce."""
    written = [verdict(line) for line in report["claims"].values() if VERDICT.search(line)]
    assert written == [Verdict.HELD, Verdict.HELD, Verdict.HELD, Verdict.NOT_HELD, Verdict.HELD, Verdict.NOT_HELD]


# ---------------------------------------------------------------------------------------------
# Each verdict flips where its number crosses the rule


def test_compare_flips_where_the_interval_of_the_difference_excludes_zero():
    # Newcombe's interval of the difference (from the Wilson intervals): against 0 of 100, 5 of
    # 100 differ and 4 do not (the normal approximation would call 4 of 100 different)
    zero = Rate(0.0, 100)
    assert compare(Rate(0.04, 100), zero) == Comparison.SIMILAR
    assert compare(Rate(0.05, 100), zero) == Comparison.HIGHER
    assert compare(zero, Rate(0.05, 100)) == Comparison.LOWER
    # two non-zero rates: 63 vs 50 of 100 do not differ, 64 do; 36 is lower, 37 is not
    half = Rate(0.5, 100)
    assert compare(Rate(0.63, 100), half) == Comparison.SIMILAR
    assert compare(Rate(0.64, 100), half) == Comparison.HIGHER
    assert compare(Rate(0.36, 100), half) == Comparison.LOWER
    assert compare(Rate(0.37, 100), half) == Comparison.SIMILAR
    # more samples, narrower intervals: the same gap differs
    assert compare(Rate(0.63, 1000), Rate(0.5, 1000)) == Comparison.HIGHER


def test_alignment_took_flips():
    unaligned = Rate(0.05, 100)
    assert alignment_took(unaligned, Rate(0.0, 100)).verdict == Verdict.HELD
    assert alignment_took(Rate(0.04, 100), Rate(0.0, 100)).verdict == Verdict.NOT_HELD
    assert alignment_took(Rate(0.0, 100), unaligned).comparison == Comparison.HIGHER


def test_the_caveat_flips_at_its_share_of_safe_prompts_refused():
    assert indiscriminate_refusal(True, OVERREFUSAL_CAVEAT)
    assert not indiscriminate_refusal(True, OVERREFUSAL_CAVEAT - 0.01)
    assert not indiscriminate_refusal(False, 1.0)
    assert not indiscriminate_refusal(True, None)


def test_alignment_budget_flips():
    full = Rate(0.5, 100)
    assert alignment_budget(Rate(0.63, 100), full, True).verdict == Verdict.HELD  # similar
    assert alignment_budget(Rate(0.36, 100), full, True).verdict == Verdict.HELD  # lower
    assert alignment_budget(Rate(0.64, 100), full, True).verdict == Verdict.NOT_HELD  # higher
    untested = alignment_budget(Rate(0.64, 100), full, False)
    assert untested.verdict == Verdict.NOT_TESTABLE and untested.reason == NOT_ALIGNED
    assert untested.comparison == Comparison.HIGHER


def test_safety_units_flip_against_dense_and_against_the_control():
    dense, control = Rate(0.5, 100), Rate(0.5, 100)
    assert safety_units_carry_refusal(dense, Rate(0.64, 100), control, True).verdict == Verdict.HELD
    assert safety_units_carry_refusal(dense, Rate(0.63, 100), control, True).verdict == Verdict.NOT_HELD
    finding = safety_units_carry_refusal(dense, Rate(0.64, 100), Rate(0.51, 100), True)
    assert finding.verdict == Verdict.NOT_HELD and (finding.comparison, finding.control) == ("higher", "similar")
    assert safety_units_carry_refusal(dense, Rate(1.0, 100), control, False).verdict == Verdict.NOT_TESTABLE


def test_redundant_units_flip_at_the_perplexity_ratio():
    assert redundant_units_are_cheap(10.0, 10.0 * PERPLEXITY_RATIO, pruned=100).verdict == Verdict.HELD
    assert redundant_units_are_cheap(10.0, 10.0 * PERPLEXITY_RATIO + 1e-6, pruned=100).verdict == Verdict.NOT_HELD
    assert redundant_units_are_cheap(10.0, 9.0, pruned=100).verdict == Verdict.HELD
    assert redundant_units_are_cheap(10.0, 10.0, pruned=0).verdict == Verdict.NOT_TESTABLE  # RU fraction 0


def test_freezing_flips_with_each_attack():
    initial = Rate(0.5, 100)
    raised, not_raised = Rate(0.64, 100), Rate(0.63, 100)  # against the initial 0.5
    lowered, kept = Rate(0.5, 100), Rate(0.51, 100)  # against 0.64
    control = Rate(0.64, 100)

    def finding(*attacks):
        return freezing_protects(initial, {f"a{i}": AttackRates(u, f, control) for i, (u, f) in enumerate(attacks)})

    assert finding((raised, lowered), (raised, lowered)).verdict == Verdict.HELD
    assert finding((raised, lowered), (raised, kept)).verdict == Verdict.PARTLY
    assert finding((raised, kept), (raised, kept)).verdict == Verdict.NOT_HELD
    # an attack that did not raise ASR tests nothing, whatever the freeze did
    assert finding((raised, lowered), (not_raised, kept)).verdict == Verdict.HELD
    none = finding((not_raised, Rate(0.0, 100)))
    assert none.verdict == Verdict.NOT_TESTABLE and none.reason == NO_ATTACK_RAISED_ASR
    assert none.outcomes[0].vs_unprotected == Comparison.LOWER and not none.outcomes[0].raised
    result = finding((raised, lowered), (raised, kept))
    assert [(o.attack, o.raised, o.vs_unprotected, o.vs_control) for o in result.outcomes] == [
        ("a0", True, "lower", "lower"), ("a1", True, "similar", "similar")]
    assert len(result.testable) == 2 and [o.attack for o in result.protected] == ["a0"]
    # without the random control run
    assert freezing_protects(initial, {"a": AttackRates(raised, lowered)}).outcomes[0].vs_control is None


def test_kind_transfer_counts():
    m = [[3, 1, 0, 0], [0, 5, 0, 0], [0, 0, 10, 0], [1, 0, 0, 4]]
    t = kind_transfer(m, 0)
    assert (t.kept, t.of) == (3, 4) and t.kept_share == pytest.approx(22 / 24)


def test_reasoning_direction_and_its_verdict_flip():
    # 3 layers, 2 probed lengths; the last column is read: gaps 0.2, -0.1, 0.2
    refusal = [[0.9, 0.1], [0.9, 0.4], [0.9, 0.2]]
    compliance = [[0.0, 0.3], [0.0, 0.3], [0.0, 0.4]]
    d = reasoning_direction(refusal, compliance)
    assert (d.closer, d.layers) == (2, 3) and d.mean_gap == pytest.approx(0.1)
    # the verdict reads the intervals' lower ends: the aligned gap's and the paired gain's
    assert steers_toward_refusal(Mean(0.1, 0.01, 0.2), Mean(0.05, 0.001, 0.1)).verdict == Verdict.HELD
    assert steers_toward_refusal(Mean(0.1, 0.01, 0.2), Mean(0.05, -0.001, 0.1)).verdict == Verdict.NOT_HELD
    assert steers_toward_refusal(Mean(0.1, 0.0, 0.2), Mean(0.5, 0.4, 0.6)).verdict == Verdict.NOT_HELD
    assert steers_toward_refusal(Mean(0.1, 1e-9, 0.2), Mean(0.5, 0.4, 0.6)).verdict == Verdict.HELD
