"""The evaluation task registry: its names are exactly what ``evaluate`` accepts, an unknown
name is a one-line error naming the config key, rows resume, and tasks run in registry order."""

import copy
import json

import pytest

from configs.evaluate import get_config
from experiments import evaluate
from ssah_jax import runs
from ssah_jax.data import Record
from ssah_jax.evaluation import load_judge, tasks
from ssah_jax.runs import ConfigError, WorkdirError


def test_the_registry_lists_exactly_the_tasks_validate_accepts():
    config = get_config("quick")
    # the default runs every task in registry order, but the signal's classifier (a deployed
    # signal only) and the optimisation attacks (hours on a CPU)
    every = tuple(evaluate.registry())
    assert every[: len(tasks.TASKS)] == tuple(tasks.TASKS) and every[len(tasks.TASKS):] == ("gcg",)
    assert tuple(config.tasks) == tuple(t for t in every if t not in ("classifier", "gcg"))
    for name in every:
        one = copy.deepcopy(config)
        one.tasks = (name,)
        evaluate.validate(one)
    for name in ("bogus", "asr_system", "prefill_5", "sweep_t1_p0.9_k0"):  # metric / row names are not tasks
        one = copy.deepcopy(config)
        one.tasks = (name,)
        with pytest.raises(ConfigError, match="config.tasks"):
            evaluate.validate(one)


def test_an_unknown_task_names_the_config_key_and_the_known_tasks(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.tasks: unknown evaluation task 'bogus' \(tasks: asr, prefill"):
        tasks.get("bogus")
    with pytest.raises(ConfigError, match=r"^config\.evaluation\.tasks: unknown evaluation task 'mmlu5'"):
        tasks.chosen(("asr", "mmlu5"), "config.evaluation.tasks")
    config = get_config("quick")
    config.tasks = ("perplexity", "bogus")  # evaluate_model refuses it before running anything
    with pytest.raises(ConfigError, match="config.tasks: unknown evaluation task 'bogus'"):
        evaluate.evaluate_model(None, None, evaluate.evaluation_spec(config), tmp_path, description="x",
                                judge=load_judge("keyword"))
    assert not (tmp_path / "metrics.json").exists()


def test_chosen_tasks_come_in_registry_order():
    assert list(tasks.chosen(("perplexity", "mmlu", "asr", "mmlu"))) == ["asr", "mmlu", "perplexity"]


def test_row_store_computes_chunks_and_resumes_after_a_torn_line(tmp_path):
    records = [Record(f"p{i}") for i in range(5)]
    calls = []

    def fn(batch, start):
        calls.append((start, len(batch)))
        return [{"prompt": r.prompt, "offset": start} for r in batch]

    store = tasks.RowStore(tmp_path / "rows")
    rows = store.rows("t", records, fn, chunk=2)
    assert calls == [(0, 2), (2, 2), (4, 1)] and [r["offset"] for r in rows] == [0, 0, 2, 2, 4]
    lines = store.path("t").read_text().splitlines()
    store.path("t").write_text("\n".join(lines[:3]) + "\n" + lines[3][:5])  # killed while writing row 4
    calls.clear()
    resumed = store.rows("t", records, fn, chunk=2)  # the rows written are kept, the rest computed from row 3
    assert calls == [(3, 2)] and resumed[:3] == rows[:3]
    assert [r["prompt"] for r in resumed] == [r.prompt for r in records]
    assert runs.read_jsonl(store.path("t")) == resumed
    with pytest.raises(WorkdirError, match="rows of other prompts"):
        store.rows("t", [Record("other")] + records[1:], fn, chunk=2)


def test_evaluate_model_keeps_done_metrics_and_writes_each_new_one(tmp_path, monkeypatch):
    """A task's entries are computed only when metrics.json lacks them, in the order given."""
    computed = []

    def fake_asr(model, tokenizer, spec, *, store, judge):
        def entry(name):
            def compute():
                computed.append(name)
                rows = store.rows(name, [Record("a"), Record("b")], lambda b, s: [
                    {"prompt": r.prompt, "refused": r.prompt == "a"} for r in b], 1)
                return {"asr": sum(not r["refused"] for r in rows) / len(rows), "n": len(rows)}
            return compute
        return {f"asr_{s}": entry(f"asr_{s}") for s in spec.harmful.settings}

    monkeypatch.setitem(tasks.TASKS, "asr", fake_asr)
    config = get_config("quick")
    config.tasks = ("asr",)
    (tmp_path / "metrics.json").write_text(json.dumps({"asr_no_system": {"asr": 0.25, "n": 4, "seconds": 1.0}}))
    metrics = evaluate.evaluate_model(None, None, evaluate.evaluation_spec(config), tmp_path, description="x",
                                      judge=load_judge("keyword"))
    assert computed == ["asr_system"]
    assert metrics["asr_no_system"]["asr"] == 0.25 and metrics["asr_system"]["asr"] == 0.5
    assert "seconds" in metrics["asr_system"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert len((tmp_path / "rows" / "asr_system.jsonl").read_text().splitlines()) == 2
    assert "| 50.0% | 2 |" in (tmp_path / "report.md").read_text()


def test_the_data_recipes_keep_their_rules():
    advbench = tasks.harmful_records("advbench", "", None)
    assert [r.prompt for r in tasks.harmful_records("advbench:20", "advbench:5", None)] == [
        r.prompt for r in advbench[5:25]]
    with pytest.raises(ConfigError, match=r"config.harmful.dataset='no_such_set'"):
        tasks.harmful_records("no_such_set", "", None)
    with pytest.raises(ConfigError, match=r"config.harmful.exclude='no_such_set'"):
        tasks.harmful_records("advbench", "no_such_set", None)
    # the prefilling and sweep prompts lose the trained prompts too
    prefill = tasks.safety.untrained("advbench:10", "advbench:5", None, "prefill.dataset")
    assert [r.prompt for r in prefill] == [r.prompt for r in advbench[5:15]]
    spec = evaluate.evaluation_spec(get_config("quick")).perplexity
    everything = tasks.perplexity_records(spec, None, 0)
    assert tasks.perplexity_records(spec, None, 3) == everything[-3:]
    assert len(tasks.perplexity_records(spec, None)) == spec.limit
    assert all(r.response for r in everything)


def test_the_typed_spec_holds_every_evaluation_key_and_every_metric_has_a_label():
    """evaluation_spec types every key of configs/evaluate.py the tasks read (all but the model,
    its dtype, its mesh and its signal: a key added there and not typed fails here), and every metric a
    task writes has its report label."""
    import dataclasses

    config = get_config("quick")
    spec = evaluate.evaluation_spec(config)

    def fields(value, prefix=""):
        if dataclasses.is_dataclass(value):
            return {k for f in dataclasses.fields(value) for k in fields(getattr(value, f.name), f"{prefix}{f.name}.")}
        return {prefix[:-1]}

    untyped = {k for k in runs.leaves(config) if k.split(".")[0] not in ("model", "dtype", "mesh", "signal")}
    assert fields(spec) == untyped
    metrics = {"asr_no_system": {}, "asr_system": {}, "prefill_5": {"tokens": 5}, "sweep": {}, "overrefusal": {},
               "mmlu": {}, "sst2": {}, "gsm8k": {}, "perplexity": {}}
    labels = {name: tasks.label(spec, name, entry) for name, entry in metrics.items()}
    assert labels["prefill_5"] == "ASR, advbench, prefilling attack (5 target tokens)"
    assert labels["overrefusal"] == "over-refusal, XSTest safe prompts (refusal rate)"
    assert len(set(labels.values())) == 9
    with pytest.raises(KeyError):
        tasks.label(spec, "bogus", {})
