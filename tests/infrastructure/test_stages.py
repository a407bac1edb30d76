"""The stage machinery: identities that reach downstream stages, resume and timing across kills."""

import json
import sys
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from ssah_jax import pipeline, runs, stages


def _identities(configs, workdir=Path("/w")):
    graph = {"a": (), "b": ("a",), "c": ("b",), "d": ()}
    excluded = {"a": ("batch_size",)}  # speed only
    return stages.identities(graph, lambda s: runs.determining(ConfigDict(configs[s]), excluded.get(s, ())),
                             graph.__getitem__, workdir)


def test_a_changed_stage_changes_every_stage_downstream_and_no_other():
    configs = {"a": {"lr": 1.0, "batch_size": 8}, "b": {"k": 1}, "c": {"out": "/w/b/export"}, "d": {"n": 2}}
    base = _identities(configs)
    assert list(base) == ["a", "b", "c", "d"] and base["c"]["inputs"] == {"b": base["b"]["identity"]}
    faster = _identities({**configs, "a": {"lr": 1.0, "batch_size": 64}})  # an excluded key
    assert faster == base
    changed = _identities({**configs, "a": {"lr": 2.0, "batch_size": 8}})
    assert [s for s in base if changed[s]["identity"] != base[s]["identity"]] == ["a", "b", "c"]
    moved = _identities({**configs, "c": {"out": "/v/b/export"}}, Path("/v"))  # the workdir moved
    assert moved["c"]["identity"] == base["c"]["identity"] and moved["c"]["given"] == {"out": "<workdir>/b/export"}


def test_a_stage_resumed_after_a_kill_counts_the_time_of_every_invocation(tmp_path, monkeypatch):
    monkeypatch.setattr(stages.StageTimer.__init__, "__defaults__", (0.05,))  # beat every 50 ms
    record, stage = {"identity": "0" * 64}, tmp_path / "stage"

    def killed(directory):
        time.sleep(0.3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(stage, killed, record)
    assert not (stage / "stage.json").exists()
    stages.run_stage(stage, lambda directory: time.sleep(0.2), record)
    record = json.loads((stage / "stage.json").read_text())
    assert record["invocations"] == 2 and 0.5 <= record["seconds"] < 5
    assert not (stage / "elapsed.json").exists()


@pytest.mark.slow
def test_a_stage_finished_with_the_same_identity_in_another_workdir_is_copied_not_computed(tmp_path):
    """config.reuse of `ssah-jax signals`: its align_sft is reproduce's align_full (same identity)."""
    same, other = {"identity": "1" * 64}, {"identity": "2" * 64}
    source = tmp_path / "reproduce" / "align_full"
    stages.run_stage(source, lambda d: (d / "sub").mkdir() or (d / "sub" / "weights").write_text("w"), same)
    elsewhere = stages.finished_elsewhere(tmp_path / "reproduce")
    assert elsewhere == {same["identity"]: source} and stages.finished_elsewhere(tmp_path / "missing") == {}

    def never(directory):
        raise AssertionError("computed again")

    target = tmp_path / "signals" / "align_sft"
    (target / "checkpoints").mkdir(parents=True)  # a partial run of the same computation: replaced
    stages.run_stage(target, never, {**same, "config": {"k": 1}}, elsewhere)
    copied = json.loads((target / "stage.json").read_text())
    assert (target / "sub" / "weights").read_text() == "w" and not (target / "checkpoints").exists()
    assert copied["copied_from"] == str(source) and copied["config"] == {"k": 1}
    assert copied["identity"] == same["identity"] and copied["seconds"] == json.loads(
        (source / "stage.json").read_text())["seconds"]
    stages.run_stage(tmp_path / "signals" / "eval", lambda d: time.sleep(0.1), other, elsewhere)  # not there
    computed = json.loads((tmp_path / "signals" / "eval" / "stage.json").read_text())
    assert "copied_from" not in computed
    table = "\n".join(stages.times_table([("align_sft", copied), ("eval", computed)], [], tmp_path / "log"))
    assert "align_sft (copied from" in table and "**computed here**" in table
    # the other workdir redid the stage with other values after it was indexed: computed here
    (source / "stage.json").write_text(json.dumps({**copied, "identity": "3" * 64}))
    ran = []
    stages.run_stage(tmp_path / "signals2" / "align_sft", ran.append, same, elsewhere)
    assert ran and "copied_from" not in json.loads((tmp_path / "signals2" / "align_sft" / "stage.json").read_text())


@pytest.mark.parametrize("added", [dict(reuse="runs/reproduce"),  # signals' config.reuse
                                   dict(align_sweep=ConfigDict(dict(csv="s.csv", point="p")))])  # reproduce's
def test_a_workdir_from_before_an_added_section_is_resumed(tmp_path, added):
    from ssah_jax import runs

    old = ConfigDict(dict(stages=("all",), jax_cache=False, model="m"))
    runs.prepare_workdir(tmp_path / "w", old, staged=True)
    new = ConfigDict(dict(stages=("all",), jax_cache=False, model="m", **added))
    sections = tuple(added)  # as the pipeline declares it (ADDED_SECTIONS)
    with pytest.raises(runs.WorkdirError, match="another experiment"):  # undeclared, it would be
        runs.prepare_workdir(tmp_path / "w", new, staged=True)
    runs.prepare_workdir(tmp_path / "w", new, sections=sections, staged=True)  # not "a run of another experiment"
    with pytest.raises(runs.WorkdirError, match="another experiment"):  # an unknown section still is
        runs.prepare_workdir(tmp_path / "w", ConfigDict(dict(stages=("all",), jax_cache=False, model="m", x=1)),
                             sections=sections, staged=True)


def _git(repo, *args):
    import subprocess

    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _code_version_of(provenance_py):
    """code_version() of a copy of ssah_jax/runs/provenance.py, run in a fresh interpreter."""
    import subprocess

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('r', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.code_version())")
    return subprocess.run([sys.executable, "-c", code, str(provenance_py)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_an_invocation_records_the_commit_of_the_code_it_ran(tmp_path):
    """The commit that last changed the code a checkout's run executed (a report over several
    invocations says which code made which stage); None for a copy outside its git checkout."""
    import shutil
    import subprocess

    from ssah_jax import runs

    root = Path(runs.__file__).resolve().parents[2]  # <root>/ssah_jax/runs/__init__.py
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("ssah_jax is not running from a git checkout")
    config = ConfigDict(dict(stages=("all",), jax_cache=False))
    out = pipeline.open_workdir(config, tmp_path / "w", ["a"], {}, lambda s: False, overwrite=False)
    record = json.loads((out / "invocations.jsonl").read_text().splitlines()[-1])
    assert record["code"] == runs.code_version() and record["stages"] == ["a"]

    repo = tmp_path / "repo"  # a checkout of its own: code, then docs and tests, then a config
    package, skip = Path("ssah_jax", "runs"), shutil.ignore_patterns("__pycache__")
    provenance = package / "provenance.py"  # where code_version is
    shutil.copytree(root / package, repo / package, ignore=skip)
    (repo / "configs").mkdir()
    (repo / "configs" / "c.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q", str(repo))

    def commit(message):
        _git(repo, "add", "-A")
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)

    commit("code")
    code = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "README.md").write_text("docs\n")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_x.py").write_text("\n")
    (repo / "experiments" / "results").mkdir(parents=True)
    (repo / "experiments" / "results" / "REPORT.md").write_text("results\n")
    commit("docs, tests and results")
    assert _code_version_of(repo / provenance) == code  # the stages' code did not change
    (repo / "configs" / "c.py").write_text("x = 2\n")
    assert _code_version_of(repo / provenance) == code + "+local changes"
    commit("config")
    assert _code_version_of(repo / provenance) == _git(repo, "rev-parse", "--short", "HEAD") != code

    copy = tmp_path / "inside" / "repo"  # a copy inside another git checkout is not that checkout
    shutil.copytree(root / package, copy / package, ignore=skip)
    _git(tmp_path, "init", "-q", str(tmp_path / "inside"))
    assert _code_version_of(copy / provenance) == "None"


def test_stage_records_carry_their_code_and_the_table_warns_when_it_differs(tmp_path, monkeypatch):
    from ssah_jax import runs

    versions = iter(["abc1234", "def5678"])
    monkeypatch.setattr(runs, "code_version", lambda: next(versions))
    stage = tmp_path / "s"

    def killed(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(stage, killed, {})
    stages.run_stage(stage, lambda directory: None, {})  # resumed by newer code
    record = json.loads((stage / "stage.json").read_text())
    assert record["code"] == ["abc1234", "def5678"]
    same = {"seconds": 60.0, "invocations": 1, "finished": "t", "code": ["abc1234"]}
    lines = stages.times_table([("a", same), ("b", same)], [], tmp_path / "inv.jsonl")
    assert "| a | 60 | 1.0 | 1 | t | abc1234 |" in lines and not any("different code" in x for x in lines)
    lines = stages.times_table([("a", same), ("b", record), ("c", {**same, "code": None})], [], tmp_path / "i")
    warning = next(x for x in lines if "different code" in x)
    assert "abc1234, def5678" in warning and "not recorded" in warning


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_finished_stage_hands_the_memory_it_freed_back(tmp_path):
    """Heap memory freed below a live allocation stays resident until ``malloc_trim``: run_stage
    returns it after each stage (else a pipeline's stages pile up; see stages.release_memory)."""
    import os

    import numpy as np

    def resident():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stage(directory):
        blocks = [np.ones(8192) for _ in range(4000)]  # 64 KiB each (below the mmap threshold): 250 MiB
        pin = np.ones(8192)  # allocated after them: the heap cannot shrink from its top
        del blocks
        stage.kept, stage.pin = resident(), pin

    stages.run_stage(tmp_path / "a", stage, {"identity": "a"})
    assert stage.kept - resident() > 150 * 2**20
