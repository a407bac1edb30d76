"""``ssah-jax evaluate`` (``experiments/evaluate.py``): metrics, report and resume after a kill,
over-refusal on another benign set, and its config checks (among them the safety signal's
decoding)."""

import copy
import json

import pytest

from configs.evaluate import get_config
from experiments import evaluate
from ssah_jax.runs import ConfigError


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_a_signal_threshold_outside_0_1_names_its_key(threshold):
    config = get_config("quick")
    evaluate.validate(config)
    config = copy.deepcopy(config)
    config.signal.threshold = threshold
    with pytest.raises(ConfigError, match=r"^config\.signal\.threshold=.*: must be a probability in \[0, 1\]$"):
        evaluate.validate(config)


def test_overrefusal_on_another_benign_set(tmp_path, tiny_chat_model):
    """``overrefusal.dataset``: a validation set that is not XSTest (its rows are that set's)."""
    from ssah_jax.data import load_mixture

    config = get_config("quick")
    config.model = str(tiny_chat_model)
    config.tasks = ("overrefusal",)
    config.overrefusal.dataset, config.overrefusal.limit, config.max_new_tokens = "benign_contrast_validation", 3, 2
    report = evaluate.run(config, str(tmp_path / "eval")).read_text()
    rows = [json.loads(r) for r in (tmp_path / "eval" / "rows" / "overrefusal.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r.prompt for r in load_mixture("benign_contrast_validation:3")[0]]
    assert "over-refusal, benign_contrast_validation (refusal rate)" in report
    config.overrefusal.dataset = "xstest:nope"
    with pytest.raises(ConfigError, match="config.overrefusal.dataset"):
        evaluate.run(config, str(tmp_path / "bad"))


@pytest.mark.slow
def test_evaluate_writes_metrics_and_report_and_resumes(tmp_path):
    config = get_config("quick")
    config.tasks = ("asr", "overrefusal", "sst2", "perplexity")
    config.harmful.limit = config.overrefusal.limit = 3
    config.max_new_tokens = 8
    config.sst2.limit = config.perplexity.limit = 4
    workdir = tmp_path / "eval"
    report = evaluate.run(config, str(workdir))
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
    evaluate.run(config, str(workdir))
    again = json.loads((workdir / "metrics.json").read_text())
    assert over.read_text().splitlines() == kept
    assert again["sst2"] == metrics["sst2"] and again["overrefusal"]["n"] == 3


def test_evaluate_rejects_bad_values(tmp_path):
    config = get_config("quick")
    config.tasks = ("asr", "bogus")
    with pytest.raises(ConfigError, match="config.tasks"):
        evaluate.run(config, str(tmp_path))
    config = get_config("quick")
    config.sweep.top_ps = (1.5,)
    with pytest.raises(ConfigError, match="config.sweep.top_ps"):
        evaluate.run(config, str(tmp_path))
