"""The evaluation task ``gcg`` through ``ssah-jax evaluate``: its rows and metric, a killed run
resuming at the prompt and step it reached (a finished prompt never optimised again), a changed
GCG setting refused by the run identity, and the transfer of another run's suffixes."""

import copy
import json
import shutil

import pytest

from experiments import evaluate
from ssah_jax import runs
from ssah_jax.attacks import gcg as gcg_module
from ssah_jax.attacks import task as attack_task
from ssah_jax.runs import ConfigError, config_from_file


class Killed(Exception):
    pass


@pytest.fixture
def config(tiny_chat_model):
    c = config_from_file("configs/evaluate.py", "quick")
    c.model, c.tasks, c.batch_size, c.max_new_tokens = str(tiny_chat_model), ("gcg",), 2, 4
    c.gcg.update(dict(limit=2, steps=3, search_width=8, topk=8, chunk=8, init="! ! ! !", early_stop=False))
    return c


@pytest.mark.slow
def test_a_killed_gcg_run_resumes_at_the_prompt_and_step_it_reached(config, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    evaluate.run(config, str(whole))
    rows = runs.read_jsonl(whole / "rows" / "gcg.jsonl")
    assert [r["steps"] for r in rows] == [3, 3] and all(len(r["losses"]) == 3 for r in rows)
    assert all(r["judge"] == "keyword" and isinstance(r["harmful"], bool) and r["suffix"] for r in rows)
    assert rows[0]["target"].startswith("Sure, here is")
    metrics = json.loads((whole / "metrics.json").read_text())["gcg"]
    assert metrics["n"] == 2 and 0 <= metrics["asr"] <= 1 and metrics["steps"] == 3
    assert "| ASR, advbench, GCG (3 steps, width 8, top-k 8) |" in (whole / "report.md").read_text()

    # killed after the second step of the second prompt
    killed = tmp_path / "killed"
    saved = attack_task.save_state

    def kill_at(path, index, prompt, state):
        saved(path, index, prompt, state)
        if (index, state.step) == (1, 2):
            raise Killed

    monkeypatch.setattr(attack_task, "save_state", kill_at)
    with pytest.raises(Killed):
        evaluate.run(config, str(killed))
    monkeypatch.setattr(attack_task, "save_state", saved)
    assert len(runs.read_jsonl(killed / "rows" / "gcg.jsonl")) == 1
    started = []
    real_attack = gcg_module.attack

    def watched(model, tokenizer, prompt, target, cfg, *, state=None, **kw):
        started.append((prompt, None if state is None else state.step))
        return real_attack(model, tokenizer, prompt, target, cfg, state=state, **kw)

    monkeypatch.setattr(attack_task, "attack", watched)
    evaluate.run(config, str(killed))
    assert started == [(rows[1]["prompt"], 2)]  # the finished prompt not again; the other from its step 2
    assert runs.read_jsonl(killed / "rows" / "gcg.jsonl") == rows  # as if never killed

    # a changed GCG setting is refused like any other
    changed = copy.deepcopy(config)
    changed.gcg.steps = 4
    with pytest.raises(ConfigError, match="config.gcg.steps: 3 -> 4"):
        evaluate.run(changed, str(killed))

    # the transfer setting: another run's suffixes, answered without optimising
    transfer = copy.deepcopy(config)
    shutil.copy(whole / "rows" / "gcg.jsonl", tmp_path / "found.jsonl")
    transfer.gcg.transfer = str(tmp_path / "found.jsonl")
    started.clear()
    evaluate.run(transfer, str(tmp_path / "transfer"))
    moved = runs.read_jsonl(tmp_path / "transfer" / "rows" / "gcg.jsonl")
    assert not started and [r["suffix"] for r in moved] == [r["suffix"] for r in rows]
    assert [r["answer"] for r in moved] == [r["answer"] for r in rows]  # the same model answers alike
    transfer.gcg.limit = 3
    with pytest.raises(ConfigError, match="no suffix for 1 of the 3 prompts"):
        evaluate.run(transfer, str(tmp_path / "transfer3"))


def test_gcg_settings_are_checked_up_front(config, tmp_path):
    config.gcg.search_width = 12
    with pytest.raises(ConfigError, match="config.gcg.search_width=12: must be a multiple of gcg.chunk"):
        evaluate.run(config, str(tmp_path / "a"))
    config.gcg.search_width, config.gcg.steps = 8, 0
    with pytest.raises(ConfigError, match="config.gcg.steps"):
        evaluate.run(config, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
