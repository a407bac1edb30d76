"""``ssah-jax reproduce``: the whole SSAH pipeline on a tiny model (wiring, frozen weights,
resume, determinism of a re-run stage, refusal of a changed config), and the held-out
evaluation sets of the real presets."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from experiments import reproduce
from experiments.reproduce import report as report_module
from experiments.reproduce.subruns import FROZEN
from ssah_jax.runs import config_from_file, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI on one CPU device


def command(workdir: Path, model: Path, report: Path, *overrides: str, preset: str = "tiny") -> list[str]:
    return [sys.executable, "-m", "ssah_jax.cli", "reproduce", f"--config=configs/reproduce.py:{preset}",
            f"--workdir={workdir}", f"--config.model={model}", f"--config.report_dir={report}", *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def pipeline(tiny_chat_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    workdir, report = base / "run", base / "report"
    done = run(command(workdir, tiny_chat_model, report))
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, report, tiny_chat_model


@pytest.mark.slow
def test_pipeline_writes_the_report_with_every_section_and_plot(pipeline):
    workdir, report, _ = pipeline
    text = (report / "REPORT.md").read_text()
    for heading in ("## Summary: which claims held", "## 1. Alignment", "## 2. Pruning", "## 3. Fine-tuning attacks",
                    "## 4. Attribute transfer", "## 5. Reasoning-direction probing", "## Stage wall times"):
        assert heading in text
    for png in ("attacks.png", "probing.png", "transfer.png", "kinds_per_layer.png", "align_full_loss.png"):
        assert (report / png).stat().st_size > 1000
    # the held-out harmful prompts share nothing with the alignment data (the stages that evaluate
    # the aligned model on them recorded it; the report reads their records)
    assert "found in the alignment data: evaluation 0, table 0, attack 0." in text
    for stage in ("eval_aligned", "prune_aligned", "attacks/initial"):
        overlap = json.loads((workdir / stage / "overlap.json").read_text())
        assert overlap["in_training_data"] == 0 and overlap["prompts"] > 0, stage
    # numbers.json beside the report holds every finished stage's metrics and record
    numbers = json.loads((report / "numbers.json").read_text())["stages"]
    assert numbers["eval_aligned"]["files"]["metrics.json"] == json.loads(
        (workdir / "eval_aligned" / "metrics.json").read_text())
    runs_here = {str(p.parent.relative_to(workdir)) for p in workdir.glob("**/stage.json")}
    assert set(numbers) == runs_here and any(s.startswith("attacks/") and s != "attacks/initial" for s in runs_here)
    # the layer block is chosen among the blocks whose removal leaves a working language model
    layers = json.loads((workdir / "layers" / "layers.json").read_text())
    chosen = next(b for b in layers["blocks"] if b["layers"] == layers["chosen"])
    assert chosen["perplexity"] <= layers["max_perplexity_ratio"] * layers["dense_perplexity"]
    assert len(layers["blocks"]) == 2 - layers["size"] + 1  # every contiguous block of the 2-layer model
    # every attack run of every protection and seed is in the table; the seeds are different runs
    config = config_from_file(ROOT / "configs" / "reproduce.py", "tiny")
    for attack in config.attack.datasets:
        for variant in config.attack.variants:
            for seed in config.attack.seeds:
                assert (workdir / "attacks" / attack / variant / f"seed{seed}" / "eval" / "metrics.json").exists()
    runs_ = [workdir / "attacks" / "harmful_qa" / "none" / f"seed{seed}" for seed in config.attack.seeds]
    losses = [[r["loss"] for r in read_jsonl(run_ / "metrics.jsonl") if r["kind"] == "train"] for run_ in runs_]
    assert losses[0] != losses[1]
    assert "seeds 0, 1" in text and "the seeds' answers pooled" in text
    # each protection's trained parameters (its first run's), and the time per run
    first = next(iter(config.attack.datasets))
    trained = text.split("Parameters each protection trained")[1].split("\n")[0]
    for variant in config.attack.variants:
        m = json.loads((workdir / "attacks" / first / variant / f"seed{config.attack.seeds[0]}" / "metrics.json")
                       .read_text())
        assert f"{report_module.VARIANT_LABELS[variant]} {m['trained_elements']:,} " in trained, variant
    steps = [m["train"]["seconds"] / m["train"]["steps_run"] for m in (
        json.loads(f.read_text()) for f in workdir.glob("attacks/*/*/seed*/metrics.json"))]
    assert f"training {report_module.spread(steps, 's per step')}" in text


def test_a_time_spread_prints_its_ends_or_one_value():
    assert report_module.spread([2.84, 5.8, 4.6], "s per step") == "2.8-5.8 s per step (mean 4.4)"
    assert report_module.spread([0.61, 0.64], "min") == "0.6 min each"  # not '0.6-0.6 min'


def test_the_alignment_trains_on_the_contrast_stage_answers(pipeline):
    workdir, report, _ = pipeline
    config = config_from_file(ROOT / "configs" / "reproduce.py", "tiny")
    prompts = read_jsonl(workdir / "contrast" / "prompts.jsonl")
    answers = read_jsonl(workdir / "contrast" / "generations.jsonl")
    assert len(prompts) == len(answers) == 6 and [a["prompt"] for a in answers] == [p["prompt"] for p in prompts]
    trained = json.loads((workdir / "align_full" / "config.json").read_text())["data"]["dataset"]
    assert f"{workdir / 'contrast' / 'generations.jsonl'}:4" in trained.split(",")
    # the alignment's identity names the contrast stage, and a moved workdir keeps it
    record = json.loads((workdir / "align_full" / "stage.json").read_text())
    assert "contrast" in record["inputs"]
    assert "<workdir>/contrast/generations.jsonl:4" in record["given"]["data.dataset"]
    assert config.contrast.prompts in (report / "REPORT.md").read_text()


def test_the_report_of_a_workdir_without_overlap_records_says_so(pipeline, tmp_path):
    """A workdir of an earlier version has no overlap.json: the report says so in its place and
    recomputes nothing (it reads only what the stages wrote)."""
    workdir, report, _ = pipeline
    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    moved = [(workdir / s / "overlap.json", tmp_path / f"{i}.json")
             for i, s in enumerate(("eval_aligned", "prune_aligned", "attacks/initial"))]
    for src, dst in moved:
        shutil.move(src, dst)
    try:
        (tmp_path / "report").mkdir()
        text = report_module.write(config, workdir, tmp_path / "report",
                                   read_jsonl(workdir / "invocations.jsonl")).read_text()
    finally:
        for src, dst in moved:
            shutil.move(dst, src)
    line = next(line for line in text.splitlines() if "found in the alignment data" in line)
    assert "found in the alignment data: not recorded: this workdir has no `eval_aligned/overlap.json`" in line
    # everything else is as rendered from the full workdir
    assert [t for t in text.splitlines() if t != line] == [
        t for t in (report / "REPORT.md").read_text().splitlines() if "found in the alignment data" not in t]


def test_frozen_parameters_stay_bit_identical_in_every_run(pipeline):
    workdir, _, _ = pipeline
    ru = json.loads((workdir / "align_ru" / "metrics.json").read_text())
    assert ru["frozen_unchanged"] and 0 < ru["trained_elements"] < 0.25 * ru["total_elements"]
    full = json.loads((workdir / "align_full" / "metrics.json").read_text())
    assert full["trained_elements"] == full["total_elements"]
    paths = list((workdir / "attacks").glob("*/*/seed*/metrics.json"))
    assert len(paths) == 1 * 6 * 2  # attacks x variants x seeds
    for path in paths:
        m = json.loads(path.read_text())
        assert m["frozen_unchanged"], path
        variant = path.parent.parent.name
        assert (m["frozen_elements"] > 0) == (variant in FROZEN), path
    # checkpoints are dropped once a run finished; only the transfer attack's export is kept
    assert not list(workdir.glob("**/checkpoints"))
    kept = [p.parent.parent.relative_to(workdir).as_posix() for p in workdir.glob("attacks/**/export/config.json")]
    assert kept == ["attacks/harmful_qa/none/seed0"]


@pytest.mark.slow
def test_a_rerun_stage_gives_the_same_numbers_and_changed_keys_are_refused(pipeline):
    workdir, report, model = pipeline
    stage = workdir / "attacks" / "harmful_qa" / "none" / "seed1"
    losses = [r for r in read_jsonl(stage / "metrics.jsonl") if r["kind"] == "train"]
    answers = read_jsonl(stage / "eval" / "rows" / "asr_no_system.jsonl")
    shutil.rmtree(stage)
    again = run(command(workdir, model, report))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[units_unaligned] finished in an earlier run" in again.stdout
    assert [r for r in read_jsonl(stage / "metrics.jsonl") if r["kind"] == "train"] == losses
    assert read_jsonl(stage / "eval" / "rows" / "asr_no_system.jsonl") == answers

    changed = run(command(workdir, model, report, "--config.attack.learning_rate=0.001"))
    assert changed.returncode != 0
    assert "config.attack.learning_rate" in changed.stderr
    missing = run(command(workdir / "elsewhere", model, report, "--config.stages=attacks"))
    assert missing.returncode != 0 and "needs ['prune_aligned', 'layers'] finished first" in missing.stderr


@pytest.mark.slow
def test_a_maker_aligned_model_is_studied_without_aligning_it(tiny_chat_model, tmp_path):
    workdir, report = tmp_path / "run", tmp_path / "report"
    done = run(command(workdir, tiny_chat_model, report, preset="tiny_maker"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in workdir.iterdir() if (p / "stage.json").exists() or p.name == "attacks") == [
        "attacks", "eval_aligned", "layers", "prune_aligned"]
    text = (report / "REPORT.md").read_text()
    assert "## 1. The model, aligned by its makers" in text and "## 2. Pruning" in text and "## 3. Fine-tuning" in text
    assert "## 4. Attribute transfer" not in text and "- **The model refuses** (precondition)" in text
    # the attacks fine-tune the given model itself
    trained = json.loads((workdir / "attacks" / "harmful_qa" / "none" / "seed0" / "config.json").read_text())
    assert trained["model"] == str(tiny_chat_model)


@pytest.mark.parametrize("preset", ["smollm2_cpu", "smollm2_gpu", "qwen_cpu", "qwen_gpu", "llama2_7b_8gpu"])
def test_presets_hold_out_every_trained_prompt_and_validate(preset):
    config = config_from_file(ROOT / "configs" / "reproduce.py", preset)
    reproduce.validate(config)
    assert reproduce.training_overlap(config) == {"evaluation": 0, "table": 0, "attack": 0}
    # every ASR of the report is on one set of at least 200 held-out prompts
    main = [r.prompt for r in reproduce.heldout_prompts(config)]
    from ssah_jax.evaluation import harmful_records

    assert len(set(main)) == len(main) >= 200
    for section in (config.table, config.attack.evaluation):
        assert [r.prompt for r in harmful_records(section.harmful.dataset, section.harmful.exclude, None)] == main
