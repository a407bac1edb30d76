"""Runs are identified by what they compute: a re-run with another value of a determining key
is refused naming it (old -> new), an unchanged one resumes, ``--overwrite`` starts afresh
(``runs.prepare_workdir``); reproduce's stages have identities of their own."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from experiments import evaluate, finetune, generate, prune, reproduce, signals
from ssah_jax import pipeline, runs
from ssah_jax.runs import ConfigError, WorkdirError, config_from_file
from tests.helpers import error_line, run_cli

ROOT = Path(__file__).resolve().parents[2]


def preset(name: str, which: str) -> ConfigDict:
    return config_from_file(ROOT / "configs" / f"{name}.py", which)


def identities(config: ConfigDict, out: Path) -> dict:
    return pipeline.identities(reproduce.Reproduce(config, out), out)


def test_determining_values_are_the_config_leaves_but_the_excluded_ones():
    config = ConfigDict(dict(a=1, b=ConfigDict(dict(x=(1, 2), y="s")), c=ConfigDict(dict(z=0.5))))
    assert runs.determining(config) == {"a": 1, "b.x": [1, 2], "b.y": "s", "c.z": 0.5}
    assert runs.determining(config, ("b", "c.z")) == {"a": 1}  # a section drops every key under it
    with pytest.raises(KeyError, match="typo"):
        runs.determining(config, ("typo",))
    assert runs.fingerprint({"a": 1, "b": [1]}) == runs.fingerprint({"b": [1], "a": 1})
    assert runs.fingerprint({"a": 1, "b": [1]}) != runs.fingerprint({"a": 2, "b": [1]})


def test_a_key_added_later_keeps_older_identities_at_its_old_value():
    """signal.lr_scale came after finetune runs existed: at 1.0 (what they trained with) it is
    not part of an identity, also nested in a sub-run's config; at another value it is."""
    old = ConfigDict(dict(steps=3, signal=ConfigDict(dict(head="linear", lam=0.1))))
    new = copy.deepcopy(old)
    with new.unlocked():
        new.signal.lr_scale = 1.0
    added = finetune.ADDED
    assert runs.determining(new, added=added) == runs.determining(old, added=added)
    assert runs.determining(new) != runs.determining(old)  # an experiment that did not declare it
    nested_old, nested_new = ConfigDict(dict(train=old)), ConfigDict(dict(train=copy.deepcopy(new)))
    assert runs.determining(nested_new, added=added) == runs.determining(nested_old, added=added)
    new.signal.lr_scale = 30.0
    assert (runs.differences(runs.determining(old, added=added), runs.determining(new, added=added))
            == "config.signal.lr_scale: (absent) -> 30.0")


# Per experiment that added keys, a key that only its config has beside them: finetune's
# signal.malicious, evaluate's harmful.exclude, generate's prompts_file.
ADDED_BY = {**{tail: "signal.malicious" for tail in finetune.ADDED if tail not in evaluate.ADDED},
            **{tail: "harmful.exclude" for tail in evaluate.ADDED}, **{tail: "prompts_file" for tail in generate.ADDED}}


def test_every_added_key_names_its_experiments_key_wherever_a_preset_has_it():
    """An added key (an experiment's ADDED) is matched on its tail: in every preset of every
    config file, a key with that tail must be the one of the experiment that added it (inside a
    section that has that experiment's marker key, ADDED_BY); the pipelines declare every key
    their sub-runs added."""
    assert set(ADDED_BY) == set(reproduce.ADDED) == set(signals.ADDED)
    for path in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_presets_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for which in getattr(module, "PRESETS", (None,)):
            flat = runs.leaves(module.get_config(which) if which else module.get_config())
            for tail in ADDED_BY:
                for key in [k for k in flat if k == tail or k.endswith("." + tail)]:
                    section = key[: -len(tail)]
                    assert section + ADDED_BY[tail] in flat, f"{path.name}:{which}: {key}"


@pytest.mark.parametrize("module, name", [(generate, "generate"), (evaluate, "evaluate"), (prune, "prune"),
                                          (finetune, "finetune"), (reproduce, "reproduce")])
def test_every_preset_has_the_keys_its_experiment_excludes(module, name):
    spec = importlib.util.spec_from_file_location(f"_presets_{name}", ROOT / "configs" / f"{name}.py")
    configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configs)
    for which in configs.PRESETS:
        config = configs.get_config(which)
        if module is reproduce:
            assert set(identities(config, Path("w"))) == set(pipeline.recorded(reproduce.Reproduce(config, Path("w"))))
        else:
            runs.determining(config, module.EXCLUDED)


def test_prepare_workdir_refuses_another_identity_and_overwrite_clears_only_workdirs(tmp_path):
    config = ConfigDict(dict(steps=2, log_every=1, data=ConfigDict(dict(name="a"))))
    excluded = ("log_every",)
    workdir = runs.prepare_workdir(tmp_path / "run", config, excluded)
    (workdir / "result.txt").write_text("kept")
    identity = json.loads((workdir / "identity.json").read_text())
    assert identity["determining"] == {"steps": 2, "data.name": "a"}
    assert identity["hash"] == runs.fingerprint({"steps": 2, "data.name": "a"})

    changed = copy.deepcopy(config)
    changed.steps, changed.data.name = 3, "b"
    with pytest.raises(ConfigError, match=r'config.data.name: "a" -> "b", config.steps: 2 -> 3; .*--overwrite'):
        runs.prepare_workdir(workdir, changed, excluded)
    assert json.loads((workdir / "config.json").read_text())["steps"] == 2  # not rewritten
    faster = copy.deepcopy(config)
    faster.log_every = 5
    runs.prepare_workdir(workdir, faster, excluded)  # a key that only affects logging may change
    assert (workdir / "result.txt").exists()

    runs.prepare_workdir(workdir, changed, excluded, overwrite=True)
    assert not (workdir / "result.txt").exists() and json.loads((workdir / "config.json").read_text())["steps"] == 3

    # --overwrite never clears a directory that is not a workdir of this experiment
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(WorkdirError, match="not clearing it"):
        runs.prepare_workdir(other, config, excluded, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"

    # a workdir of an earlier version (config.json, no identity.json) is compared with its config.json
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ConfigError, match="config.steps: 2 -> 3"):
        runs.prepare_workdir(legacy, changed, excluded)
    runs.prepare_workdir(legacy, config, excluded)
    assert (legacy / "identity.json").exists()


@pytest.mark.slow
def test_generate_refuses_a_changed_key_resumes_an_unchanged_run_and_overwrites(tmp_path, tiny_chat_model):
    config = preset("generate", "quick")
    config.model, config.max_new_tokens, config.batch_size = str(tiny_chat_model), 2, 2
    config.prompts = ("Say hello.", "Name a fruit.", "Count to three.")
    workdir = tmp_path / "run"
    generate.run(config, str(workdir))
    rows = runs.read_jsonl(workdir / "generations.jsonl")
    assert len(rows) == 3
    rows[0]["answer"] = "kept from the first run"  # and the run was killed after its first batch
    (workdir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))

    changed = copy.deepcopy(config)
    changed.max_new_tokens = 3
    with pytest.raises(ConfigError, match="config.max_new_tokens: 2 -> 3"):
        generate.run(changed, str(workdir))
    generate.run(config, str(workdir))
    assert runs.read_jsonl(workdir / "generations.jsonl") == rows  # kept the rows, answered the rest

    generate.run(changed, str(workdir), overwrite=True)
    fresh = runs.read_jsonl(workdir / "generations.jsonl")
    assert len(fresh) == 3 and fresh[0]["answer"] != "kept from the first run"
    assert json.loads((workdir / "config.json").read_text())["max_new_tokens"] == 3


@pytest.mark.slow
def test_evaluate_refuses_a_changed_key_resumes_an_unchanged_run_and_overwrites(tmp_path, tiny_chat_model):
    config = preset("evaluate", "quick")
    config.model, config.tasks, config.batch_size = str(tiny_chat_model), ("perplexity",), 2
    config.perplexity.limit, config.perplexity.max_length = 2, 64
    workdir = tmp_path / "run"
    evaluate.run(config, str(workdir))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["perplexity"]["n"] == 2
    metrics["perplexity"]["perplexity"] = -1.0  # marked: a rerun that recomputed it would lose the mark
    (workdir / "metrics.json").write_text(json.dumps(metrics))

    changed = copy.deepcopy(config)
    changed.perplexity.limit = 3
    with pytest.raises(ConfigError, match="config.perplexity.limit: 2 -> 3"):
        evaluate.run(changed, str(workdir))
    evaluate.run(config, str(workdir))
    assert json.loads((workdir / "metrics.json").read_text())["perplexity"]["perplexity"] == -1.0

    evaluate.run(changed, str(workdir), overwrite=True)
    fresh = json.loads((workdir / "metrics.json").read_text())["perplexity"]
    assert fresh["n"] == 3 and fresh["perplexity"] > 1


@pytest.mark.slow
def test_finetune_refuses_a_changed_key_resumes_an_unchanged_run_and_overwrites(tmp_path, tiny_chat_model):
    workdir = tmp_path / "ft"
    command = ["finetune", "--config=configs/finetune.py:quick", f"--workdir={workdir}",
               f"--config.model={tiny_chat_model}", "--config.steps=2", "--config.checkpoint_every=2",
               "--config.eval_every=0", "--config.data.limit=8", "--config.data.heldout=2",
               "--config.data.max_length=64", "--config.optimizer.warmup_steps=1"]
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-3000:]

    line = error_line(run_cli(*command, "--config.optimizer.learning_rate=0.001"))
    assert "config.optimizer.learning_rate: 2e-05 -> 0.001" in line
    resumed = run_cli(*command, "--config.log_every=2")  # logging only: the run resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step 2" in resumed.stdout
    assert json.loads((workdir / "metrics.json").read_text())["train"]["steps_run"] == 0

    fresh = run_cli(*command, "--config.optimizer.learning_rate=0.001", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    train = json.loads((workdir / "metrics.json").read_text())["train"]
    assert train["resumed_from"] == 0 and train["steps_run"] == 2
    assert json.loads((workdir / "identity.json").read_text())["determining"]["optimizer.learning_rate"] == 0.001


def test_a_stage_identity_follows_what_the_stage_is_given_and_the_stages_it_reads():
    config = preset("reproduce", "tiny")
    with config.unlocked():  # a second attack (the tiny preset has one), to move the transfer attack to
        config.attack.datasets.alpaca_libre = ConfigDict(dict(dataset="alpaca_libre", split="", steps=1,
                                                              max_length=256))
    out = Path("runs/reproduce")
    base = identities(config, out)
    moved = identities(config, Path("/elsewhere/reproduce"))
    assert {s: i["identity"] for s, i in moved.items()} == {s: i["identity"] for s, i in base.items()}

    def changed(values: dict) -> set[str]:
        c = copy.deepcopy(config)
        runs.set_values(c, values)
        now = identities(c, out)
        return {s for s in base if base[s]["identity"] != now[s]["identity"]}

    # what only selects, places or speeds up the work
    assert changed({"stages": ("report",), "report_dir": "x", "jax_cache": False, "finetune.log_every": 3,
                    "finetune.eval_batch_size": 1, "attribution.batch_size": 2}) == set()
    assert changed({"probing.prompts": 3}) == {"probing"}
    assert changed({"transfer_attack": "alpaca_libre"}) == {"units_attacked", "transfer"}
    # the contrast answers reach the alignments and what reads them, not the unaligned model's stages
    contrast = changed({"contrast.prompts": "benign_contrast:7"})
    assert {"contrast", "align_full", "align_ru", "eval_aligned", "attacks/harmful_qa/none/seed1"} <= contrast
    assert not contrast & {"units_unaligned", "eval_unaligned"}
    # a prerequisite of another config changes every stage that reads it, directly or not
    align = changed({"align.steps": 3})
    assert {"align_full", "align_ru", "eval_aligned", "eval_ru", "prune_aligned", "layers", "attacks/initial",
            "attacks/harmful_qa/none/seed0", "units_attacked", "transfer", "probing"} <= align
    assert not align & {"contrast", "units_unaligned", "eval_unaligned"}


def test_finished_stages_of_another_identity_are_refused_naming_the_keys(tmp_path):
    config = preset("reproduce", "tiny")
    for stage, identity in identities(config, tmp_path).items():
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / "stage.json").write_text(json.dumps(
            {"seconds": 1.0, **identity, "config": runs.determining(config)}))

    def check(c: ConfigDict) -> None:
        pipeline.check_finished(c, tmp_path, identities(c, tmp_path), lambda other: identities(other, tmp_path),
                                reproduce.ADDED)

    check(config)
    changed = copy.deepcopy(config)
    changed.attack.learning_rate = 1e-3
    with pytest.raises(ConfigError, match=r"config.attack.learning_rate: 5e-05 -> 0.001 \(stages attacks/harmful_qa/"
                                          r"none/seed0, attacks/harmful_qa/scu_cu6/seed0, .* and \d+ more\)"):
        check(changed)


def test_a_staged_run_refuses_another_experiments_workdir_and_damaged_files_are_named(tmp_path):
    other = tmp_path / "finetune_run"
    other.mkdir()
    (other / "config.json").write_text('{"model": "m", "steps": 3}')
    with pytest.raises(WorkdirError, match="another experiment"):
        runs.prepare_workdir(other, ConfigDict({"stages": ["all"], "model": "m"}), staged=True)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"a": 1}')
    (damaged / runs.IDENTITY).write_text('{"hash": ')
    with pytest.raises(WorkdirError, match=r"identity\.json: not valid JSON"):
        runs.prepare_workdir(damaged, ConfigDict({"a": 2}))
