"""The ssah-jax entry point and the generate experiment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import generate as generate_experiment
from ssah_jax.runs import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs.generate import get_config  # noqa: E402


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ssah_jax.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_unknown_config_key_is_named(tmp_path):
    result = _cli("generate", "--config=configs/generate.py:quick", f"--workdir={tmp_path}", "--config.bogus_key=1")
    assert result.returncode != 0
    assert "bogus_key" in result.stderr


def test_unknown_experiment_lists_the_known_ones(tmp_path):
    result = _cli("nonsense", "--config=configs/generate.py:quick", f"--workdir={tmp_path}")
    assert result.returncode != 0 and "generate" in result.stderr


def test_out_of_range_value_is_named(tmp_path):
    config = get_config("quick")
    config.top_p = 1.5
    with pytest.raises(ConfigError, match="config.top_p=1.5"):
        generate_experiment.run(config, str(tmp_path))


def test_generate_writes_report_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nName a fruit.\nSay hello.\n")
    config = get_config("quick")
    config.prompts_file = str(prompts)
    config.max_new_tokens = 6
    config.batch_size = 2
    workdir = tmp_path / "run"
    report = generate_experiment.run(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts.read_text().splitlines()
    assert all(r["answer"] for r in records)
    assert "Name a fruit." in report.read_text()
    assert json.loads((workdir / "config.json").read_text())["max_new_tokens"] == 6

    # A run killed after its first batch resumes with the rest, and keeps what was done.
    # The first answer is marked, so a rerun that regenerated it instead would fail.
    records[0]["answer"] = "kept from the first run"
    (workdir / "generations.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n{\"pro")
    generate_experiment.run(config, str(workdir))
    resumed = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert resumed == records


def test_evaluate_writes_metrics_and_report_and_resumes(tmp_path):
    from configs.evaluate import get_config as evaluate_config
    from experiments import evaluate as evaluate_experiment

    config = evaluate_config("quick")
    config.tasks = ("asr", "overrefusal", "sst2", "perplexity")
    config.harmful.limit = config.overrefusal.limit = 3
    config.max_new_tokens = 8
    config.sst2.limit = config.perplexity.limit = 4
    workdir = tmp_path / "eval"
    report = evaluate_experiment.run(config, str(workdir))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert set(metrics) == {"asr_no_system", "asr_system", "overrefusal", "sst2", "perplexity"}
    assert metrics["asr_system"]["n"] == 3 and 0 <= metrics["asr_system"]["asr"] <= 1
    assert metrics["sst2"]["n"] == 4 and metrics["perplexity"]["perplexity"] > 1
    rows = (workdir / "rows" / "asr_system.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all("answer" in json.loads(r) and "refused" in json.loads(r) for r in rows)
    text = report.read_text()
    assert "XSTest safe prompts" in text and "SST-2" in text

    # Killed during over-refusal: its metric is missing and its rows file is torn. The rerun
    # keeps every finished task and the rows already written, and completes the rest.
    over = workdir / "rows" / "overrefusal.jsonl"
    first = {**json.loads(over.read_text().splitlines()[0]), "answer": "kept from the first run"}
    kept = [json.dumps(first)] + over.read_text().splitlines()[1:]
    over.write_text(kept[0] + "\n" + kept[1][:10])
    del metrics["overrefusal"]
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    evaluate_experiment.run(config, str(workdir))
    again = json.loads((workdir / "metrics.json").read_text())
    assert over.read_text().splitlines() == kept
    assert again["sst2"] == metrics["sst2"] and again["overrefusal"]["n"] == 3


def test_evaluate_rejects_bad_values(tmp_path):
    from configs.evaluate import get_config as evaluate_config
    from experiments import evaluate as evaluate_experiment

    config = evaluate_config("quick")
    config.tasks = ("asr", "bogus")
    with pytest.raises(ConfigError, match="config.tasks"):
        evaluate_experiment.run(config, str(tmp_path))
    config = evaluate_config("quick")
    config.sweep.top_ps = (1.5,)
    with pytest.raises(ConfigError, match="config.sweep.top_ps"):
        evaluate_experiment.run(config, str(tmp_path))
