"""Multi-host runs: two processes on this machine (4 fake CPU devices each, gloo collectives)
run the same ``ssah-jax`` command as one 8-device process and get the same results; only
process 0 writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ssah_jax.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.multihost


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def one_process(experiment: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-m", "ssah_jax.cli", experiment, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def two_processes(experiment: str, *flags: str) -> list[tuple[str, str]]:
    """(stdout, stderr) of processes 0 and 1 of one run."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "ssah_jax.cli", experiment, *flags,
                               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.fixture(scope="module")
def finetuned(tiny_chat_model, tmp_path_factory):
    """The quick finetune preset (batch 8: one row per device, FSDP over all 8 devices) in one
    8-device process and in two 4-device processes."""
    root = tmp_path_factory.mktemp("multihost")
    flags = ["--config=configs/finetune.py:quick", f"--config.model={tiny_chat_model}", "--config.batch_size=8",
             "--config.eval_batch_size=8"]
    one_process("finetune", f"--workdir={root / 'one'}", *flags)
    outputs = two_processes("finetune", f"--workdir={root / 'two'}", *flags)
    return root / "one", root / "two", outputs


@pytest.mark.slow
def test_two_processes_train_the_parameters_of_one(finetuned, tiny_chat_model):
    one, two, _ = finetuned
    ours, theirs = (load_file(str(w / "export" / "model.safetensors")) for w in (one, two))
    start = load_file(str(tiny_chat_model / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    same = sum(int(np.sum(ours[k].view(np.uint32) == theirs[k].view(np.uint32))) for k in ours)
    total = sum(v.size for v in ours.values())
    # Not bit for bit: the gradient and loss sums over devices run in another order when gloo
    # reduces across two processes than when XLA reduces over one process's eight devices, and
    # float addition is not associative. The step-0 held-out loss (no training yet) already
    # differs in its last bits; after 6 steps 99% of the elements are still bit-identical and the
    # rest differ by far less than training moved them.
    assert same / total > 0.97
    for name in ours:
        moved = np.max(np.abs(ours[name] - start[name]))
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=max(1e-3 * moved, 1e-9), err_msg=name)
    losses = [json.loads((w / "metrics.json").read_text())["heldout_loss"] for w in (one, two)]
    assert losses[0].keys() == losses[1].keys() == {"0", "3", "6"}
    for step in losses[0]:
        assert losses[0][step] == pytest.approx(losses[1][step], rel=1e-6)


def test_only_process_0_writes_and_reports(finetuned):
    one, two, outputs = finetuned
    (out0, _), (out1, err1) = outputs
    assert f"Report: {two / 'report.md'}" in out0
    assert out1 == ""  # process 1 is silent but for warnings and errors
    assert "train:" not in err1  # and shows no progress bar
    # Every record once (two writers would have appended each line twice).
    assert [(r["step"], r["kind"]) for r in read_jsonl(two / "metrics.jsonl")] == \
        [(r["step"], r["kind"]) for r in read_jsonl(one / "metrics.jsonl")]
    def files(workdir):  # TensorBoard event files are named by their time
        return sorted("tensorboard/events" if p.parent.name == "tensorboard" else p.relative_to(workdir).as_posix()
                      for p in workdir.rglob("*") if "checkpoints" not in p.parts)

    assert files(two) == files(one)


@pytest.mark.slow
def test_two_processes_evaluate_every_row_once(finetuned, tmp_path):
    one, _, _ = finetuned
    # Every task of the quick preset, a copy of the model on each device of a host (8 devices in
    # one process, 4 in each of two): a batch of 4 is filled up to 8 rows in one, not in the other.
    flags = ["--config=configs/evaluate.py:quick", f"--config.model={one / 'export'}", "--config.batch_size=4",
             "--config.mesh.data=-1"]
    one_process("evaluate", f"--workdir={tmp_path / 'one'}", *flags)
    # 8 harmful prompts at 4 per host and batch: one round of both hosts per ASR setting.
    two_processes("evaluate", f"--workdir={tmp_path / 'two'}", *flags)
    names = sorted(p.name for p in (tmp_path / "one" / "rows").iterdir())
    assert len(names) == 9, names  # asr x 2, prefill, sweep, overrefusal, mmlu, sst2, gsm8k, perplexity
    for name in names:
        rows = [read_jsonl(tmp_path / w / "rows" / name) for w in ("one", "two")]
        assert rows[0] == rows[1], name
        assert len({r["prompt"] for r in rows[1]}) == len(rows[1]) >= 8, name
    metrics = [json.loads((tmp_path / w / "metrics.json").read_text()) for w in ("one", "two")]
    strip = lambda m: {k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in m.items()}  # noqa: E731
    assert strip(metrics[0]) == strip(metrics[1])


@pytest.mark.slow
def test_two_processes_prune_with_the_scores_and_rows_of_one(tiny_chat_model, tmp_path):
    """The quick prune preset on a mesh of data x tensor 2 per host: two 4-device processes
    (each scoring and decoding on its own devices, the prompts dealt out) give the unit scores of
    one 8-device process within 1e-5, the same unit kinds, and its rows, each written once."""
    flags = ["--config=configs/prune.py:quick", f"--config.model={tiny_chat_model}", "--config.mesh.tensor=2"]
    one_process("prune", f"--workdir={tmp_path / 'one'}", *flags)
    two_processes("prune", f"--workdir={tmp_path / 'two'}", *flags)
    for which in ("safety", "utility"):
        scores = [np.load(tmp_path / w / "scores" / f"{which}.npz") for w in ("one", "two")]
        for module in ("attn", "mlp"):
            np.testing.assert_allclose(scores[1][module], scores[0][module], rtol=1e-5)
    units = [np.load(tmp_path / w / "units.npz") for w in ("one", "two")]
    assert units[0].files == units[1].files
    for key in units[0].files:  # the kinds exactly, the scores kept beside them within 1e-5
        if units[0][key].dtype.kind == "f":
            np.testing.assert_allclose(units[1][key], units[0][key], rtol=1e-5)
        else:
            np.testing.assert_array_equal(units[1][key], units[0][key])
    for variant in ("dense", "minus_SCU", "minus_UCU", "minus_RU", "minus_random"):
        for task in ("asr_no_system", "asr_system", "mmlu", "sst2", "perplexity"):
            rows = [read_jsonl(tmp_path / w / "variants" / variant / "rows" / f"{task}.jsonl") for w in ("one", "two")]
            assert rows[0] == rows[1], (variant, task)
            assert len({r["prompt"] for r in rows[1]}) == len(rows[1]) == 8, (variant, task)


@pytest.mark.slow
def test_multihost_flags_are_checked(tmp_path):
    base = [sys.executable, "-m", "ssah_jax.cli", "finetune", "--config=configs/finetune.py:quick",
            f"--workdir={tmp_path / 'w'}"]
    partial = subprocess.run(base + ["--num_processes=2"], cwd=ROOT, capture_output=True, text=True)
    assert partial.returncode == 2
    assert partial.stderr.strip().splitlines()[-1] == (
        "ssah-jax: --multihost: --coordinator_address, --process_id must be given too (all three, or none to "
        "detect the cluster)")
    wrong = subprocess.run(base + ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == "ssah-jax: --process_id=2: must be in 0 .. 1 (--num_processes)"
    assert not (tmp_path / "w").exists()


def test_tpu_pod_launcher_runs_one_command_on_every_worker():
    script = str(ROOT / "scripts" / "launch_tpu_pod.sh")
    done = subprocess.run(["bash", script, "--name=pod", "--zone=us-central2-b", "--type=v4-32", "--bucket=b",
                           "--dry-run", "--", "ssah-jax", "finetune", "--config=configs/finetune.py:gpu",
                           "--workdir=/mnt/b/run", "--config.data.dataset=a:1,b:2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32")
    assert all("--worker=all" in line for line in lines[1:]) and len(lines) == 4
    assert "gcsfuse" in lines[2] and "[tpu]" in lines[2]
    assert lines[3].endswith("--command=cd ~/ssah_jax && python3 -m ssah_jax.cli finetune "
                             "--config=configs/finetune.py:gpu --workdir=/mnt/b/run --config.data.dataset=a:1\\,b:2 "
                             "--multihost")
    missing = subprocess.run(["bash", script, "--zone=z", "--", "ssah-jax"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--name and --zone are required" in missing.stderr
