"""ssah-jax compare: the table and the prefilling rows are the numbers of the two runs' reports
(their numbers.json, written from the workdirs by ssah_jax.stages.write_numbers), each method set
against its own pipeline's unprotected runs; runs that differ in what the comparison holds fixed,
a maker-aligned reproduce run, a missing run and a report without numbers.json are refused."""

import json
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from experiments import compare
from experiments.reproduce.subruns import attack_dir as reproduce_run
from experiments.signals import attack_dir as signals_run
from ssah_jax import stages
from ssah_jax.evaluation.intervals import Rate
from ssah_jax.runs import ConfigError, config_from_file

ROOT = Path(__file__).resolve().parents[2]
N = 200  # prompts per attack run
SEED_STEP = 0.1  # each seed's ASR differs, so a table of one seed's runs would not pass for the pooled one


def as_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def reports(rep_dir: Path, sig_dir: Path) -> ConfigDict:
    """The report directories the two pipelines would write from these workdirs (their
    config.json and numbers.json), and the compare config that reads them."""
    for workdir in (rep_dir, sig_dir):
        report = workdir / "report"
        write(report / "config.json", json.loads((workdir / "config.json").read_text()))
        stages.write_numbers(workdir, report / stages.NUMBERS)
    return ConfigDict({"reproduce": str(rep_dir / "report"), "signals": str(sig_dir / "report"), "report_dir": ""})


def workdirs(tmp_path: Path, asr: dict[str, float], **signals_changes) -> tuple[Path, Path, dict]:
    """Finished-looking reproduce and signals workdirs of the tiny presets (every attack run of
    each method with ASR ``asr[method] + SEED_STEP * seed``, signals' prefilling evaluations),
    and the compare config that reads their reports."""
    rep = as_dict(config_from_file(ROOT / "configs" / "reproduce.py", "tiny"))
    sig = as_dict(config_from_file(ROOT / "configs" / "signals.py", "tiny"))
    # the tiny signals preset trains longer examples and attacks with one seed
    sig["align"]["max_length"], sig["attack"]["seeds"] = rep["align"]["max_length"], rep["attack"]["seeds"]
    for config in (rep, sig):  # a second attack (the tiny presets have one): a column per attack
        config["attack"]["datasets"]["alpaca_libre"] = {"dataset": "alpaca_libre", "split": "", "steps": 1,
                                                        "max_length": 256}
    for key, value in signals_changes.items():
        section, _, leaf = key.rpartition(".")
        node = sig
        for part in filter(None, section.split(".")):
            node = node[part]
        node[leaf] = value
    rep_dir, sig_dir = tmp_path / "reproduce", tmp_path / "signals"
    write(rep_dir / "config.json", rep)
    write(sig_dir / "config.json", sig)
    for attack in rep["attack"]["datasets"]:
        for seed in rep["attack"]["seeds"]:
            for variant in rep["attack"]["variants"]:
                run = rep_dir / reproduce_run(attack, variant, seed)
                write(run / "eval" / "metrics.json",
                      {"asr_no_system": {"asr": asr.get(variant, 0.5) + SEED_STEP * seed, "n": N}})
                write(run / "stage.json", {"code": ["abc1234"]})
            for model in ("sft", "augmented", "signal"):
                run = sig_dir / signals_run(model, attack, seed)
                write(run / "eval" / "metrics.json",
                      {"asr_no_system": {"asr": asr.get(model, 0.5) + SEED_STEP * seed, "n": N}})
                write(run / "stage.json", {"code": ["abc1234+local changes"]})
    ks = sig["evaluation"]["prefill"]["tokens"]
    first = sig["decoding"]["schedules"][0]
    for stage, value in (("eval_sft", 0.8), ("eval_augmented", 0.4), (f"eval_signal/{first}", 0.0)):
        write(sig_dir / stage / "metrics.json", {**{f"prefill_{k}": {"asr": value, "n": 159} for k in ks},
                                                 "overrefusal": {"refusal_rate": 1 - value, "n": 250},
                                                 "mmlu": {"accuracy": 0.3, "n": 100},
                                                 "sst2": {"accuracy": 0.7, "n": 200},
                                                 "gsm8k": {"accuracy": 0.1 + value / 10, "n": 30}})
        write(sig_dir / stage / "stage.json", {"code": ["abc1234"]})
    return rep_dir, sig_dir, reports(rep_dir, sig_dir)


def test_the_report_is_the_runs_numbers_each_against_its_own_unprotected_runs(tmp_path):
    _, _, config = workdirs(tmp_path, {"none": 0.6, "scu_cu": 0.2, "lora": 0.6, "sft": 0.3, "signal": 0.0})
    path = compare.run(config, str(tmp_path / "compare"))
    text = path.read_text()
    seeds = config_from_file(ROOT / "configs" / "reproduce.py", "tiny").attack.seeds
    assert len(seeds) == 2
    # the two seeds' answers counted together: the mean of v and v + SEED_STEP
    none, frozen, sft, signal = (Rate(v + SEED_STEP / 2, 2 * N) for v in (0.6, 0.2, 0.3, 0.0))
    assert f"| no protection (reproduce) | {none} | {none} |" in text
    assert f"| SSAH: freeze SCU + all CU | {frozen}, lower | {frozen}, lower |" in text
    assert f"| LoRA | {none}, similar | {none}, similar |" in text
    assert f"| explicit safety signal (Li & Kim 2025) | {signal}, lower | {signal}, lower |" in text
    assert f"| no protection (signals: plain SFT) | {sft} | {sft} |" in text
    assert "| safety data augmentation | 80.0%" not in text and "| safety data augmentation | 40.0%" in text
    # the costs before any attack: the metrics every model has, each against plain SFT
    assert "| model | over-refusal | MMLU | SST-2 | GSM8K |" in text
    assert (f"| safety data augmentation | {Rate(0.6, 250)}, higher | {Rate(0.3, 100)}, similar | "
            f"{Rate(0.7, 200)}, similar | {Rate(0.14, 30)}, similar |") in text
    assert "**Note**: the stages came from different code" in text  # abc1234 and abc1234+local changes
    rep = config_from_file(ROOT / "configs" / "reproduce.py", "tiny").attack
    runs_each = 2 * len(seeds)  # a method's attack runs: two attacks (workdirs adds one)
    assert f"- `abc1234`: {len(rep.variants) * runs_each + 3} stages" in text  # + signals' three evaluations
    assert f"- `abc1234+local changes`: {3 * runs_each} stages" in text  # signals' attack runs
    # it links the two reports it read, from where it is written
    assert "`ssah-jax reproduce` ([report/REPORT.md](../../reproduce/report/REPORT.md))" in text
    numbers = json.loads((path.parent / "numbers.json").read_text())
    assert numbers["methods"]["LoRA"]["attacks"]["harmful_qa"]["pooled"]["n"] == 2 * N
    assert [round(r["asr"], 2) for r in numbers["methods"]["LoRA"]["attacks"]["harmful_qa"]["seeds"]] == [0.6, 0.7]
    assert (path.parent / "compare.png").stat().st_size > 1000


def test_workdirs_that_differ_in_what_is_held_fixed_are_refused(tmp_path):
    _, _, config = workdirs(tmp_path, {}, **{"align.steps": 3, "attack.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="align.steps: 2 -> 3.*attack.learning_rate"):
        compare.run(config, str(tmp_path / "compare"))


def test_a_maker_aligned_run_a_missing_run_or_a_report_without_numbers_is_refused(tmp_path):
    rep_dir, sig_dir, config = workdirs(tmp_path, {})
    rep = json.loads((rep_dir / "config.json").read_text())
    (rep_dir / "report" / "config.json").write_text(json.dumps({**rep, "maker_aligned": True}))
    with pytest.raises(ConfigError, match="aligned by its makers"):
        compare.run(config, str(tmp_path / "compare"))
    (rep_dir / reproduce_run("harmful_qa", "lora", 1) / "stage.json").unlink()  # that run did not finish
    reports(rep_dir, sig_dir)
    missing = r"config.reproduce=.*/reproduce/report: .*no finished stage attacks/harmful_qa/lora/seed1"
    with pytest.raises(ConfigError, match=missing):
        compare.run(config, str(tmp_path / "compare"))
    (sig_dir / "report" / stages.NUMBERS).unlink()
    with pytest.raises(ConfigError, match=r"config.signals=.*holds no numbers.json"):
        compare.run(config, str(tmp_path / "compare"))


def test_numbers_hold_each_stage_s_metrics_and_record_but_not_a_nested_stage_s(tmp_path):
    write(tmp_path / "a" / "stage.json", {"code": ["abc1234"], "seconds": 3.0, "given": {"big": 1}})
    write(tmp_path / "a" / "metrics.json", {"x": 1})
    write(tmp_path / "a" / "eval" / "metrics.json", {"asr": 0.5})
    write(tmp_path / "a" / "inner" / "stage.json", {"code": ["def5678"]})
    write(tmp_path / "a" / "inner" / "metrics.json", {"y": 2})
    write(tmp_path / "b" / "metrics.json", {"z": 3})  # not finished: no record
    numbers = json.loads(stages.write_numbers(tmp_path, tmp_path / "numbers.json").read_text())["stages"]
    assert numbers == {"a": {"code": ["abc1234"], "seconds": 3.0, "files": {"metrics.json": {"x": 1},
                                                                            "eval/metrics.json": {"asr": 0.5}}},
                       "a/inner": {"code": ["def5678"], "files": {"metrics.json": {"y": 2}}}}


def test_a_key_added_later_at_its_old_value_is_no_difference(tmp_path):
    # a report written before signal.probe existed (its config lacks the key) beside one written
    # after, at the key's old value: the same recipe (the pipelines' ADDED)
    rep_dir, _, config = workdirs(tmp_path, {})
    rep = json.loads((rep_dir / "report" / "config.json").read_text())
    del rep["finetune"]["signal"]["probe"]
    (rep_dir / "report" / "config.json").write_text(json.dumps(rep))
    assert compare.run(config, str(tmp_path / "compare")).exists()
    rep["finetune"]["signal"]["probe"] = True  # away from the old value: a different recipe
    (rep_dir / "report" / "config.json").write_text(json.dumps(rep))
    with pytest.raises(ConfigError, match="finetune.signal.probe"):
        compare.run(config, str(tmp_path / "compare"), overwrite=True)


def test_a_cost_missing_from_an_evaluation_is_refused_naming_it(tmp_path):
    _, sig_dir, config = workdirs(tmp_path, {})
    metrics = json.loads((sig_dir / "eval_augmented" / "metrics.json").read_text())
    del metrics["gsm8k"]
    write(sig_dir / "eval_augmented" / "metrics.json", metrics)
    reports(tmp_path / "reproduce", sig_dir)
    with pytest.raises(ConfigError, match=r"config.signals=.*stage eval_augmented has no gsm8k in its metrics.json"):
        compare.run(config, str(tmp_path / "compare"))


def test_an_interrupted_stage_copy_is_not_a_finished_stage(tmp_path):
    write(tmp_path / "a.copying" / "stage.json", {"code": ["abc1234"]})  # killed before its rename
    write(tmp_path / "b" / "stage.json", {"code": ["abc1234"]})
    numbers = json.loads(stages.write_numbers(tmp_path, tmp_path / "numbers.json").read_text())["stages"]
    assert list(numbers) == ["b"]
