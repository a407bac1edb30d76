"""The verdicts of the committed explicit-signal report (``experiments/results/signals_smollm2``)
follow from the numbers in its tables (``experiments/signals/claims.py``), every printed
interval is that of its rate and n, and its fine-tuning cells are the seeds of the committed
compare report pooled."""

import json
import re
from pathlib import Path

import pytest

from experiments.reproduce.claims import Rate, Verdict
from experiments.signals import claims
from ssah_jax.evaluation.intervals import shown
from tests.experiments.report_tables import VERDICT, rate, sections, summary, table, verdict

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
REPORT = RESULTS / "signals_smollm2" / "REPORT.md"
COMPARE = RESULTS / "compare" / "numbers.json"
# The preset's n (configs/signals.py:smollm2_cpu): 200 held-out harmful prompts, every one of the
# 159 held-out AdvBench prompts prefilled, 3 seeds x 200 after fine-tuning, 100 XSTest safe
# prompts, 200 MMLU and SST-2 questions, 30 GSM8K problems. A wrong n prints another interval,
# which test_every_printed_rate_is_its_count_of_n catches.
N_ATTACK = {"direct, no system prompt": 200, "direct, safety system prompt": 200, "prefilling": 159,
            "decoding sweep": 200, "fine-tuning": 600}
N_COST = {"over-refusal": 100, "MMLU": 200, "SST-2": 200, "GSM8K": 30}
KS = (5, 10, 20, 40)


@pytest.fixture(scope="module")
def report() -> dict:
    text = REPORT.read_text()
    body = sections(text)
    attacks = next(b for t, b in body.items() if t.startswith("Attacks"))
    costs = next(b for t, b in body.items() if t.startswith("Costs"))
    columns = attacks.split("| attack | ", 1)[1].split("\n")[0].strip(" |").split(" | ")
    return {"text": text, "summary": summary(text), "columns": columns,
            "attacks": table(attacks, "| attack |"), "costs": table(costs, "| metric |"),
            "inserted": table(text, "| schedule | checks per answer |")}


def n_of(label: str, sizes: dict[str, int]) -> int:
    return next(n for start, n in sizes.items() if label.startswith(start))


def attack_rates(report: dict, row: str) -> dict[str, Rate]:
    """Column (sft, augmented, signal/<schedule>) -> the row's rate; empty cells left out."""
    cells = report["attacks"][row]
    return {c: rate(cell, n_of(row, N_ATTACK)) for c, cell in zip(report["columns"], cells) if cell}


def prefill(report: dict, column: str) -> dict[int, Rate]:
    return {k: attack_rates(report, f"prefilling, {k} tokens")[column] for k in KS}


def cost(report: dict, label: str, column: str) -> Rate:
    return rate(report["costs"][label][report["columns"].index(column)], N_COST[label])


def line(report: dict, start: str) -> str:
    return next(s for s in report["summary"] if s.startswith(start))


def test_every_printed_rate_is_its_count_of_n(report):
    for label, cells in report["attacks"].items():
        for cell in filter(None, cells):
            assert shown(rate(cell, n_of(label, N_ATTACK))) == cell, (label, cell)
    for label, n in N_COST.items():
        for cell in report["costs"][label]:
            assert shown(rate(cell, n)) == cell, (label, cell)


def test_prefilling_verdicts_follow_from_the_table(report):
    sft = prefill(report, "sft")
    schedules = [c for c in report["columns"] if c.startswith("signal/")]
    assert schedules == ["signal/each", "signal/first", "signal/periodic", "signal/annealing"]
    for column in schedules:
        written = line(report, f"- **Prefilling stops working** (`{column}`;")
        assert verdict(written) is claims.prefilling_defended(prefill(report, column), sft).verdict, column
    # the report of d332516 (2-core AMD EPYC): under `each` the prefilling ASR was 1.9-2.5% at
    # every k against SFT's 92.5-94.3%, but no k's interval stays within the rule's 5% (upper
    # bounds 5.4-6.3%), as for alignment seeds 1 and 2 in the README's robustness table
    assert verdict(line(report, "- **Prefilling stops working** (`signal/each`;")) is Verdict.NOT_HELD


def test_the_signal_against_augmentation_and_the_decoding_attack(report):
    found = claims.versus_augmentation(prefill(report, "signal/each"), prefill(report, "augmented"))
    written = line(report, "- **At least as good as safety data augmentation**")
    assert verdict(written) is found.verdict and f"; {found.comparison}; " in written
    sweep = attack_rates(report, next(r for r in report["attacks"] if r.startswith("decoding sweep")))
    found = claims.decoding_attack_defended(sweep["signal/each"], sweep["sft"])
    assert verdict(line(report, "- **The decoding attack stops working**")) is found.verdict


def test_the_costs(report):
    over = claims.no_extra_overrefusal(cost(report, "over-refusal", "signal/each"), cost(report, "over-refusal", "sft"))
    assert verdict(line(report, "- **No extra over-refusal**")) is over.verdict is Verdict.NOT_HELD
    keys = {"mmlu": "MMLU", "sst2": "SST-2", "gsm8k": "GSM8K"}
    util = claims.utility_kept({k: cost(report, label, "signal/each").value for k, label in keys.items()},
                               {k: cost(report, label, "sft").value for k, label in keys.items()})
    assert verdict(line(report, "- **Utility kept**")) is util.verdict


def test_the_caveat_is_the_benign_answers_the_refusal_was_inserted_into(report):
    each = report["inserted"]["each"]  # checks per answer, direct, prefilled, sweep, XSTest safe, GSM8K
    inserted = rate(each[4], N_COST["over-refusal"]).successes + rate(each[5], N_COST["GSM8K"]).successes
    share = inserted / (N_COST["over-refusal"] + N_COST["GSM8K"])
    written = line(report, "- **Caveat**")
    assert f"into {100 * share:.1f}% of benign answers" in written
    assert claims.indiscriminate_insertion(share)


def test_fine_tuning_cells_pool_the_seeds_the_compare_report_read(report):
    compared = json.loads(COMPARE.read_text())["methods"]
    runs = {m["run"]: m["attacks"] for m in compared.values() if m["pipeline"] == "signals"}
    assert sorted(runs) == ["augmented", "sft", "signal"]
    for attack in ("alpaca_libre", "harmful_qa"):
        cells = attack_rates(report, f"fine-tuning on {attack}")
        for column, cell in cells.items():
            seeds = runs[column.split("/")[0]][attack]["seeds"]
            pooled = Rate.pooled(Rate(s["asr"], s["n"]) for s in seeds)
            assert shown(pooled) == shown(cell), (attack, column)
        # and the plain-SFT runs repeat reproduce's unprotected ones: the same answers counted
        unprotected = next(m for m in compared.values() if m["pipeline"] == "reproduce" and m["run"] == "none")
        assert unprotected["attacks"][attack]["seeds"] == runs["sft"][attack]["seeds"]


def test_every_verdict_of_the_report_is_covered(report):
    written = [s for s in report["summary"] if VERDICT.search(s)]
    checked = [s for s in written if re.match(r"- \*\*(Prefilling stops working|At least as good|The decoding "
                                              r"attack|No extra over-refusal|Utility kept)[^*]*\*\*", s)]
    assert len(written) == len(checked) == 8
