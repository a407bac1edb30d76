"""Fine-tune a model (response-only SFT) with a freeze setting; resumable, exported to HF.

Writes into the workdir: ``config.json``, ``checkpoints/`` (orbax; re-running the command
resumes from the latest; a re-run with other values of the determining keys is refused),
``metrics.jsonl`` and ``tensorboard/`` (training loss, gradient norm, learning rate; held-out
response loss), ``export/`` (an HF directory that transformers and
``ssah_jax.checkpoints.load_model`` read; LoRA merged in), ``loss.png``, ``metrics.json`` and
``report.md``; with ``evaluation.tasks`` set, then ``eval/``: an ``ssah-jax evaluate`` run of
the export (its own identity and resume), after the training's arrays are freed.

With ``signal.head`` set, the explicit safety signal (Li & Kim 2025) trains alongside: a
``[CLS]`` embedding and classifier head, the loss ``L_sft + signal.lam * L_cls`` with the
components of ``signal.malicious`` labelled malicious (oversampled to the benign count); the
export then holds ``signal.safetensors`` beside the model's files. With ``augment.dataset``
set, the training data gains the deep-alignment augmentation of Qi et al. (2024): answers that
start with k tokens of a harmful response and turn into ``augment.refusal``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from experiments import evaluate
from experiments._report import save_figure
from ssah_jax import hosts, runs, signals
from ssah_jax.attribution import UnitMapMismatch
from ssah_jax.checkpoints import load_model, save_hf
from ssah_jax.data import load_labelled_mixture, load_mixture, parse_mixture
from ssah_jax.data import recovery_examples as recovery
from ssah_jax.data.batching import balance_classes, batch_dataset, bucket_lengths
from ssah_jax.data.tokenize import EncodeStats, Example, encode_prompt, encode_records
from ssah_jax.evaluation import is_refusal
from ssah_jax.masking import GROUPS
from ssah_jax.models import REMAT_POLICIES, Layout, with_layout
from ssah_jax.sharding import make_mesh, shard_batch, use_rules
from ssah_jax.train import lora
from ssah_jax.train.loop import LoopConfig, fit
from ssah_jax.train.memory import DecodeSpec, PlanItem
from ssah_jax.train.setup import FREEZE_MODES, FreezeSpec, TrainingSpec, parse_layers
from ssah_jax.train.step import SCHEDULES, OptimizerConfig

# Keys that only affect speed or logging; every other key determines the trained parameters, so
# a workdir holding a run with other values of them is refused (resuming would mix two runs).
# The held-out loss is a sum over examples that eval_batch_size only groups; the mesh places the
# same computation on the devices.
# Remat recomputes the same values (a run may resume with another policy).
# The evaluation after training runs in eval/, a workdir that records and checks its own identity
# (SUBRUNS: sections out of this run's identity because their run checks them).
SUBRUNS = ("evaluation",)
EXCLUDED = ("log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "mesh",
            "model_layout.remat", *SUBRUNS)
# Keys added after results were recorded, at the value that gives the results of before
# (runs.determining), and the sections added (a workdir from before them is resumed).
ADDED = {"signal.lr_scale": 1.0, "signal.probe": False, "signal.recheck_windows": 0, "signal.recheck_r1": 10,
         "signal.recheck_r2": 10, "signal.compliant": "", "signal.phase": "sft", "signal.cls_only": False,
         "signal.benign": "", "signal.init": "",
         "model_layout.scan": False, "model_layout.remat": "none",
         **evaluate.ADDED}
ADDED_SECTIONS = ("model_layout", "evaluation")


def validate(config: ConfigDict) -> None:
    check = functools.partial(runs.check, config)
    runs.dtype(config, "compute_dtype")
    if config.evaluation.tasks:
        runs.check(config, "evaluation.dtype", lambda v: v in runs.DTYPES, f"must be one of {sorted(runs.DTYPES)}")
        evaluate.validate(config, "evaluation.")
    check("steps", lambda v: v >= 1, "must be >= 1")
    check("batch_size", lambda v: v >= 1, "must be >= 1")
    check("accum_steps", lambda v: v >= 1 and config.batch_size % v == 0, "must divide batch_size")
    check("data.limit", lambda v: v >= 0, "must be >= 0 (0 = all)")
    check("data.heldout", lambda v: v >= 0, "must be >= 0")
    check("data.max_length", lambda v: v >= 16, "must be >= 16")
    runs.check_parses(config, "data.dataset", parse_mixture)
    o = "optimizer."
    check(o + "learning_rate", lambda v: v > 0, "must be > 0")
    check(o + "schedule", lambda v: v in SCHEDULES, f"must be one of {SCHEDULES}")
    check(o + "warmup_steps", lambda v: 0 <= v <= config.steps, "must be in [0, steps]")
    check(o + "end_fraction", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    check(o + "weight_decay", lambda v: v >= 0, "must be >= 0")
    check(o + "clip_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)")
    f = "freeze."
    check(f + "mode", lambda v: v in FREEZE_MODES, f"must be one of {FREEZE_MODES}")
    check(f + "groups", lambda v: set(v) <= set(GROUPS), f"must be a subset of {GROUPS}")
    check(f + "mode", lambda v: v != "all" or bool(config.signal.head),
          "all freezes the whole model: it needs a safety signal to train (signal.head)")
    if config.freeze.mode in ("units", "only_units"):
        check(f + "units.file", lambda v: bool(v), "is required with freeze.mode=units / only_units")
        check(f + "units.selection", lambda v: bool(v), "is required with freeze.mode=units / only_units")
    if config.freeze.mode == "layers":
        def layers_ok(v):
            try:
                return bool(parse_layers(v))
            except ValueError:
                return False
        check(f + "layers", layers_ok, 'must be a layer range "i-j" with freeze.mode=layers')
    check(f + "lora.rank", lambda v: v >= 1, "must be >= 1")
    check(f + "lora.targets", lambda v: len(v) > 0 and set(v) <= set(lora.TARGETS),
          f"must be a non-empty subset of {sorted(lora.TARGETS)}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
        check(key, lambda v: v >= 1, "must be >= 1")
    check("eval_every", lambda v: v >= 0, "must be >= 0")
    check("model_layout.remat", lambda v: v in REMAT_POLICIES, f"must be one of {tuple(REMAT_POLICIES)}")
    sig = config.signal
    check("signal.head", lambda v: v in ("",) + signals.HEADS, f"must be '' (no signal) or one of {signals.HEADS}")
    if sig.head:
        check("signal.lam", lambda v: v > 0, "must be > 0")
        check("signal.lr_scale", lambda v: v > 0, "must be > 0")
        check("signal.probe", lambda v: not v or config.data.heldout > 0,
              "needs held-out examples (data.heldout > 0) to choose the probe's regularisation on")
        names = [name for name, _ in parse_mixture(config.data.dataset)]
        check("signal.malicious", lambda v: set(v) <= set(names) and set(v) and set(names) - set(v),
              f"must name some but not all of data.dataset's components {names} (the rest are benign)")
        check("freeze.mode", lambda v: v != "lora", "lora cannot train the safety signal (set signal.head='')")
        check("signal.recheck_windows", lambda v: v >= 0, "must be >= 0 (0: the first check's view alone)")
        if sig.recheck_windows:
            for key in ("recheck_r1", "recheck_r2"):
                check(f"signal.{key}", lambda v: v >= 1, "must be >= 1")
        for key in ("compliant", "benign"):
            if sig[key]:
                runs.check_parses(config, f"signal.{key}", parse_mixture)
        check("signal.phase", lambda v: v in signals.PHASES, f"must be one of {signals.PHASES}")
        check("signal.cls_only", lambda v: not v or config.freeze.mode in ("none", "all"),
              f"freezes the whole model itself: freeze.mode must be 'none' or 'all', not {config.freeze.mode!r}")
    if config.augment.dataset:
        runs.check_parses(config, "augment.dataset", parse_mixture)
        check("augment.count", lambda v: v >= 1, "must be >= 1 with augment.dataset")
        check("augment.max_tokens", lambda v: v >= 1, "must be >= 1")
        check("augment.refusal", lambda v: bool(v.strip()), "must be a refusal text")


def training_spec(config: ConfigDict) -> TrainingSpec:
    """The typed training settings of a (validated) finetune config."""
    o, f = config.optimizer, config.freeze
    return TrainingSpec(
        optimizer=OptimizerConfig(learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
                                  total_steps=config.steps, end_fraction=o.end_fraction,
                                  weight_decay=o.weight_decay, clip_norm=o.clip_norm),
        batch_size=config.batch_size, accum_steps=config.accum_steps, max_length=config.data.max_length,
        compute_dtype=runs.DTYPES[config.compute_dtype],
        layout=Layout(scan=config.model_layout.scan, remat=config.model_layout.remat), mesh=dict(config.mesh),
        lora=lora.LoraConfig(f.lora.rank, f.lora.alpha, tuple(f.lora.targets)) if f.mode == "lora" else None,
        seed=config.seed)


def decode_spec(config: ConfigDict) -> DecodeSpec:
    """The typed decoding settings of an ``evaluate`` or ``generate`` config, on its mesh."""
    return DecodeSpec(batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                      dtype=runs.DTYPES[config.dtype], mesh=dict(config.mesh))


def model_source(ref: str) -> str:
    """A finetune workdir stands for its export."""
    export = Path(ref) / "export"
    return str(export) if (export / "config.json").exists() else ref


def split_records(config: ConfigDict) -> tuple[list, list]:
    """(training records, held-out records). ``data.dataset`` is a mixture spec
    (``"bianchi_safety:128,alpaca_libre:256"``): each component's last ``data.heldout`` usable
    records are held out and its first ``limit`` of the rest train; ``data.limit`` caps the
    concatenation."""
    d = config.data
    try:
        train, heldout = load_mixture(d.dataset, config.data_dir or None, split=d.split or None,
                                      heldout=d.heldout, responses=True)
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.data.dataset={d.dataset!r}: {e}") from None
    return (train[: d.limit] if d.limit else train), heldout


def labelled_records(config: ConfigDict) -> tuple[tuple[list, list[int]], tuple[list, list[int]]]:
    """:func:`split_records` (the same records in the same order) with each record's class for
    the safety signal: ``((train records, labels), (held-out records, labels))``, 1 for the
    components named in ``signal.malicious``, 0 for the others; all 0 without a signal."""
    d = config.data
    try:
        (train, labels), heldout = load_labelled_mixture(
            d.dataset, config.data_dir or None, positive=config.signal.malicious if config.signal.head else (),
            split=d.split or None, heldout=d.heldout, responses=True)
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.data.dataset={d.dataset!r}: {e}") from None
    return ((train[: d.limit], labels[: d.limit]) if d.limit else (train, labels)), heldout


def recovery_examples(config: ConfigDict, tokenizer: Any) -> tuple[list, EncodeStats]:
    """The deep-alignment augmentation (:func:`ssah_jax.data.recovery_examples`) of the last
    ``augment.count`` records of ``augment.dataset`` (a fine-tuning attack takes its records from
    the front), seeded by ``seed``; labelled malicious when a signal trains."""
    a = config.augment
    try:
        records = load_mixture(a.dataset, config.data_dir or None, responses=True)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.augment.dataset={a.dataset!r}: {e}") from None
    runs.check(config, "augment.count", lambda v: v <= len(records), f"{a.dataset} has {len(records)} records")
    return recovery(tokenizer, records[-a.count :], refusal=a.refusal, max_tokens=a.max_tokens,
                    max_length=config.data.max_length, seed=config.seed, label=int(bool(config.signal.head)))


def compliant_examples(config: ConfigDict, tokenizer: Any) -> tuple[list, EncodeStats, int]:
    """The records of ``signal.compliant`` (harmful prompts with harmful compliant answers, e.g.
    the unaligned model's own answers to training prompts) as examples the classifier alone
    learns from: malicious query and answer (``label`` and ``answer_label`` 1), no token a
    training target (the LM never learns the answers); their encoding's stats; and how many
    answers were dropped as refusals (the keyword judge's verdict)."""
    try:
        records = load_mixture(config.signal.compliant, config.data_dir or None, responses=True)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.signal.compliant={config.signal.compliant!r}: {e}") from None
    compliant = [r for r in records if not is_refusal(r.response)]  # a refusal is no compliance
    examples, stats = encode_records(tokenizer, compliant, max_length=config.data.max_length,
                                     system_prompt=config.data.system_prompt or None)
    return [dataclasses.replace(e, loss_mask=np.zeros_like(e.loss_mask), label=1, answer_label=1)
            for e in examples], stats, len(records) - len(compliant)


def benign_examples(config: ConfigDict, tokenizer: Any) -> tuple[list, int]:
    """The prompts of ``signal.benign`` as examples the classifier alone learns from (label 0,
    no token a training target): each rendered as generation sees it, up to the assistant
    header; and how many were dropped for exceeding ``data.max_length``."""
    try:
        records = load_mixture(config.signal.benign, config.data_dir or None)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.signal.benign={config.signal.benign!r}: {e}") from None
    system = config.data.system_prompt or None
    chats = [encode_prompt(tokenizer, r.prompt, system_prompt=system) for r in records]
    kept = [c for c in chats if len(c.ids) <= config.data.max_length]
    return [Example(c.ids, np.zeros(len(c.ids), bool), c.roles) for c in kept], len(chats) - len(kept)


def freeze_spec(config: ConfigDict, lora_config: lora.LoraConfig | None) -> FreezeSpec:
    """The typed ``config.freeze`` (``lora_config``: its adapters, from :func:`training_spec`)."""
    f = config.freeze
    mode = "all" if config.signal.head and config.signal.cls_only else f.mode  # only the signal learns
    return FreezeSpec(mode=mode, units_file=f.units.file, selection=f.units.selection, random=f.units.random,
                      layers=f.layers, groups=tuple(f.groups), lora=lora_config, seed=config.seed)


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    out = train(config, workdir, overwrite=overwrite)  # (its arrays on the devices went with it)
    if config.evaluation.tasks:
        evaluate.run(evaluation_config(config, out), str(out / "eval"))
    print(f"Report: {out / 'report.md'}" + (f" (evaluation: {out / 'eval' / 'report.md'})"
                                            if config.evaluation.tasks else ""))
    return out / "report.md"


def train(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    """The training, its export, metrics and report; returns the workdir."""
    validate(config)
    spec = training_spec(config)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, added=ADDED, sections=ADDED_SECTIONS,
                               overwrite=overwrite)
    try:
        mesh = make_mesh(dict(spec.mesh))
    except ValueError as e:
        raise runs.ConfigError(f"config.mesh={dict(spec.mesh)}: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    runs.check(config, "batch_size", lambda v: (v // config.accum_steps) % rows == 0,
               f"each micro-batch (batch_size / accum_steps) must split over the {rows} data x fsdp devices")
    runs.check(config, "eval_batch_size", lambda v: v % rows == 0, f"must split over the {rows} data x fsdp devices")
    source = model_source(config.model)
    # float32 master weights, each placed on the mesh as it is read (a 7B model fits no one device)
    model, tokenizer = load_model(source, mesh=mesh)
    d = config.data
    encode = functools.partial(encode_records, tokenizer, max_length=d.max_length,
                               system_prompt=d.system_prompt or None)
    (train_records, train_labels), (heldout_records, heldout_labels) = labelled_records(config)
    train_examples, stats = encode(train_records, labels=train_labels)
    heldout_examples, heldout_stats = encode(heldout_records, labels=heldout_labels)
    print(f"Training set ({d.dataset}): {stats}\nHeld-out set: {heldout_stats}")
    runs.check(config, "data.max_length", lambda v: bool(train_examples),
               f"every training example's prompt is longer than that ({stats})")
    augmented = None
    if config.augment.dataset:
        extra, augmented = recovery_examples(config, tokenizer)
        print(f"Deep-alignment augmentation ({config.augment.dataset}): {augmented}")
        runs.check(config, "data.max_length", lambda v: bool(extra),
                   f"every augmentation example's prompt and harmful start is longer than that ({augmented})")
        train_examples += extra
    if config.signal.compliant:
        extra, compliant, refusals = compliant_examples(config, tokenizer)
        print(f"Harmful compliances for the classifier alone ({config.signal.compliant}): {compliant}; "
              f"{refusals} refusals left out")
        runs.check(config, "data.max_length", lambda v: bool(extra),
                   f"every compliant example's prompt is longer than that ({compliant})")
        train_examples += extra
    if config.signal.head:  # as decoding and classify refuse such a prompt, so does training
        blind = sum(not signals.sees_query(e.roles) for e in train_examples + heldout_examples)
        runs.check(config, "data.dataset", lambda v: blind == 0,
                   f"{blind} examples have no query token the [CLS] signal can see (an empty prompt, or a chat "
                   "template that hides it from the encoder)")
        counts = np.bincount([e.label for e in train_examples], minlength=2)
        train_examples = balance_classes(train_examples, config.seed)
        print(f"Safety signal ({config.signal.head} head): {counts[1]} malicious / {counts[0]} benign examples, "
              f"balanced to {len(train_examples)} by drawing the smaller class again")
        if config.signal.benign:
            extra, dropped = benign_examples(config, tokenizer)
            print(f"Benign prompts for the classifier alone ({config.signal.benign}): {len(extra)} "
                  f"({dropped} longer than data.max_length dropped), after the balance")
            train_examples += extra

    with jax.set_mesh(mesh), use_rules():
        try:
            freeze = freeze_spec(config, spec.lora).build(model)
        except UnitMapMismatch:
            raise
        except ValueError as e:  # a selection the unit map cannot make
            raise runs.ConfigError(f"config.freeze.units.selection={config.freeze.units.selection!r}: {e}") from None
        extra, probed = signal_training(config, model, train_examples, heldout_examples, tokenizer.pad_token_id)
        unrolled, model_config = nnx.graphdef(model), model.config  # what the export is made of
        model = with_layout(model, spec.layout)  # (the unrolled arrays go with their last reference)
        training = spec.setup(model, mesh, freeze, **extra)
        before = training.frozen_checksum(training.state)
        buckets = bucket_lengths(d.max_length)
        dataset = batch_dataset(train_examples, batch_size=config.batch_size, pad_id=tokenizer.pad_token_id,
                                buckets=buckets, seed=config.seed, epochs=None)
        hooks = []
        if heldout_examples:
            eval_step = training.eval_step()
            heldout = batch_dataset(heldout_examples, batch_size=config.eval_batch_size,
                                    pad_id=tokenizer.pad_token_id, buckets=buckets, shuffle=False)

            def heldout_loss(step, state):
                sums, counts = jax.tree.map(lambda *xs: sum(map(float, xs)),
                                            *[eval_step(state, shard_batch(b)) for b in heldout])
                metrics = {"heldout_loss": sums["nll"] / max(counts["nll"], 1.0)}
                if config.signal.head:  # the classifier on the held-out examples: BCE and accuracy at 0.5
                    metrics.update({f"heldout_{k}": sums[k] / max(counts[k], 1.0) for k in ("cls", "cls_accuracy")})
                return metrics

            hooks.append(heldout_loss)
        data_id = {"dataset": d.dataset, "split": d.split, "examples": len(train_examples),
                   "batch_size": config.batch_size, "max_length": d.max_length, "seed": config.seed}
        frozen, total = training.frozen_elements, training.total_elements
        print(f"Freeze setting: {training.description}; {total - frozen:,} of {total:,} trained elements")
        state, summary = fit(
            training, dataset,
            LoopConfig(steps=config.steps, log_every=config.log_every,
                       eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
                       keep_checkpoints=config.keep_checkpoints),
            out, data_id=data_id, hooks=hooks)
        after = training.frozen_checksum(state)
        exported = nnx.merge(unrolled, hosts.fetch(training.final_params(state)))
        extras = hosts.fetch(training.final_extras(state))
    if hosts.is_main():  # process 0 writes the export and the report
        export = save_hf(exported, model_config.to_hf(), out / "export", tokenizer)
        if config.signal.head:
            signals.save(signals.SafetySignal(extras["signal"], config.signal.head), export)
        records = runs.read_jsonl(out / "metrics.jsonl")
        result = {
            "source": source, "description": training.description, "trained_elements": total - frozen,
            "frozen_elements": frozen, "total_elements": total, "frozen_unchanged": before == after,
            "examples": {"train": len(train_examples), "heldout": len(heldout_examples)},
            "heldout_loss": {r["step"]: r["heldout_loss"] for r in records if r["kind"] == "eval"},
            "heldout_classifier": {r["step"]: {"bce": r["heldout_cls"], "accuracy": r["heldout_cls_accuracy"]}
                                   for r in records if r["kind"] == "eval" and "heldout_cls" in r},
            "probe": probed.to_dict() if probed else None,
            "augmented_examples": augmented.examples if augmented else 0, "signal": config.signal.head or None,
            "train": summary, "export": str(export),
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        plot = plot_loss(records, out / "loss.png")
        (out / "report.md").write_text(render_report(config, result, stats, plot))
    hosts.sync("finetune written")
    return out


def evaluation_config(config: ConfigDict, out: Path) -> ConfigDict:
    """The ``ssah-jax evaluate`` config of the evaluation after training: the export (with its
    trained signal, if any) under ``config.evaluation``."""
    e = ConfigDict(config.evaluation.to_dict())
    e.model, e.data_dir = str(out / "export"), config.data_dir
    e.signal.file = str(out / "export") if config.signal.head else ""
    return e


def plan_configs(config: ConfigDict) -> list[Any]:
    """What ``ssah-jax plan`` compiles: this training, and the evaluation's decoding after it."""
    items = [PlanItem("finetune", model_source(config.model), training_spec(config))]
    if config.evaluation.tasks:
        items.append(PlanItem("evaluation", model_source(config.model), decode_spec(config.evaluation)))
    return items


def run_for_export(config: ConfigDict, directory: Path) -> None:
    """A pipeline stage's training: a run whose checkpoints are dropped once it finished (its
    export is the result)."""
    run(config, str(directory))
    if hosts.is_main():
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)


def signal_training(config: ConfigDict, model: Any, train: list, heldout: list, pad_id: int
                    ) -> tuple[dict[str, Any], signals.ProbeResult | None]:
    """``setup_training``'s objective and extra parameters for ``config.signal`` (none without a
    head), and the linear probe's result when ``signal.probe`` starts the head from one (on the
    ``train`` examples, its regularisation chosen on the ``heldout`` ones)."""
    if not config.signal.head:
        return {}, None
    if config.signal.init:  # e.g. signal pre-training's [CLS] and head (made by then: checked here, not up front)
        try:
            signal = signals.load(config.signal.init, model.config)
        except (FileNotFoundError, ValueError) as e:
            raise runs.ConfigError(f"config.signal.init={config.signal.init!r}: {e}") from None
        runs.check(config, "signal.init", lambda v: signal.head == config.signal.head,
                   f"holds a {signal.head} head, signal.head is {config.signal.head!r}")
    else:
        signal = signals.SafetySignal.init(model.config, config.signal.head, rng=jax.random.key(config.seed))
    probed = None
    if config.signal.probe:
        print(f"Linear probe of the [CLS] head on {len(train)} training and {len(heldout)} held-out prompts ...",
              flush=True)
        signal, probed = signals.fit_probe(model, signal, train, heldout, pad_id=pad_id,
                                       batch_size=config.eval_batch_size)
        print(probed, flush=True)
    sig = config.signal
    rechecks = signals.Rechecks(sig.recheck_r1, sig.recheck_r2, sig.recheck_windows) if sig.recheck_windows else None
    objective = signals.SignalLoss(sig.lam, phase=sig.phase, rechecks=rechecks, lm=not sig.cls_only)
    return ({"objective": objective, "extra": {"signal": signal.params},
             "extra_lr_scale": config.signal.lr_scale}, probed)


def plot_loss(records: list[dict], path: Path) -> Path:
    plt = runs.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in records if r["kind"] == "train"]
    heldout = [r for r in records if r["kind"] == "eval"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training batch loss", color="#1f77b4")
    if heldout:
        ax.plot([r["step"] for r in heldout], [r["heldout_loss"] for r in heldout], "o-", label="held-out loss",
                color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("response-token NLL")
    ax.legend()
    return save_figure(fig, path, dpi=120)


def render_report(config: ConfigDict, result: dict, stats: Any, plot: Path) -> str:
    t, o = result["train"], config.optimizer
    lines = [
        "# finetune", "",
        f"Model `{result['source']}`, {config.compute_dtype} compute (float32 master weights). "
        f"{config.steps} steps of {config.batch_size} `{config.data.dataset}` examples "
        f"({config.accum_steps} micro-batch(es) per step), response-only loss; {stats}. "
        f"AdamW, learning rate {o.learning_rate} ({o.schedule}, {o.warmup_steps} warmup steps), weight decay "
        f"{o.weight_decay}, clipping {o.clip_norm}.", "",
        f"Freeze setting: {result['description']}. Trained elements: {result['trained_elements']:,} of "
        f"{result['total_elements']:,}. Frozen elements bit-identical after training (checksum): "
        f"{'yes' if result['frozen_unchanged'] else '**NO**'}.", "",
    ]
    cls = result.get("heldout_classifier") or {}
    if cls:  # the signal's classifier on the same held-out examples
        lines += ["| step | held-out loss | classifier BCE | classifier accuracy |", "|---|---|---|---|"]
        lines += [f"| {step} | {loss:.4f} | {cls[step]['bce']:.4f} | {cls[step]['accuracy']:.3f} |"
                  for step, loss in sorted(result["heldout_loss"].items())]
    else:
        lines += ["| step | held-out loss |", "|---|---|"]
        lines += [f"| {step} | {loss:.4f} |" for step, loss in sorted(result["heldout_loss"].items())]
    lines += [
        "", f"Held-out set: the last {result['examples']['heldout']} usable `{config.data.dataset}` examples.", "",
        f"![loss]({plot.name})", "",
        f"This invocation ran {t['steps_run']} steps (resumed from step {t['resumed_from']}) in {t['seconds']} s.",
        "", f"Export (HF format, LoRA merged): `{result['export']}`. Metrics: `metrics.jsonl`, `tensorboard/`.", "",
    ]
    if config.signal.head:
        lines += [f"Safety signal: {config.signal.head} head on [CLS], loss L_sft + {config.signal.lam} L_cls "
                  f"(its updates scaled {config.signal.lr_scale}x), "
                  f"malicious components {', '.join(config.signal.malicious)}; `export/{signals.FILE}`."]
        if config.signal.recheck_windows:
            lines += [f"It also learned the decoding's recheck views: rule 1 (the query and the first "
                      f"{config.signal.recheck_r1} answer tokens) and {config.signal.recheck_windows} rule-2 windows "
                      f"of {config.signal.recheck_r2} answer tokens, labelled by the answer (term `recheck`)."]
        if config.signal.phase == "pretrain":
            lines += ["Phase: signal pre-training ([CLS] attends to every token; no token attends to it)."]
        if config.signal.cls_only:
            lines += ["[CLS]-only loss: the model was frozen whole and took no LM loss; only [CLS] and the head "
                      "trained."]
        if config.signal.benign:
            lines += [f"Benign prompts for the classifier alone (no LM loss, after the class balance): "
                      f"`{config.signal.benign}`."]
        if config.signal.compliant:
            lines += [f"Harmful compliant answers for the classifier alone (no LM loss): "
                      f"`{config.signal.compliant}`."]
        lines += [""]
        if result.get("probe"):
            p = result["probe"]
            lines += [f"The head started from a linear probe on the unaligned model's [CLS] states (LP-FT, Kumar "
                      f"et al. 2022): L2 {p['l2']:g} of {', '.join(p['validation_bce'])} by the held-out BCE "
                      f"({', '.join(f'{v:.3f}' for v in p['validation_bce'].values())}); BCE {p['train']['bce']:.3f}, "
                      f"accuracy {p['train']['accuracy']:.3f} on the {p['n_train']} training prompts, "
                      f"{p['validation']['bce']:.3f} / {p['validation']['accuracy']:.3f} on the "
                      f"{p['n_validation']} held-out ones.", ""]
    if result["augmented_examples"]:
        a = config.augment
        lines += [f"Deep-alignment augmentation: {result['augmented_examples']} examples from the last {a.count} of "
                  f"`{a.dataset}` (harmful starts of 1-{a.max_tokens} tokens, then the refusal).", ""]
    return "\n".join(lines)
