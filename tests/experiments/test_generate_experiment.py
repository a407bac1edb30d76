"""``ssah-jax generate`` (``experiments/generate.py``): its report, resume after a kill, answers to
a kit mixture as training data, and its config checks."""

import json

import pytest

from configs.generate import get_config
from experiments import generate as generate_experiment
from ssah_jax.runs import ConfigError


def test_out_of_range_value_is_named(tmp_path):
    config = get_config("quick")
    config.top_p = 1.5
    with pytest.raises(ConfigError, match="config.top_p=1.5"):
        generate_experiment.run(config, str(tmp_path))


@pytest.mark.slow
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
    # A re-run of the finished run answers nothing and keeps the timing of the runs that did.
    first = [json.loads(line) for line in (workdir / "timing.jsonl").read_text().splitlines()]
    assert [t["answered"] for t in first] == [3, 1]
    text = generate_experiment.run(config, str(workdir)).read_text()
    total = sum(t["seconds"] for t in first)
    assert f"Answered in {total:.1f} s, compilation included (3 prompts in {first[0]['seconds']:.1f} s, " in text
    assert "; 3 invocations of this workdir)" in text


@pytest.mark.slow
def test_generate_answers_a_dataset_into_training_data(tmp_path):
    """``prompts_dataset``: the prompts of a kit mixture; generations.jsonl is then a mixture
    component (the contrast data of the alignment)."""
    from ssah_jax.data import load_mixture

    config = get_config("quick")
    config.prompts_dataset = "benign_contrast:3"
    config.max_new_tokens = 4
    config.batch_size = 2
    workdir = tmp_path / "run"
    generate_experiment.run(config, str(workdir))
    records = load_mixture(f"{workdir / 'generations.jsonl'}:3")[0]
    assert [r.prompt for r in records] == [r.prompt for r in load_mixture("benign_contrast:3")[0]]
    assert all(r.response for r in records)
    config.prompts_file = str(tmp_path / "prompts.txt")
    with pytest.raises(ConfigError, match="config.prompts_dataset and config.prompts_file: set one of them"):
        generate_experiment.run(config, str(tmp_path / "other"))
    config.prompts_file, config.prompts_dataset = "", "nope:3"
    with pytest.raises(ConfigError, match="config.prompts_dataset='nope:3': .*unknown dataset 'nope'"):
        generate_experiment.run(config, str(tmp_path / "other"))
