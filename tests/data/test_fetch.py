"""``ssah-jax data``: the kit fetched from a local mirror (a ``file://`` copy of ../shared/data),
checked against the recorded sizes and sha256, and the upstream paths (concatenated files, a
file inside a wheel) exercised on local copies of their sources. No network."""

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from ssah_jax.data import DataError, load_local
from ssah_jax.data import fetch as datakit
from ssah_jax.data.registry import DATASETS
from tests.conftest import SHARED_DATA
from tests.helpers import error_line, run_cli

KIT = Path(SHARED_DATA)


def test_the_manifest_records_every_file_the_loaders_read_and_the_shared_kit_matches_it():
    files = datakit.manifest()
    for name, spec in DATASETS.items():
        for path in spec.splits.values():
            assert any(f == path or f.startswith(path + "/") for f in files), (name, path)
    assert all(e["urls"] and e["license"] and e["source"] and len(e["sha256"]) == 64 for e in files.values())
    assert datakit.check((), KIT) == {}
    # a dataset's files are the ones its splits read, with the licence that goes with them
    assert datakit.dataset_files(["harmbench"]) == ["harmful/LICENSE.harmbench.txt",
                                                    "harmful/harmbench_behaviors_text_all.csv"]
    assert len(datakit.dataset_files(["mmlu"])) == 114
    with pytest.raises(DataError, match="unknown dataset 'advbnch'"):
        datakit.dataset_files(["advbnch"])


def test_fetch_from_a_mirror_writes_the_layout_the_loaders_read_and_keeps_what_is_intact(tmp_path):
    target = tmp_path / "kit"
    done = datakit.fetch(["advbench", "sst2"], target, mirror=KIT.as_uri(), progress=False)
    assert done == {"harmful/advbench.csv": "fetched", "utility/sst2/glue_dev.tsv": "fetched",
                    "utility/sst2/train.tsv": "fetched"}
    records, _ = load_local("advbench", data_dir=target)
    assert len(records) == 520
    (target / "utility/sst2/train.tsv").write_text("altered\n")
    again = datakit.fetch(["advbench", "sst2"], target, mirror=KIT.as_uri(), progress=False)
    assert again == {"harmful/advbench.csv": "kept", "utility/sst2/glue_dev.tsv": "kept",
                     "utility/sst2/train.tsv": "fetched"}
    assert datakit.check(["sst2"], target) == {}


def test_a_corrupted_or_missing_source_file_is_named_and_not_written(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(KIT / "harmful", mirror / "harmful")
    bad = mirror / "harmful" / "xstest_prompts.csv"
    bad.write_bytes(bad.read_bytes().replace(b"a", b"b", 1))  # one byte changed
    target = tmp_path / "kit"
    with pytest.raises(DataError, match=r"harmful/xstest_prompts.csv: what .*mirror/harmful/xstest_prompts.csv gave"):
        datakit.fetch(["xstest"], target, mirror=mirror.as_uri(), progress=False)
    assert not (target / "harmful" / "xstest_prompts.csv").exists()
    assert not list(target.rglob("*.partial"))
    with pytest.raises(DataError, match=r"mirror/attack/aoa_identity_shift.json: .*No such file"):
        datakit.fetch(["aoa"], target, mirror=mirror.as_uri(), progress=False)


def test_upstream_sources_concatenated_and_inside_a_wheel(tmp_path, monkeypatch):
    """alpaca_libre is three upstream files joined; harmful_qa a file inside PyPI's pyrit wheel:
    the manifest's URLs, pointed at local copies of those sources."""
    libre = (KIT / "benign" / "alpaca_libre.jsonl").read_bytes()
    cut = [0, len(libre) // 3, 2 * len(libre) // 3, len(libre)]
    parts = []
    for i in range(3):
        part = tmp_path / "upstream" / f"alpaca_libre_tasks_v{i + 1}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(libre[cut[i]:cut[i + 1]])
        parts.append(part.as_uri())
    wheel = tmp_path / "upstream" / "pyrit-1.1.0-py3-none-any.whl"
    entries = json.loads(json.dumps(datakit.manifest()))  # a copy
    member = entries["attack/harmful_qa_many_shot.json"]["member"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyrit/__init__.py", "")
        archive.writestr(member, (KIT / "attack" / "harmful_qa_many_shot.json").read_bytes())
    wheel.write_bytes(buffer.getvalue())
    assert len(entries["benign/alpaca_libre.jsonl"]["urls"]) == 3
    entries["benign/alpaca_libre.jsonl"]["urls"] = parts
    entries["attack/harmful_qa_many_shot.json"]["urls"] = [wheel.as_uri()]
    monkeypatch.setattr(datakit, "manifest", lambda: entries)
    target = tmp_path / "kit"
    assert set(datakit.fetch(["alpaca_libre", "harmful_qa"], target, progress=False).values()) == {"fetched"}
    for path in ("benign/alpaca_libre.jsonl", "attack/harmful_qa_many_shot.json"):
        assert hashlib.sha256((target / path).read_bytes()).hexdigest() == entries[path]["sha256"]


@pytest.mark.slow
def test_data_command_checks_fetches_and_names_what_is_wrong(tmp_path):
    target = tmp_path / "kit"
    fetched = run_cli("data", "fetch", "advbench", "xstest", f"--mirror={KIT.as_uri()}", f"--data_dir={target}")
    assert fetched.returncode == 0, fetched.stderr
    assert "advbench: MIT (AdvBench, Zou et al. 2023); from andyrdt/refusal_direction@9d852fae1a91" in fetched.stdout
    assert "2 files fetched, 0 already intact" in fetched.stdout
    assert run_cli("data", "check", f"--data_dir={KIT}").returncode == 0
    changed = target / "harmful" / "xstest_prompts.csv"
    changed.write_bytes(changed.read_bytes().replace(b"a", b"b", 1))
    checked = run_cli("data", "check", "advbench", "xstest", f"--data_dir={target}")
    assert checked.returncode == 1
    assert f"{changed}: altered (sha256" in checked.stdout and "advbench" not in checked.stdout
    assert "`ssah-jax data fetch advbench xstest` fetches them" in checked.stderr
    unknown = run_cli("data", "fetch", "advbnch", f"--data_dir={target}")
    assert unknown.returncode == 2 and error_line(unknown).startswith("ssah-jax: data fetch: unknown dataset 'advbnch'")
