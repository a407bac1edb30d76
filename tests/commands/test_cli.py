"""The ssah-jax entry point: help, and one-line errors with exit status 2 (the ``generate`` and
``evaluate`` experiments it runs are tested in ``tests/experiments/``)."""

import importlib.util
import json

import pytest

from ssah_jax import cli
from tests.helpers import ENV, REPO, error_line, run_cli


def _generate(workdir, *overrides, env=None):
    return run_cli("generate", "--config=configs/generate.py:quick", f"--workdir={workdir}", *overrides, env=env)


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


@pytest.mark.slow
def test_experiment_help_shows_its_config_keys_with_their_values():
    result = run_cli("generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "  max_new_tokens = 128\n" in result.stdout and "  temperature = 0.0\n" in result.stdout
    quick = run_cli("generate", "--config=configs/generate.py:quick", "-h")
    assert quick.returncode == 0 and "  max_new_tokens = 16\n" in quick.stdout
    nested = run_cli("finetune", "--help")
    assert nested.returncode == 0 and "  optimizer.learning_rate = 2e-05\n" in nested.stdout
    assert "every key but log_every, eval_every" in nested.stdout  # what a resumed run may change
    # each key after its comment in the config file: a section's keywords have their own
    assert "  # empty: each dataset's first split\n  data.split = ''\n" in nested.stdout
    assert ("  # mode=lora: the adapters' rank, scale alpha and target projections (raise the learning rate)\n"
            "  freeze.lora.rank = 8\n") in nested.stdout
    pipeline = run_cli("reproduce", "--help")  # a key's own comment, not that of a preset's change to it
    assert ("  # every attack run once per seed (its data order, random units, LoRA init)\n"
            "  attack.seeds = (0, 1, 2)\n") in pipeline.stdout
    assert "  # each attack: dataset spec" in pipeline.stdout  # a section's comment, before its first key


def test_unknown_experiment_is_named(tmp_path):
    line = error_line(run_cli("nonsense", "--config=configs/generate.py:quick", f"--workdir={tmp_path}"))
    assert "unknown experiment 'nonsense'" in line and "generate" in line


def test_an_override_without_its_config_file_says_so(tmp_path):
    # the docs once showed `ssah-jax generate --config.prompts_dataset=...`: the flag parser then
    # called the key unknown, though it is generate's own
    line = error_line(run_cli("generate", "--config.prompts_dataset=benign_contrast", f"--workdir={tmp_path / 'run'}"))
    assert line == ("ssah-jax: --config.prompts_dataset overrides a config file's key: give the file too, "
                    "e.g. --config=configs/generate.py")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_unknown_config_key_is_named_plainly(tmp_path):
    line = error_line(_generate(tmp_path / "run", "--config.bogus_key=1"))
    assert "unknown config key config.bogus_key " in line and "\\" not in line and "\"'" not in line
    nested = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={tmp_path / 'run'}",
                             "--config.harmful.bogus=1"))
    assert "unknown config key config.harmful.bogus " in nested and "did you mean" not in nested
    misspelt = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={tmp_path / 'run'}",
                                  "--config.harmful.limt=1"))
    assert misspelt.endswith("; did you mean config.harmful.limit?")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_config_errors_are_one_line_and_make_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    assert error_line(_generate(workdir, "--config.top_p=1.5")) == "ssah-jax: config.top_p=1.5: must be in (0, 1]"
    assert error_line(_generate(workdir, "--config.top_p=abc")) == (
        "ssah-jax: config.top_p=abc: expected a number, as its value in configs/generate.py (1.0)")
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


@pytest.mark.slow
def test_a_directory_that_is_not_a_model_is_one_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    line = error_line(_generate(tmp_path / "run", f"--config.model={folder}"))
    assert str(folder) in line and "not a model directory" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_workdir_of_another_experiment_is_named(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"attribution": {}, "kinds": {}}')
    line = error_line(_generate(workdir))
    assert "holds a run of another experiment" in line and "--overwrite" not in line


@pytest.mark.slow
def test_traceback_on_request(tmp_path):
    for args, env in ((["--traceback"], ENV), ([], {**ENV, cli.TRACEBACK_ENV: "1"})):
        result = _generate(tmp_path / "run", "--config.top_p=1.5", *args, env=env)
        assert result.returncode != 0
        assert "Traceback (most recent call last)" in result.stderr and "ConfigError: config.top_p" in result.stderr


@pytest.mark.slow
def test_missing_and_malformed_prompts_files_are_named(tmp_path):
    line = error_line(_generate(tmp_path / "run", f"--config.prompts_file={tmp_path / 'nope.txt'}"))
    assert "config.prompts_file" in line and "nope.txt" in line and "no such file" in line
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hello."}\n{"text": "no prompt field"}\n')
    line = error_line(_generate(tmp_path / "run", f"--config.prompts_file={prompts}"))
    assert f"{prompts}:2: expected a JSON object with a 'prompt' field" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert f"config.prompts_file={empty}: no prompts in it" in error_line(
        _generate(tmp_path / "run", f"--config.prompts_file={empty}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a workdir\n")
    assert f"workdir {file}: it is a file" in error_line(_generate(file))
    assert f"{file} is a file" in error_line(_generate(file / "run"))
    assert file.read_text() == "not a workdir\n"


@pytest.mark.slow
def test_a_bad_gguf_file_is_one_line_and_leaves_no_workdir(tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(bytes(range(256)) * 4)
    workdir = tmp_path / "new" / "run"  # neither exists: both are made, then removed
    line = error_line(_generate(workdir, f"--config.model={junk}"))
    assert str(junk) in line
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_model_path_that_does_not_exist_is_no_such_file(tmp_path):
    line = error_line(_generate(tmp_path / "run", "--config.model=./no/such/model"))
    assert "no/such/model" in line and "no such file or directory" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_data_is_one_line(tmp_path, tiny_chat_model):
    empty = tmp_path / "data"
    empty.mkdir()
    line = error_line(run_cli("evaluate", "--config=configs/evaluate.py:quick", f"--workdir={tmp_path / 'run'}",
                           f"--config.model={tiny_chat_model}", "--config.tasks=perplexity",
                           f"--config.data_dir={empty}"))
    assert "alpaca_libre" in line and str(empty) in line and "not found" in line
    assert "`ssah-jax data fetch alpaca_libre` fetches it there" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
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
