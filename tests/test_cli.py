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
    (workdir / "generations.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n{\"pro")
    generate_experiment.run(config, str(workdir))
    resumed = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert resumed == records
