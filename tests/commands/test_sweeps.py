"""`ssah-jax sweep`: points, commands, the fraction rule, results, executors, kill and resume."""

import csv
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from ssah_jax import runs, sweeps

REPO = Path(__file__).resolve().parents[2]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ssah_jax.cli", *args], capture_output=True, text=True, cwd=REPO,
                          **kw)


def sweep_of(**values):
    c = sweeps.sweep_config("prune", "configs/prune.py:quick")
    for key, value in values.items():
        c[key] = value
    return c


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Points and commands


def test_points_are_the_listed_ones_times_the_grid_times_the_seeds():
    c = sweep_of(points=(("dense", "variants=dense"), ("kinds.scu=0.02", "variants=minus_SCU")),
                 grid=ConfigDict(dict(kinds=dict(ucu=(0.1, 0.2)))), seeds=(0, 1))
    base = runs.config_from_file(REPO / "configs" / "prune.py", "quick")
    points = sweeps.expand(c, base)
    assert len(points) == 2 * 2 * 2
    assert [p.name for p in points[:4]] == ["dense,kinds.ucu=0.1,seed=0", "dense,kinds.ucu=0.1,seed=1",
                                           "dense,kinds.ucu=0.2,seed=0", "dense,kinds.ucu=0.2,seed=1"]
    assert points[4].name == "kinds.scu=0.02,variants=minus_SCU,kinds.ucu=0.1,seed=0"
    assert points[4].values() == {"kinds.scu": "0.02", "variants": "minus_SCU", "kinds.ucu": "0.1", "seed": "0"}
    argv = sweeps.arguments(c, points[4], Path("/w"))
    assert argv == ["prune", "--config=configs/prune.py:quick", "--config.kinds.scu=0.02",
                    "--config.variants=minus_SCU", "--config.kinds.ucu=0.1", "--config.seed=0",
                    "--workdir=/w/runs/kinds.scu=0.02,variants=minus_SCU,kinds.ucu=0.1,seed=0"]


def test_values_reach_the_run_as_the_command_line_parses_them():
    assert sweeps.command_value(("asr", "perplexity")) == "asr,perplexity"
    assert sweeps.command_value((5, 10)) == "(5, 10)"
    assert sweeps.command_value(("a b",)) == "('a b',)"
    assert sweeps.command_value(True) == "True"
    c = sweep_of()
    c.set = ConfigDict(dict(evaluation=dict(tasks=("asr", "perplexity")), attribution=dict(cache_dir="{workdir}/s")))
    argv = sweeps.arguments(c, sweeps.expand(c)[0], Path("/w"))
    assert "--config.evaluation.tasks=asr,perplexity" in argv and "--config.attribution.cache_dir=/w/s" in argv


@pytest.mark.parametrize("values, message", [
    (dict(grid=ConfigDict(dict(kinds=dict(scx=(0.1,))))), "config.grid.kinds.scx: configs/prune.py:quick has no "
                                                          "config key 'kinds.scx'"),
    (dict(points=(("kinds.scx=1",),)), "config.points[0]: configs/prune.py:quick has no config key 'kinds.scx'"),
    (dict(points=(("a", "kinds.scu"),)), "config.points[0]: 'kinds.scu' is not key=value"),
    (dict(grid=ConfigDict(dict(seed=3))), "config.grid.seed=3: must be a non-empty tuple of values"),
    (dict(points=(("a", "seed=1"), ("a", "seed=2"))), "two points are both 'a'"),
    (dict(executor="slurm"), "config.executor='slurm': must be one of ('local', 'ray', 'print')"),
    (dict(base="configs/nope.py"), "config.base='configs/nope.py': configs/nope.py: no such file"),
    (dict(experiment="nope"), "config.experiment='nope': must be one of ['compare', 'evaluate', 'finetune'"),
    (dict(metrics=ConfigDict(dict(asr="x.json:"))), "config.metrics.asr='x.json:': must be"),
    (dict(base="configs/finetune.py:quick"), "config.base='configs/finetune.py:quick': not a prune config"),
    (dict(points=(("a", "variants=dense"),), metrics=ConfigDict(dict(m="x")),
          select=ConfigDict(dict(r=dict(key="variants", baseline="a", limits=dict(m="+1"))))),
     "config.select.r.key='variants': must be a key the points set to numbers"),
])
def test_a_bad_sweep_config_is_refused_naming_its_key(values, message):
    with pytest.raises(runs.ConfigError) as e:
        sweeps.validate(sweep_of(**values))
    assert message in str(e.value)


@pytest.mark.slow
def test_print_executor_prints_one_command_per_unfinished_point_and_nothing_else(tmp_path):
    args = ["sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={tmp_path / 's'}",
            "--config.executor=print"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ssah-jax prune --config=configs/prune.py:quick ") for line in lines)
    assert "--workdir=" + str(tmp_path / "s" / "runs" / "dense") in lines[0]
    # a point that ran to its end (however it was run) is not printed again; the table says so
    (tmp_path / "s" / "runs" / "dense").mkdir(parents=True)
    runs.mark_finished(tmp_path / "s" / "runs" / "dense", lines[0].split(" "), 12.0)
    again = cli(*args)
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 3 and "dense" not in again.stdout
    assert [r["status"] for r in rows_of(tmp_path / "s" / "sweep.csv")] == ["ok", "pending", "pending", "pending"]
    # a run of other overrides in a point's workdir does not finish the point (its workdir decides)
    runs.mark_finished(tmp_path / "s" / "runs" / "dense", lines[0].split(" ") + ["--config.seed=3"], 12.0)
    assert len(cli(*args).stdout.splitlines()) == 4
    assert not (tmp_path / "s" / "sweep.lock").exists()  # each command removed its lock
    # one sweep command at a time in a workdir
    with open(tmp_path / "s" / "sweep.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        locked = cli(*args)
    assert locked.returncode == 2 and "another ssah-jax sweep is running in it" in locked.stderr


@pytest.mark.slow
def test_sweep_command_errors_are_one_line(tmp_path):
    bad = cli("sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={tmp_path / 'a'}",
              "--config.grid.kinds=1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "config.grid" in bad.stderr, bad.stderr
    flag = cli("sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={tmp_path / 'a'}", "--multihost")
    assert flag.returncode == 2 and "--multihost: not a flag of ssah-jax sweep" in flag.stderr
    other = cli("sweep", "--config=configs/prune.py:quick", f"--workdir={tmp_path / 'a'}")
    assert other.returncode == 2 and "ssah-jax: not a sweep config (it lacks config.base" in other.stderr
    missing = cli("sweep", "--config=configs/sweeps/fractions.py:tiny")
    assert missing.returncode == 2 and "--workdir is required" in missing.stderr
    executor = cli("sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={tmp_path / 'a'}",
                   "--config.executor=slurm")
    assert executor.returncode == 2 and "config.executor='slurm'" in executor.stderr
    assert not (tmp_path / "a").exists()  # nothing left behind
    changed = tmp_path / "b"
    assert cli("sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={changed}",
               "--config.executor=print").returncode == 0
    refused = cli("sweep", "--config=configs/sweeps/fractions.py:tiny", f"--workdir={changed}",
                  "--config.executor=print", "--config.set.model=other")
    assert refused.returncode == 2 and 'config.set.model: "tiny-random" -> "other"' in refused.stderr


# ---------------------------------------------------------------------------------------------
# Results and the fraction rule


def _row(label, metrics, **values):
    return {"point": label or str(values), "label": label, "status": "ok", **values, **metrics}


def test_the_fraction_rule_keeps_the_largest_value_before_the_first_past_a_limit():
    c = sweep_of(metrics=ConfigDict(dict(ppl="a", asr="b")), select=ConfigDict(dict(
        RU=dict(key="kinds.ru", baseline="dense", limits=dict(ppl="x1.10", asr="+0.05")))))
    rows = [_row("dense", {"ppl": 10.0, "asr": 0.10})]
    for ru, ppl, asr in ((0.05, 10.5, 0.12), (0.1, 10.9, 0.14), (0.2, 11.5, 0.10), (0.3, 10.0, 0.10)):
        rows.append(_row("", {"ppl": ppl, "asr": asr}, **{"kinds.ru": str(ru)}))
    chosen = sweeps.select(c, rows)["RU"]
    assert chosen["value"] == 0.1  # 0.2 grows perplexity by 15%; 0.3 is never tried
    assert [v for v, _ in chosen["tried"]] == [0.05, 0.1, 0.2]
    assert chosen["changes"]["0.1"]["asr"]["change"] == pytest.approx(0.04)
    # seeds average before the rule; a rise in ASR past +0.05 stops it
    rows += [_row("", {"ppl": 10.0, "asr": 0.30}, **{"kinds.ru": "0.05"})]
    assert sweeps.select(c, rows)["RU"]["value"] == 0.0


def test_the_report_shows_rates_in_percent_and_each_change_as_its_limit_measures_it(tmp_path):
    from ssah_jax.sweeps.report import render_report

    c = sweep_of(metrics=ConfigDict(dict(ppl="*.perplexity.perplexity", asr="*.asr_no_system.asr",
                                         mmlu="*.mmlu.accuracy")),
                 select=ConfigDict(dict(RU=dict(key="kinds.ru", baseline="dense",
                                                limits=dict(ppl="x1.10", asr="+0.05", mmlu="-0.05")))))
    rows = [_row("dense", {"ppl": 10.0, "asr": 0.10, "mmlu": 0.50}),
            _row("", {"ppl": 10.5, "asr": 0.125, "mmlu": 0.48}, **{"kinds.ru": "0.05"})]
    text = render_report(c, tmp_path, rows, ["kinds.ru"], [], True, sweeps.select(c, rows), [], [])
    assert "| dense |  | ok | 10.0% | 50.0% | 10 |" in text and "|  | 0.05 | ok | 12.5% | 48.0% | 10.5 |" in text
    assert "Rates (asr, mmlu) in percent." in text
    assert "| value | asr (baseline 10.0%) | mmlu (baseline 50.0%) | ppl (baseline 10) | within limits |" in text
    # each change is now - baseline, in the limit's terms: a rate's points, a ratio's percent
    assert "| 0.05 | 12.5% (+2.5 points) | 48.0% (-2.0 points) | 10.5 (+5.0%) | yes |" in text
    assert "DESIGN.md" not in text


def test_the_fraction_rule_waits_for_missing_values_and_a_missing_baseline():
    c = sweep_of(metrics=ConfigDict(dict(asr="b")), select=ConfigDict(dict(
        UCU=dict(key="kinds.ucu", baseline="dense", limits=dict(asr="x1.5")))))
    rows = [_row("dense", {"asr": 0.0}), _row("", {"asr": 0.0}, **{"kinds.ucu": "0.1"}),
            _row("", {"asr": None}, **{"kinds.ucu": "0.2"}), _row("", {"asr": 0.5}, **{"kinds.ucu": "0.3"})]
    chosen = sweeps.select(c, rows)["UCU"]  # a zero baseline: any rise is past a ratio limit
    assert chosen["value"] == 0.1 and "kinds.ucu=0.2 has not finished" in chosen["note"]
    assert [v for v, _ in chosen["tried"]] == [0.1]  # 0.3 is beyond the unfinished 0.2
    rows[0]["status"] = "failed"
    assert sweeps.select(c, rows)["UCU"]["value"] is None


def test_metrics_read_a_path_in_a_points_json_and_star_is_its_one_key(tmp_path):
    point = sweeps.Point("p", "", ())
    (tmp_path / "runs" / "p" / "eval").mkdir(parents=True)
    (tmp_path / "runs" / "p" / "metrics.json").write_text(json.dumps({"minus_SCU": {"asr": {"asr": 0.25}}}))
    (tmp_path / "runs" / "p" / "eval" / "metrics.json").write_text(json.dumps({"a": {"b": 3}, "c": {"b": 4}}))
    assert sweeps.metric(tmp_path, point, "*.asr.asr") == 0.25
    assert sweeps.metric(tmp_path, point, "minus_SCU.asr.asr") == 0.25
    assert sweeps.metric(tmp_path, point, "eval/metrics.json:a.b") == 3.0
    assert sweeps.metric(tmp_path, point, "eval/metrics.json:*.b") is None  # two keys: not one
    assert sweeps.metric(tmp_path, point, "dense.asr.asr") is None


class _Scripted:
    """An executor whose points end with scripted exit statuses."""

    def __init__(self, exits):
        self.exits, self.running, self.started = exits, {}, []

    def has_room(self):
        return not self.running

    def submit(self, point, argv, log):
        self.started.append(point.name)
        self.running[point] = self.exits[point.name].pop(0)

    def wait(self):
        point, code = self.running.popitem()
        return [(point, {"exit": code, "seconds": 0.0, "error": "" if code == 0 else f"exit {code}"})]

    def describe(self):
        return "scripted"

    def close(self):
        pass


def test_a_crash_is_retried_and_a_refused_input_is_not(tmp_path, monkeypatch):
    c = sweep_of(points=(("a", "seed=1"), ("b", "seed=2"), ("c", "seed=3")), retries=1)
    points = sweeps.expand(c)
    executor = _Scripted({"a": [-9, 0], "b": [2], "c": [1, 1]})
    monkeypatch.setattr(sweeps, "LocalExecutor", lambda parallel, cwd: executor)
    sweeps.execute(c, tmp_path, points, {p: ["x"] for p in points}, 0, 3)
    assert executor.started == ["a", "b", "c", "a", "c"]
    last = sweeps.records(tmp_path)
    assert {k: (r["status"], r["attempt"]) for k, r in last.items()} == {
        "a": ("ok", 2), "b": ("failed", 1), "c": ("failed", 2)}


# ---------------------------------------------------------------------------------------------
# Running sweeps (tiny random models in subprocesses)


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _ok(workdir):
    return [r["name"] for r in runs.read_jsonl(workdir / "points.jsonl") if r["status"] == "ok"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_ray_gives_the_same_table(tmp_path, tiny_chat_model):
    """The 4-point tiny fraction sweep: killed after two points, the same command runs only the
    other two; on a local Ray cluster it gives the same metrics."""
    local = tmp_path / "local"
    args = ["sweep", "--config=configs/sweeps/fractions.py:tiny", f"--config.set.model={tiny_chat_model}"]
    proc = subprocess.Popen([sys.executable, "-m", "ssah_jax.cli", *args, f"--workdir={local}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_ok(local)) >= 2, 600, "two finished points")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = _ok(local)
    assert len(first) == 2
    # the running point followed its sweep (PR_SET_PDEATHSIG): nothing left writing in the workdir
    _wait_for(lambda: subprocess.run(["pgrep", "-f", f"workdir={local}/runs"], capture_output=True).returncode == 1,
              30, "the killed sweep's point to end")
    again = cli(*args, f"--workdir={local}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 finished earlier, 2 to run" in again.stdout
    second = [r["name"] for r in runs.read_jsonl(local / "points.jsonl")][len(first):]
    assert sorted(second) == sorted(set(p.name for p in sweeps.expand(runs.config_from_file(
        REPO / "configs" / "sweeps" / "fractions.py", "tiny"))) - set(first))
    table = rows_of(local / "sweep.csv")
    assert [r["status"] for r in table] == ["ok"] * 4
    assert all(0 <= float(r["asr"]) <= 1 and float(r["perplexity"]) > 1 for r in table)
    assert (local / "report.md").read_text().count("## Selected:") == 2 and (local / "selected.json").exists()
    assert len(list((local / "scores").iterdir())) == 1  # one set of scores, shared by the points:
    logs = [(local / "logs" / f"{row['point']}.log").read_text() for row in table]
    assert sum("safety scores: computed in an earlier run, kept" in log for log in logs) >= 3  # all but the first

    pytest.importorskip("ray")
    on_ray = tmp_path / "ray"
    result = cli(*args, f"--workdir={on_ray}", "--config.executor=ray", "--config.ray.cluster_cpus=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running on Ray (a local cluster: 2 CPUs)" in result.stdout
    ray_table = rows_of(on_ray / "sweep.csv")
    for a, b in zip(table, ray_table, strict=True):
        assert a["point"] == b["point"] and b["status"] == "ok"
        for metric in ("asr", "perplexity"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), rel=1e-6)


@pytest.mark.slow
def test_an_invalid_point_fails_alone_with_its_error_in_the_table(tmp_path, tiny_chat_model):
    config = tmp_path / "sweep.py"
    config.write_text(f'''
from ssah_jax.sweeps import sweep_config

def get_config():
    c = sweep_config("evaluate", "configs/evaluate.py:quick")
    c.set.model = "{tiny_chat_model}"
    c.set.tasks = ("perplexity",)
    c.points = (("good", "perplexity.limit=4"), ("bad", "perplexity.limit=-1"))
    c.metrics.perplexity = "perplexity.perplexity"
    return c
''')
    result = cli("sweep", f"--config={config}", f"--workdir={tmp_path / 's'}")
    assert result.returncode == 0, result.stdout + result.stderr
    table = {r["point"]: r for r in rows_of(tmp_path / "s" / "sweep.csv")}
    assert table["good"]["status"] == "ok" and float(table["good"]["perplexity"]) > 1
    assert table["bad"]["status"] == "failed" and table["bad"]["perplexity"] == ""
    assert table["bad"]["error"] == "ssah-jax: config.perplexity.limit=-1: must be >= 0 (0 = all)"
    assert [r["attempt"] for r in runs.read_jsonl(tmp_path / "s" / "points.jsonl") if r["name"] == "bad"] == [1]
    assert "config.perplexity.limit=-1" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.slow
def test_the_protection_and_signal_sweeps_run_two_at_a_time(tmp_path, tiny_chat_model):
    # the unit map where the tiny protection sweep reads it (<its workdir>/units/units.npz)
    made = cli("prune", "--config=configs/prune.py:quick", f"--config.model={tiny_chat_model}",
               "--config.variants=()", f"--workdir={tmp_path / 'protection' / 'units'}")
    assert made.returncode == 0, made.stderr
    for name in ("protection", "signal"):
        workdir = tmp_path / name
        result = cli("sweep", f"--config=configs/sweeps/{name}.py:tiny", f"--workdir={workdir}",
                     f"--config.set.model={tiny_chat_model}", "--config.parallel=2")
        assert result.returncode == 0, result.stdout + result.stderr
        table = rows_of(workdir / "sweep.csv")
        assert len(table) == 4 and all(r["status"] == "ok" for r in table), table
        assert all(0 <= float(r["asr"]) <= 1 for r in table)
        assert list((workdir / "runs").iterdir()) and all((workdir / "runs" / r["point"] / "eval" / "metrics.json")
                                                          .exists() for r in table)
    protection = rows_of(tmp_path / "protection" / "sweep.csv")
    trained = {r["label"]: int(float(r["trained"])) for r in protection}
    assert trained["harmful_qa-scu_cu6"] < trained["harmful_qa-none"]  # the protection froze units
    signal_rows = rows_of(tmp_path / "signal" / "sweep.csv")
    for row in signal_rows:  # each evaluated with its own trained signal, under the point's schedule
        report = (tmp_path / "signal" / "runs" / row["point"] / "eval" / "report.md").read_text()
        assert f"with its safety signal `{tmp_path / 'signal' / 'runs' / row['point'] / 'export'}`" in report
        assert f"schedule {row['evaluation.signal.schedule']}" in report
    assert {r["evaluation.signal.schedule"] for r in signal_rows} == {"each", "periodic"}
    assert os.path.exists(tmp_path / "signal" / "plot_signal.lam.png")


@pytest.mark.slow
def test_the_alignment_sweep_trains_on_the_contrast_answers_and_measures_validation_sets(tmp_path, tiny_chat_model):
    workdir = tmp_path / "alignment"
    made = cli("generate", "--config=configs/generate.py:quick", f"--config.model={tiny_chat_model}",
               "--config.prompts_dataset=benign_contrast:128", "--config.max_new_tokens=2", "--config.batch_size=64",
               f"--workdir={workdir / 'contrast'}")
    assert made.returncode == 0, made.stderr
    result = cli("sweep", "--config=configs/sweeps/alignment.py:tiny", f"--workdir={workdir}",
                 f"--config.set.model={tiny_chat_model}")
    assert result.returncode == 0, result.stdout + result.stderr
    table = {r["label"]: r for r in rows_of(workdir / "sweep.csv")}
    assert set(table) == {"no_contrast", "contrast_112"} and all(r["status"] == "ok" for r in table.values())
    assert all(0 <= float(r[m]) <= 1 for r in table.values() for m in ("asr", "overrefusal"))
    trained = json.loads((workdir / "runs" / table["contrast_112"]["point"] / "config.json").read_text())
    assert trained["data"]["dataset"].endswith(f"{workdir / 'contrast' / 'generations.jsonl'}:112")
    evaluated = json.loads((workdir / "runs" / table["contrast_112"]["point"] / "eval" / "config.json").read_text())
    assert evaluated["overrefusal"]["dataset"] == "benign_contrast_validation:8"
    assert evaluated["harmful"]["dataset"] == "malicious_instruct:8"


@pytest.mark.slow
def test_the_signal_recipe_ablation_runs_its_changes_on_validation_sets(tmp_path, tiny_chat_model):
    """Its prerequisites (compliant answers, signal pre-training) made as its docstring says, the
    two tiny points train as their labels say and measure the validation sets."""
    workdir = tmp_path / "recipe"
    made = cli("generate", "--config=configs/generate.py:quick", f"--config.model={tiny_chat_model}",
               "--config.prompts_dataset=bianchi_safety:8", "--config.max_new_tokens=6", "--config.batch_size=8",
               f"--workdir={workdir / 'compliant'}")
    assert made.returncode == 0, made.stderr
    compliant = str(workdir / "compliant" / "generations.jsonl")
    made = cli("finetune", "--config=configs/finetune.py:quick", f"--config.model={tiny_chat_model}",
               f"--config.data.dataset={compliant},harmful_qa:-4,alpaca_libre:8",
               f"--config.signal.malicious=('{compliant}','harmful_qa')", "--config.signal.head=linear",
               "--config.signal.phase=pretrain", "--config.signal.cls_only=True", "--config.steps=2",
               "--config.batch_size=8", "--config.data.heldout=2",
               "--config.evaluation.tasks=()", f"--workdir={workdir / 'pretrain'}")
    assert made.returncode == 0, made.stderr
    result = cli("sweep", "--config=configs/sweeps/signal_recipe.py:tiny", f"--workdir={workdir}",
                 f"--config.set.model={tiny_chat_model}")
    assert result.returncode == 0, result.stdout + result.stderr
    table = {r["label"]: r for r in rows_of(workdir / "sweep.csv")}
    assert set(table) == {"base", "rechecks+pretrain+benign"} and all(r["status"] == "ok" for r in table.values())
    assert all(0 <= float(r[m]) <= 1 for r in table.values() for m in ("asr", "prefill_asr", "inserted", "auroc"))
    both = json.loads((workdir / "runs" / table["rechecks+pretrain+benign"]["point"] / "config.json").read_text())
    assert both["signal"]["recheck_windows"] == 3 and both["signal"]["compliant"] == compliant
    assert both["signal"]["init"] == str(workdir / "pretrain" / "export") and both["signal"]["benign"]
    base = json.loads((workdir / "runs" / table["base"]["point"] / "config.json").read_text())
    assert base["signal"]["recheck_windows"] == 0 and not base["signal"]["init"] and not base["signal"]["benign"]
    evaluated = json.loads((workdir / "runs" / table["base"]["point"] / "eval" / "config.json").read_text())
    assert evaluated["overrefusal"]["dataset"] == "benign_contrast_validation:4,gsm8k@train:-4"
    assert evaluated["prefill"]["dataset"] == "harmful_qa" and "harmful_qa:100" in evaluated["harmful"]["exclude"]


def test_the_signal_recipe_rule_takes_the_least_insertion_within_the_harm_targets():
    spec = importlib.util.spec_from_file_location("_signal_recipe", REPO / "configs" / "sweeps" / "signal_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rows = [{"label": "base", "asr": "0.0", "prefill_asr": "0.01", "inserted": "0.5"},
            {"label": "benign", "asr": "0.0", "prefill_asr": "0.04", "inserted": "0.1"},
            {"label": "rechecks+benign", "asr": "0.01", "prefill_asr": "0.02", "inserted": "0.1"},
            {"label": "pretrain", "asr": "0.1", "prefill_asr": "0.0", "inserted": "0.0"},  # past the direct target
            {"label": "rechecks", "asr": "", "prefill_asr": "", "inserted": ""}]  # not finished
    assert recipe.choose(rows) == "benign"  # the tie goes to the fewer changes
    assert recipe.choose([{**r, "prefill_asr": "0.5"} for r in rows[:3]]) == "benign"  # none within: the sum
    with pytest.raises(ValueError, match="no point"):
        recipe.choose(rows[-1:])
    assert [p[0] for p in recipe.get_config("smollm2").points] == [
        "base", "benign", "pretrain", "pretrain+benign", "rechecks", "rechecks+benign", "rechecks+pretrain",
        "rechecks+pretrain+benign"]


@pytest.mark.parametrize("preset,sweep", [("smollm2_cpu", "fractions_smollm2"),
                                          ("qwen_cpu", "fractions_qwen_coder_0.5b")])
def test_the_cpu_reproduction_uses_the_fractions_the_committed_sweep_chose(preset, sweep):
    chosen = json.loads((REPO / "experiments" / "results" / sweep / "selected.json").read_text())
    kinds = runs.config_from_file(REPO / "configs" / "reproduce.py", preset).kinds
    assert {kind: kinds[kind.lower()] for kind in chosen} == {kind: c["value"] for kind, c in chosen.items()}
    assert set(chosen) == {"SCU", "UCU", "RU"}


def test_the_cpu_alignment_recipe_is_the_point_the_committed_alignment_sweep_chose():
    """reproduce's (and so signals') CPU alignment is the point configs/sweeps/alignment.py's rule
    chose from the committed results, its contrast component the contrast stage's answers."""
    spec = importlib.util.spec_from_file_location("_alignment_sweep", REPO / "configs" / "sweeps" / "alignment.py")
    alignment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alignment)
    with open(REPO / "experiments" / "results" / "alignment_smollm2" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = alignment.choose(rows)
    row = next(r for r in rows if r["label"] == chosen)
    point = alignment.get_config("smollm2")
    align = runs.config_from_file(REPO / "configs" / "reproduce.py", "smollm2_cpu").align
    assert align.dataset == alignment.mixtures("contrast")[chosen]
    assert align.learning_rate == float(row["optimizer.learning_rate"])
    assert align.steps == int(row["steps"] or point.set.steps) and align.batch_size == point.set.batch_size
    assert runs.config_from_file(REPO / "configs" / "signals.py", "smollm2_cpu").align.dataset == align.dataset


def test_sweep_help_lists_every_shipped_sweep_with_its_presets():
    shown = cli("sweep", "--help")
    assert shown.returncode == 0, shown.stderr
    for path in sorted((REPO / "configs" / "sweeps").glob("*.py")):
        assert f"  configs/sweeps/{path.name}: " in shown.stdout
    assert "configs/sweeps/alignment.py: the alignment recipe of ssah-jax reproduce" in shown.stdout
    assert "``" not in shown.stdout
    one = cli("sweep", "--config=configs/sweeps/protection.py:tiny", "--help")  # one sweep's docstring and keys
    assert one.returncode == 0 and "tiny     1 attack (harmful_qa)" in one.stdout and "``" not in one.stdout
    assert "  set.model = 'tiny-random'" in one.stdout
