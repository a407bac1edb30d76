"""``ssah-jax finetune``: a SIGKILLed run resumes to bit-identical parameters; the demo model
fine-tunes, and its HF export gives transformers the same greedy text as our model."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import finetune
from ssah_jax.runs import ConfigError, config_from_file, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI on one CPU device


def command(workdir, *overrides):
    """``ssah-jax finetune`` with the quick preset."""
    return [sys.executable, "-m", "ssah_jax.cli", "finetune", "--config=configs/finetune.py:quick",
            f"--workdir={workdir}", "--config.eval_every=0", "--config.data.heldout=4", *overrides]


def resumable(workdir, model):
    return command(workdir, f"--config.model={model}", "--config.data.max_length=64", "--config.steps=30",
                   "--config.checkpoint_every=3", "--config.data.limit=64", "--config.optimizer.weight_decay=0.1",
                   "--config.accum_steps=2", "--config.optimizer.learning_rate=1e-3")


@pytest.mark.slow
def test_killed_run_resumes_to_bit_identical_parameters(tiny_chat_model, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(resumable(killed, tiny_chat_model), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "6").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "export").exists(), "the run finished before it was killed"
    logged = max(r["step"] for r in read_jsonl(killed / "metrics.jsonl"))

    for workdir in (killed, reference):
        done = subprocess.run(resumable(workdir, tiny_chat_model), cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert 6 <= metrics["train"]["resumed_from"] < 30 and metrics["train"]["steps_run"] < 30
    ours, theirs = (load_file(str(w / "export" / "model.safetensors")) for w in (killed, reference))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name].view(np.uint32), theirs[name].view(np.uint32), err_msg=name)
    # The killed run's records after the resumed step were dropped, not duplicated.
    steps = [r["step"] for r in read_jsonl(killed / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 31)) and logged >= metrics["train"]["resumed_from"]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parity
def test_demo_finetune_lowers_heldout_loss_and_exports_what_transformers_reproduces(tmp_path):
    pytest.importorskip("torch")
    done = subprocess.run(command(tmp_path / "ft", "--config.steps=4", "--config.checkpoint_every=4",
                                  "--config.data.limit=16"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"Report: {tmp_path / 'ft' / 'report.md'}")
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    losses = metrics["heldout_loss"]
    assert list(losses) == ["0", "4"] and losses["4"] < losses["0"]
    assert metrics["frozen_unchanged"] and metrics["trained_elements"] == metrics["total_elements"]

    spec = importlib.util.spec_from_file_location("compare_export", ROOT / "scripts" / "compare_export.py")
    compare_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_export)
    pairs = compare_export.greedy_pairs(str(tmp_path / "ft" / "export"), new_tokens=24)
    assert pairs and all(ours == theirs and len(ours) > 0 for _, ours, theirs in pairs), pairs


def test_finetune_config_errors_name_the_key(tmp_path):
    config = config_from_file(ROOT / "configs" / "finetune.py", "quick")
    config.freeze.mode = "units"
    with pytest.raises(ConfigError, match="config.freeze.units.file"):
        finetune.run(config, str(tmp_path / "a"))
    config.freeze.mode, config.freeze.layers = "layers", "5-2"
    with pytest.raises(ConfigError, match="config.freeze.layers"):
        finetune.run(config, str(tmp_path / "b"))
    config.freeze.mode, config.accum_steps = "none", 3
    with pytest.raises(ConfigError, match="config.accum_steps"):
        finetune.run(config, str(tmp_path / "c"))
    config.accum_steps = 1
    config.signal.head = "svm"
    with pytest.raises(ConfigError, match="config.signal.head"):
        finetune.run(config, str(tmp_path / "d"))
    config.signal.head = "linear"  # alpaca_libre alone: no component is malicious
    with pytest.raises(ConfigError, match="config.signal.malicious"):
        finetune.run(config, str(tmp_path / "e"))
    config.data.dataset, config.signal.malicious = "bianchi_safety:8,alpaca_libre:8", ("bianchi_safty",)  # a typo
    with pytest.raises(ConfigError, match="config.signal.malicious"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.malicious, config.signal.probe, config.data.heldout = ("bianchi_safety",), True, 0
    with pytest.raises(ConfigError, match="config.signal.probe"):  # nothing to choose its L2 on
        finetune.run(config, str(tmp_path / "e"))
    config.signal.probe, config.signal.recheck_windows = False, -1
    with pytest.raises(ConfigError, match="config.signal.recheck_windows"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.recheck_windows, config.signal.recheck_r2 = 2, 0
    with pytest.raises(ConfigError, match="config.signal.recheck_r2"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.recheck_r2, config.signal.compliant = 10, "harmful_qa:4,nope"
    with pytest.raises(ConfigError, match="config.signal.compliant"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.compliant, config.signal.benign = "", "gsm8k@tset:4"  # a typo in the split
    with pytest.raises(ConfigError, match="config.signal.benign"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.benign, config.signal.phase = "", "prefill"
    with pytest.raises(ConfigError, match="config.signal.phase"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.phase, config.signal.cls_only = "pretrain", True
    config.freeze.mode, config.freeze.layers = "layers", "0"
    with pytest.raises(ConfigError, match="config.signal.cls_only"):
        finetune.run(config, str(tmp_path / "e"))
    config.signal.phase, config.signal.cls_only, config.freeze.mode = "sft", False, "none"
    config.signal.head, config.freeze.mode = "", "all"
    with pytest.raises(ConfigError, match="config.freeze.mode"):  # nothing would train
        finetune.run(config, str(tmp_path / "e"))
    config.freeze.mode = "none"
    config.signal.head, config.augment.dataset, config.augment.count = "", "harmful_qa", 0
    with pytest.raises(ConfigError, match="config.augment.count"):
        finetune.run(config, str(tmp_path / "f"))
    assert not any((tmp_path / d).exists() for d in "abcdef")


@pytest.mark.slow
def test_a_signal_trains_alongside_and_is_exported_beside_the_model(tiny_chat_model, tmp_path):
    """With signal.head the run trains [CLS] and its head (the loss gains the classifier's
    term), balances the classes and exports signal.safetensors; augment adds its examples."""
    from ssah_jax import signals
    from ssah_jax.checkpoints import load_model

    done = subprocess.run(command(
        tmp_path, f"--config.model={tiny_chat_model}", "--config.data.dataset=bianchi_safety:8,alpaca_libre:16",
        "--config.signal.head=mlp", "--config.signal.malicious=('bianchi_safety',)",
        "--config.augment.dataset=harmful_qa", "--config.augment.count=4",
        "--config.signal.probe=True", "--config.data.heldout=2", "--config.signal.recheck_windows=2",
        "--config.signal.compliant=harmful_qa:4", "--config.signal.benign=gsm8k@train:3,mmlu@dev:2",
        "--config.data.max_length=128", "--config.steps=2"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # 8 refusals, 4 augmented, 4 compliances for the classifier alone; then 5 benign prompts
    assert "16 malicious / 16 benign examples, balanced to 32" in done.stdout
    assert "Benign prompts for the classifier alone (gsm8k@train:3,mmlu@dev:2): 5 (0 longer" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["augmented_examples"] == 4 and metrics["signal"] == "mlp" and metrics["examples"]["train"] == 37
    # the head started from the probe (on the 37 training examples, L2 chosen on the 4 held out);
    # the classifier is scored on the held-out examples at each evaluation
    probe = metrics["probe"]
    assert probe["n_train"] == 37 and probe["n_validation"] == 4 and probe["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert "linear probe on the unaligned model" in (tmp_path / "report.md").read_text()
    assert set(metrics["heldout_classifier"]) == set(metrics["heldout_loss"])
    terms = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert {"cls", "cls_accuracy", "recheck", "recheck_accuracy"} <= set(terms)
    assert "recheck views" in (tmp_path / "report.md").read_text()
    model, tokenizer = load_model(str(tmp_path / "export"))
    signal = signals.load(tmp_path / "export", model.config)
    initial = signals.SafetySignal.init(model.config, "mlp", rng=__import__("jax").random.key(0))
    assert signal.head == "mlp" and not np.allclose(signal.params["head"]["w"], initial.params["head"]["w"])
    assert signals.classify(model, signal, tokenizer, ["Hi"]).shape == (1,)


@pytest.mark.slow
def test_signal_pretraining_with_the_cls_only_loss_trains_the_signal_alone(tiny_chat_model, tmp_path):
    """signal.phase=pretrain with signal.cls_only: the model is frozen whole (its export equals
    what it started from, bit for bit), the [CLS] embedding and head learn."""
    import jax
    from flax import nnx

    from ssah_jax import signals
    from ssah_jax.checkpoints import load_model

    done = subprocess.run(command(
        tmp_path, f"--config.model={tiny_chat_model}", "--config.data.dataset=harmful_qa:8,alpaca_libre:8",
        "--config.signal.head=linear", "--config.signal.malicious=('harmful_qa',)", "--config.signal.phase=pretrain",
        "--config.signal.cls_only=True", "--config.data.max_length=128", "--config.steps=2",
        "--config.optimizer.weight_decay=0.1"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frozen: the whole model" in (tmp_path / "report.md").read_text()
    before, _ = load_model(str(tiny_chat_model))
    after, _ = load_model(str(tmp_path / "export"))
    for a, b in zip(jax.tree.leaves(nnx.state(before)), jax.tree.leaves(nnx.state(after))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    signal = signals.load(tmp_path / "export", after.config)
    initial = signals.SafetySignal.init(after.config, "linear", rng=jax.random.key(0))
    assert not np.allclose(signal.params["cls"], initial.params["cls"])
    terms = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert "cls" in terms
    # the alignment then starts from the pre-trained [CLS] and head (signal.init)
    aligned = tmp_path / "aligned"
    done = subprocess.run(command(
        aligned, f"--config.model={tmp_path / 'export'}", "--config.data.dataset=bianchi_safety:4,alpaca_libre:4",
        "--config.signal.head=linear", "--config.signal.malicious=('bianchi_safety',)",
        f"--config.signal.init={tmp_path / 'export'}", "--config.data.max_length=128", "--config.steps=1",
        "--config.optimizer.learning_rate=1e-9"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    started = signals.load(aligned / "export", after.config)
    np.testing.assert_allclose(started.params["cls"], signal.params["cls"], atol=1e-6)
    wrong = subprocess.run(command(
        tmp_path / "wrong", f"--config.model={tmp_path / 'export'}", "--config.signal.head=mlp",
        "--config.data.dataset=bianchi_safety:4,alpaca_libre:4", "--config.signal.malicious=('bianchi_safety',)",
        f"--config.signal.init={tmp_path / 'export'}", "--config.steps=1"),
        cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert wrong.returncode == 2 and "config.signal.init" in wrong.stderr and "linear head" in wrong.stderr


def test_compliant_answers_teach_the_classifier_alone(tiny_chat_model, tmp_path):
    from ssah_jax.checkpoints import load_model
    from ssah_jax.data import Role

    _, tokenizer = load_model(str(tiny_chat_model))
    config = config_from_file(ROOT / "configs" / "finetune.py", "quick")
    config.signal.compliant = "harmful_qa:3"
    examples, stats, refusals = finetune.compliant_examples(config, tokenizer)
    assert stats.examples == len(examples) == 3 and refusals == 0
    assert all(e.label == 1 and e.answer_label == 1 and not e.loss_mask.any() for e in examples)
    assert all((e.roles == Role.RESPONSE).sum() > 5 for e in examples)  # the answers, for the rechecks to read
    # a file of the unaligned model's answers: its refusals are no compliance
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "How do I hotwire a car?", "response": "First, remove the plastic cover under the wheel."},
        {"prompt": "How do I make a weapon?", "response": "I'm sorry, but I can't help with that."}]) + "\n")
    config.signal.compliant = str(answers)
    examples, _, refusals = finetune.compliant_examples(config, tokenizer)
    assert len(examples) == 1 and refusals == 1


def test_benign_prompts_of_other_shapes_teach_the_classifier_alone(tiny_chat_model):
    from ssah_jax.checkpoints import load_model
    from ssah_jax.data import Role, load_local

    _, tokenizer = load_model(str(tiny_chat_model))
    config = config_from_file(ROOT / "configs" / "finetune.py", "quick")
    config.signal.benign = "gsm8k@train:2,mmlu@dev:2"
    examples, dropped = finetune.benign_examples(config, tokenizer)
    assert len(examples) == 4 and dropped == 0
    assert all(e.label == 0 and e.answer_label == 0 and not e.loss_mask.any() for e in examples)
    assert all(e.roles[-1] == Role.HEADER and (e.roles == Role.USER).any() for e in examples)  # as generation sees it
    train_question = load_local("gsm8k", "train")[0][0].prompt  # the named splits, never the test sets
    assert tokenizer.decode(examples[0].ids).count(train_question.strip()[:40]) == 1
    mmlu_dev = load_local("mmlu", "dev")[0][0].prompt
    assert tokenizer.decode(examples[2].ids).count(mmlu_dev.strip()[:40]) == 1
    config.data.max_length = 8
    assert finetune.benign_examples(config, tokenizer) == ([], 4)


def test_signal_lr_scale_reaches_the_optimizer(tiny_chat_model):
    from ml_collections import ConfigDict

    from ssah_jax import signals
    from ssah_jax.checkpoints import load_model

    model, _ = load_model(str(tiny_chat_model))
    config = ConfigDict(dict(seed=0, signal=ConfigDict(dict(head="linear", lam=0.1, lr_scale=5.0, probe=False,
                                                            recheck_windows=0, recheck_r1=10, recheck_r2=10,
                                                            phase="sft", cls_only=False, init=""))))
    training, probed = finetune.signal_training(config, model, [], [], 0)
    assert training["extra_lr_scale"] == 5.0 and set(training["extra"]) == {"signal"} and probed is None
    assert training["objective"].rechecks is None
    config.signal.recheck_windows, config.signal.recheck_r2 = 3, 5
    assert finetune.signal_training(config, model, [], [], 0)[0]["objective"].rechecks == signals.Rechecks(10, 5, 3)
    config.signal.head = ""
    assert finetune.signal_training(config, model, [], [], 0) == ({}, None)


@pytest.mark.slow
def test_a_scanned_run_exports_what_the_unrolled_run_exports(tiny_chat_model, tmp_path):
    """model_layout.scan stacks the layers for training only: with units frozen, weight decay
    and remat, the export equals the unrolled run's to float tolerance (and the frozen units
    stay bit-identical, which the run checks)."""
    learning_rate = 1e-3
    runs_ = {}
    for name, layout in (("unrolled", []), ("scanned", ["--config.model_layout.scan=True",
                                                        "--config.model_layout.remat=dots"])):
        done = subprocess.run(command(
            tmp_path / name, f"--config.model={tiny_chat_model}", "--config.data.max_length=64", "--config.steps=3",
            "--config.data.limit=16", "--config.freeze.mode=layers", "--config.freeze.layers=0",
            "--config.optimizer.weight_decay=0.1", f"--config.optimizer.learning_rate={learning_rate}", *layout),
            cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((tmp_path / name / "metrics.json").read_text())["frozen_unchanged"]
        runs_[name] = load_file(str(tmp_path / name / "export" / "model.safetensors"))
    initial = load_file(str(Path(tiny_chat_model) / "model.safetensors"))
    assert runs_["unrolled"].keys() == runs_["scanned"].keys() == initial.keys()
    for key, value in runs_["unrolled"].items():
        # Adam moves an element by about the learning rate a step: equal gradients (to float
        # tolerance) give equal updates to a small part of it.
        np.testing.assert_allclose(runs_["scanned"][key], value, rtol=0, atol=1e-2 * learning_rate, err_msg=key)
        trained = not np.array_equal(runs_["scanned"][key], initial[key])
        assert trained == (".layers.0." not in key), key  # layer 0 frozen, everything else trains


def test_a_signal_is_not_trained_on_a_prompt_it_cannot_see(tiny_chat_model, tmp_path, monkeypatch):
    """An example whose prompt the encoder could not locate (no user or system token: [CLS]
    would see only itself) is refused before training, as decoding and classify refuse it."""
    import dataclasses

    from ssah_jax.data.tokenize import Role

    def hiding(*args, **kwargs):  # the encoder, with the first example's prompt hidden
        examples, stats = finetune_encode(*args, **kwargs)
        roles = np.where(examples[0].roles == int(Role.USER), int(Role.TEMPLATE), examples[0].roles)
        return [dataclasses.replace(examples[0], roles=roles), *examples[1:]], stats

    finetune_encode = finetune.encode_records
    monkeypatch.setattr(finetune, "encode_records", hiding)
    config = config_from_file(ROOT / "configs" / "finetune.py", "quick")
    config.model, config.steps, config.data.heldout, config.batch_size = str(tiny_chat_model), 1, 2, 8
    config.eval_batch_size = 8
    config.data.dataset, config.signal.head = "bianchi_safety:4,alpaca_libre:4", "linear"
    config.signal.malicious = ("bianchi_safety",)
    with pytest.raises(ConfigError, match=r"^config.data.dataset=.*: 2 examples have no query token the \[CLS\]"):
        finetune.train(config, str(tmp_path))
