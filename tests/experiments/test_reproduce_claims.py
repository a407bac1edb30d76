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
    recipe_tradeoff,
    redundant_units_are_cheap,
    safety_units_carry_refusal,
    steers_toward_refusal,
)
from ssah_jax.attribution import KINDS
from tests.experiments.report_tables import (
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

REPORT = Path(__file__).resolve().parents[2] / "experiments" / "results" / "smollm2" / "REPORT.md"

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


# ---------------------------------------------------------------------------------------------
# Why a target was missed: the sweep that chose the alignment recipe


SWEEP_ROWS = [  # experiments/results/alignment_smollm2/sweep.csv's finished points
    {"point": "no_contrast", "asr": 0.0, "overrefusal": 0.6},
    {"point": "contrast_112", "asr": 0.45, "overrefusal": 0.26},
    {"point": "harmful_288", "asr": 0.27, "overrefusal": 0.32},
    {"point": "contrast_56", "asr": 0.1, "overrefusal": 0.46},
    {"point": "contrast_28", "asr": 0.01, "overrefusal": 0.56},
    {"point": "contrast_112_2ep", "asr": 0.55, "overrefusal": 0.23},
]


def test_the_committed_sweep_is_read_as_written_and_chose_the_presets_recipe():
    import csv

    from configs.reproduce import get_config
    from configs.sweeps.alignment import choose
    from experiments.reproduce import recipe_sweep

    config = get_config("smollm2_cpu")
    assert recipe_sweep(config) == SWEEP_ROWS
    with open(config.align_sweep.csv, newline="") as f:
        assert choose(list(csv.DictReader(f))) == config.align_sweep.point == "contrast_56"  # the sweep's own rule
    assert recipe_sweep(get_config("tiny")) is None  # no sweep chose the tiny recipe


def test_the_recipe_tradeoff_of_a_missed_target():
    over = recipe_tradeoff(SWEEP_ROWS, "contrast_56", "overrefusal")
    assert (over.other, over.points, over.both) == ("asr", 6, ())
    assert over.chosen == {"asr": 0.1, "overrefusal": 0.46}
    # contrast_56's ASR is exactly at the 10% target, so within it
    assert (over.best, over.best_points) == (0.46, ("contrast_56",))
    # the points refusing fewer benign prompts are the three whose ASR is above the target
    assert (over.better_count, over.better_other) == (3, (0.27, 0.55))
    asr = recipe_tradeoff(SWEEP_ROWS, "contrast_56", "asr")
    assert (asr.other, asr.best, asr.better_count, asr.better_other) == ("overrefusal", None, 0, None)
    # a point reaching both targets is named, and the least of the missed metric moves with it
    both = recipe_tradeoff([*SWEEP_ROWS, {"point": "good", "asr": 0.05, "overrefusal": 0.15}], "contrast_56",
                           "overrefusal")
    assert both.both == ("good",) and (both.best, both.best_points, both.better_count) == (0.15, ("good",), 0)
    # ties share the least value; a value within float rounding of the target is within it
    tied = recipe_tradeoff([*SWEEP_ROWS, {"point": "twin", "asr": 0.1 + 1e-15, "overrefusal": 0.46}], "contrast_56",
                           "overrefusal")
    assert tied.best_points == ("contrast_56", "twin") and tied.better_count == 3
    with pytest.raises(ValueError, match="no finished point 'nope'"):
        recipe_tradeoff(SWEEP_ROWS, "nope", "asr")


def _evals(asr: float, over: float) -> dict:
    return {"unaligned": {"mmlu": {"accuracy": 0.25, "n": 100}},
            "aligned": {"asr_no_system": {"asr": asr, "n": 200}, "overrefusal": {"refusal_rate": over, "n": 100},
                        "mmlu": {"accuracy": 0.25, "n": 100}}}


def test_the_report_says_why_a_target_was_missed(monkeypatch):
    from configs.reproduce import get_config
    from experiments.reproduce.report import targets

    monkeypatch.chdir(REPORT.parents[3])  # the report names checkout paths relative to the working directory
    config = get_config("smollm2_cpu")
    text = targets(config, _evals(0.015, 0.8))
    assert "XSTest over-refusal at most 20.0%: 80.0% [71.1, 86.7], missed by 60.0 points" in text
    assert text.endswith(
        "Why the over-refusal target was missed: the recipe is point `contrast_56` of the alignment sweep "
        "(`experiments/results/alignment_smollm2/sweep.csv`), chosen on its validation prompts (other prompts than "
        "these; the sweep's report names them), where it had ASR 10.0% and over-refusal 46.0%. None of the sweep's "
        "6 finished points reached both targets there. Of the points with ASR at most 10.0%, the lowest "
        "over-refusal was 46.0% (contrast_56); the 3 with less over-refusal had ASR 27.0%-55.0%. On the held-out "
        "prompts here (`xstest`) its over-refusal is 80.0% [71.1, 86.7]; on the sweep's validation prompts, 46.0%.")
    assert "Why" not in targets(config, _evals(0.015, 0.1))  # both reached: nothing to explain
    both = targets(config, _evals(0.5, 0.8))  # one explanation for the two, each metric's numbers in it
    assert both.count("Why") == 1 and "Why the ASR and over-refusal targets were missed" in both
    assert "No point had over-refusal at most 20.0%." in both and "its ASR is 50.0% [43.1, 56.9]" in both
    assert "not known here (no sweep chose this recipe" in targets(get_config("tiny"), _evals(0.5, 0.1))


def test_why_names_points_that_reached_both_targets(tmp_path):
    from configs.reproduce import get_config
    from experiments.reproduce.report import why_missed

    config = get_config("smollm2_cpu")
    text = Path(config.align_sweep.csv).read_text()
    (tmp_path / "sweep.csv").write_text(text + text.splitlines()[-1].replace("contrast_112_2ep", "lucky")
                                        .replace(",0.55,", ",0.02,").replace(",0.23,", ",0.12,") + "\n")
    config.align_sweep.csv = str(tmp_path / "sweep.csv")
    why = why_missed(config, {"overrefusal": Rate(0.8, 100)})
    assert "1 of the sweep's 7 finished points reached both targets there (lucky; the chosen point not among them)" \
        in why and "lowest over-refusal" not in why
    lines = text.splitlines()  # the single point with less over-refusal: its ASR, not a range
    (tmp_path / "few.csv").write_text("\n".join([lines[0], *[r for r in lines[1:] if r.startswith(("contrast_56,",
                                                                                              "harmful_288,"))]]))
    config.align_sweep.csv = str(tmp_path / "few.csv")
    assert "the 1 with less over-refusal had ASR 27.0%." in why_missed(config, {"overrefusal": Rate(0.8, 100)})


@pytest.mark.slow
def test_a_sweep_that_cannot_say_why_is_refused_by_name(tmp_path):
    from configs.reproduce import get_config
    from experiments.reproduce import recipe_sweep, validate
    from ssah_jax.runs import ConfigError

    config = get_config("smollm2_cpu")
    committed = Path(config.align_sweep.csv).read_text()

    def refused(text: str | None, match: str, **align) -> None:
        path = tmp_path / "missing.csv"
        if text is not None:
            path = tmp_path / "sweep.csv"
            path.write_text(text)
        c = get_config("smollm2_cpu")
        c.align_sweep.csv = str(path)
        c.align.update(align)
        with pytest.raises(ConfigError, match=match):
            validate(c)  # before any stage runs

    refused(None, r"^config\.align_sweep\.csv=.*missing\.csv'?: No such file")
    refused("point,status,asr\ncontrast_56,ok,0.1\n", r"^config\.align_sweep\.csv=.*: no column overrefusal ")
    refused("point,status,asr,overrefusal\ncontrast_56,ok,0.1,nan\n", r"point 'contrast_56' is finished but its")
    refused("point,status,asr,overrefusal\ncontrast_56,failed,,\nother,ok,0.1,0.3\n",
            r"^config\.align_sweep\.point='contrast_56': not a finished point .* \(finished: other\)")
    refused(committed, r"^config\.align_sweep\.point='contrast_56': its recipe \(optimizer\.learning_rate=0\.0001\) "
                       r"is not config\.align's", learning_rate=2e-4)  # (its steps: the sweep's base, not in the table)
    refused(committed, r"its recipe \(data\.dataset=bianchi_safety:160,.*\) is not config\.align's",
            dataset="bianchi_safety:160,safety_refusals_short:64,alpaca_libre:112,contrast:112")
    assert recipe_sweep(config) == SWEEP_ROWS  # the committed table agrees with the preset's align
