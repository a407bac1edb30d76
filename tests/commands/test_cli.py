"""The ssah-jax entry point (help, one-line errors with exit status 2) and the generate experiment."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import generate as generate_experiment
from ssah_jax import cli
from ssah_jax.runs import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from configs.generate import get_config  # noqa: E402

# The CLI on one CPU device, without a traceback forced on by the caller's environment.
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cli.TRACEBACK_ENV)}
# What libraries may log to stderr beside our line (absl-format records, Python warnings).
LIBRARY_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING:|\S+Warning: )")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ssah_jax.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or ENV, timeout=600)


def _generate(workdir, *overrides, env=None):
    return run_cli("generate", "--config=configs/generate.py:quick", f"--workdir={workdir}", *overrides, env=env)


def error_line(result) -> str:
    """The one line a failed command printed: exit status 2, a single ``ssah-jax:`` line on
    stderr and nothing else there but library log records (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("ssah-jax: ")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert all(line in ours or LIBRARY_LOG.match(line) for line in lines), result.stderr[-3000:]
    return ours[0]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_experiment_with_its_presets_and_exits_0(flag):
    result = run_cli(flag)
    assert result.returncode == 0, result.stderr
    names = cli.experiments()
    assert {"generate", "evaluate", "prune", "finetune", "reproduce"} <= set(names)
    for name in names:
        spec = importlib.util.spec_from_file_location(f"_help_{name}", REPO / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        summary = [line for line in result.stdout.splitlines() if line.startswith(f"  {name} ")]
        assert len(summary) == 1 and len(summary[0].split(maxsplit=1)[1]) > 20, result.stdout
        presets = result.stdout.split(summary[0], 1)[1].splitlines()[1]
        assert presets.split("presets: ")[1].replace(" (default)", "").split(", ") == list(module.PRESETS)


def test_experiment_help_shows_its_config_keys_with_their_values():
    result = run_cli("generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "  max_new_tokens = 128\n" in result.stdout and "  temperature = 0.0\n" in result.stdout
    quick = run_cli("generate", "--config=configs/generate.py:quick", "-h")
    assert quick.returncode == 0 and "  max_new_tokens = 16\n" in quick.stdout
    nested = run_cli("finetune", "--help")
    assert nested.returncode == 0 and "  optimizer.learning_rate = 2e-05\n" in nested.stdout
    assert "every key but log_every, eval_every" in nested.stdout  # what a resumed run may change


def test_unknown_experiment_is_named(tmp_path):
    line = error_line(run_cli("nonsense", "--config=configs/generate.py:quick", f"--workdir={tmp_path}"))
    assert "unknown experiment 'nonsense'" in line and "generate" in line


def test_unknown_config_key_is_named_plainly(tmp_path):
    line = error_line(_generate(tmp_path / "run", "--config.bogus_key=1"))
    assert "unknown config key config.bogus_key " in line and "\\" not in line and "\"'" not in line
    nested = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={tmp_path / 'run'}",
                             "--config.harmful.bogus=1"))
    assert "unknown config key config.harmful.bogus " in nested
    assert not (tmp_path / "run").exists()


def test_config_errors_are_one_line_and_make_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    assert error_line(_generate(workdir, "--config.top_p=1.5")) == "ssah-jax: config.top_p=1.5: must be in (0, 1]"
    assert "could not convert string to float: 'abc'" in error_line(_generate(workdir, "--config.top_p=abc"))
    preset = error_line(run_cli("generate", "--config=configs/generate.py:nope", f"--workdir={workdir}"))
    assert "unknown preset 'nope'" in preset
    assert "--workdir is required" in error_line(run_cli("generate", "--config=configs/generate.py:quick"))
    assert not workdir.exists()
    # a list-valued key given as a comma-separated string is the list it names
    listed = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={workdir}",
                                "--config.tasks=asr, bogus"))
    assert "config.tasks=('asr', 'bogus'): must be a non-empty subset" in listed


def test_bad_config_files_are_one_line(tmp_path):
    syntax, no_function = tmp_path / "syntax.py", tmp_path / "empty.py"
    syntax.write_text("def get_config(:\n")
    no_function.write_text("X = 1\n")
    workdir = tmp_path / "run"
    line = error_line(run_cli("generate", f"--config={syntax}", f"--workdir={workdir}"))
    assert f"{syntax}:1: invalid syntax" in line
    assert "defines no get_config" in error_line(run_cli("generate", f"--config={no_function}", f"--workdir={workdir}"))
    preset = error_line(run_cli("generate", "--config=configs/generate.py:nope", f"--workdir={workdir}"))
    assert preset.startswith("ssah-jax: --config=configs/generate.py:nope: unknown preset 'nope'")  # no "ValueError:"
    other = error_line(run_cli("generate", "--config=configs/prune.py:quick", f"--workdir={workdir}"))
    assert "not a generate config" in other and "config.max_new_tokens" in other
    assert not workdir.exists()


def test_a_directory_that_is_not_a_model_is_one_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    line = error_line(_generate(tmp_path / "run", f"--config.model={folder}"))
    assert str(folder) in line and "not a model directory" in line
    assert not (tmp_path / "run").exists()


def test_a_workdir_of_another_experiment_is_named(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"attribution": {}, "kinds": {}}')
    line = error_line(_generate(workdir))
    assert "holds a run of another experiment" in line and "--overwrite" not in line


def test_traceback_on_request(tmp_path):
    for args, env in ((["--traceback"], ENV), ([], {**ENV, cli.TRACEBACK_ENV: "1"})):
        result = _generate(tmp_path / "run", "--config.top_p=1.5", *args, env=env)
        assert result.returncode != 0
        assert "Traceback (most recent call last)" in result.stderr and "ConfigError: config.top_p" in result.stderr


def test_missing_and_malformed_prompts_files_are_named(tmp_path):
    line = error_line(_generate(tmp_path / "run", f"--config.prompts_file={tmp_path / 'nope.txt'}"))
    assert "config.prompts_file" in line and "nope.txt" in line and "no such file" in line
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hello."}\n{"text": "no prompt field"}\n')
    line = error_line(_generate(tmp_path / "run", f"--config.prompts_file={prompts}"))
    assert f"{prompts}:2: expected a JSON object with a 'prompt' field" in line
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a workdir\n")
    assert f"workdir {file}: it is a file" in error_line(_generate(file))
    assert f"{file} is a file" in error_line(_generate(file / "run"))
    assert file.read_text() == "not a workdir\n"


def test_a_bad_gguf_file_is_one_line_and_leaves_no_workdir(tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(bytes(range(256)) * 4)
    workdir = tmp_path / "new" / "run"  # neither exists: both are made, then removed
    line = error_line(_generate(workdir, f"--config.model={junk}"))
    assert str(junk) in line
    assert not (tmp_path / "new").exists()


def test_a_model_path_that_does_not_exist_is_no_such_file(tmp_path):
    line = error_line(_generate(tmp_path / "run", "--config.model=./no/such/model"))
    assert "no/such/model" in line and "no such file or directory" in line
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_line(tmp_path, tiny_chat_model):
    empty = tmp_path / "data"
    empty.mkdir()
    line = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={tmp_path / 'run'}",
                           f"--config.model={tiny_chat_model}", "--config.tasks=perplexity",
                           f"--config.data_dir={empty}"))
    assert "alpaca_libre" in line and str(empty) in line and "not found" in line
    assert not (tmp_path / "run").exists()


def test_a_changed_determining_key_is_refused_naming_old_and_new_values(tmp_path, tiny_chat_model):
    workdir = tmp_path / "run"
    model = f"--config.model={tiny_chat_model}"
    done = _generate(workdir, model, "--config.max_new_tokens=2")
    assert done.returncode == 0, done.stderr[-3000:]
    before = {name: (workdir / name).read_text() for name in ("generations.jsonl", "config.json", "report.md")}
    line = error_line(_generate(workdir, model, "--config.max_new_tokens=8", "--config.temperature=1.0"))
    assert "config.max_new_tokens: 2 -> 8" in line and "config.temperature: 0.0 -> 1.0" in line
    assert "--overwrite" in line
    assert {name: (workdir / name).read_text() for name in before} == before  # nothing rewritten
    again = _generate(workdir, model, "--config.max_new_tokens=8", "--config.temperature=1.0", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["max_new_tokens"] == 8


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


def test_overrefusal_on_another_benign_set(tmp_path, tiny_chat_model):
    """``overrefusal.dataset``: a validation set that is not XSTest (its rows are that set's)."""
    from configs.evaluate import get_config as evaluate_config
    from experiments import evaluate as evaluate_experiment
    from ssah_jax.data import load_mixture

    config = evaluate_config("quick")
    config.model = str(tiny_chat_model)
    config.tasks = ("overrefusal",)
    config.overrefusal.dataset, config.overrefusal.limit, config.max_new_tokens = "benign_contrast_validation", 3, 2
    report = evaluate_experiment.run(config, str(tmp_path / "eval")).read_text()
    rows = [json.loads(r) for r in (tmp_path / "eval" / "rows" / "overrefusal.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r.prompt for r in load_mixture("benign_contrast_validation:3")[0]]
    assert "over-refusal, benign_contrast_validation (refusal rate)" in report
    config.overrefusal.dataset = "xstest:nope"
    with pytest.raises(ConfigError, match="config.overrefusal.dataset"):
        evaluate_experiment.run(config, str(tmp_path / "bad"))


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
