"""The prune experiment end to end on the demo model (a few examples), its resume and its
config checks."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ssah_jax.attribution import UnitMap, calibration
from ssah_jax.runs import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from configs.prune import get_config  # noqa: E402
from experiments import prune as prune_experiment  # noqa: E402


def small_config():
    config = get_config("quick")
    config.attribution.safety.limit = 8
    config.attribution.utility.limit = 8
    config.attribution.batch_size = 4
    config.kinds.scu = 0.02
    config.evaluation.tasks = ("asr", "mmlu")
    config.evaluation.harmful.limit = 4
    config.evaluation.mmlu.limit = 4
    config.evaluation.batch_size = 4
    return config


@pytest.mark.slow
@pytest.mark.real_model
def test_prune_runs_end_to_end_and_resumes(tmp_path, demo, monkeypatch):
    config = small_config()
    config.kinds.ucu = 0.0  # pruning no unit: the dense model, not evaluated again
    workdir = tmp_path / "prune"
    report = prune_experiment.run(config, str(workdir))
    text = report.read_text()
    for label in ("| dense |", "| − SCU |", "| − UCU |", "| − RU |", "| − random (as many as SCU) |"):
        assert label in text
    assert (workdir / "kinds_per_layer.png").read_bytes()[:4] == b"\x89PNG"

    model = demo[0]
    umap = UnitMap.load(workdir / "units", model=model)
    total = umap.num_units
    assert total == 30 * (9 * 64 + 1536)
    counts = umap.counts()
    assert counts["SCU"] == round(0.02 * total) and counts["RU"] == round(0.148 * total)
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["minus_SCU"]["pruned_units"] == counts["SCU"] == metrics["minus_random"]["pruned_units"]
    assert metrics["dense"]["pruned_units"] == 0
    assert counts["UCU"] == 0 and metrics["minus_UCU"] == metrics["dense"]
    assert not (workdir / "variants" / "minus_UCU").exists()
    assert {"asr_no_system", "asr_system", "mmlu"} <= set(metrics["dense"])

    # Killed during the last model's evaluation: the rerun reuses the scores and the finished models.
    last = workdir / "variants" / "minus_random" / "metrics.json"
    kept = json.loads(last.read_text())
    del kept["mmlu"]
    last.write_text(json.dumps(kept))
    monkeypatch.setattr(calibration, "unit_scores", lambda *a, **k: pytest.fail("scores recomputed"))
    prune_experiment.run(config, str(workdir))
    again = json.loads((workdir / "metrics.json").read_text())
    assert again["minus_SCU"] == metrics["minus_SCU"]
    assert again["minus_random"]["mmlu"]["accuracy"] == metrics["minus_random"]["mmlu"]["accuracy"]
    np.testing.assert_array_equal(UnitMap.load(workdir / "units").masks["SCU"]["mlp"], umap.masks["SCU"]["mlp"])

    other = small_config()
    other.kinds.scu = 0.05
    with pytest.raises(ConfigError, match="config.kinds"):
        prune_experiment.run(other, str(workdir))


def test_prune_rejects_bad_values(tmp_path):
    config = small_config()
    config.kinds.ru = 0.99
    with pytest.raises(ConfigError, match="config.kinds.ru"):
        prune_experiment.run(config, str(tmp_path))
    config = small_config()
    config.attribution.scorer = "flap"
    with pytest.raises(ConfigError, match="config.attribution.scorer"):
        prune_experiment.run(config, str(tmp_path))
    config = small_config()
    config.evaluation.tasks = ("asr", "bogus")
    with pytest.raises(ConfigError, match="config.evaluation.tasks"):
        prune_experiment.run(config, str(tmp_path))
