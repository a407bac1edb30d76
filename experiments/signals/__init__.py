"""Explicit safety signals (Li & Kim, ICML 2025) against plain and augmented alignment, in stages, into one report.

The method: arXiv 2505.17072; end to end on one model.

Three models are aligned from the same unaligned model on the same data and steps (reproduce's
full alignment, its contrast data made by this pipeline's own contrast stage): plain SFT, SFT
with the deep-alignment augmentation of Qi et al. (2024), and SFT with the ``[CLS]`` safety
signal trained alongside. Each is attacked (direct, prefilling,
the decoding sweep, harmful fine-tuning) and its costs measured (over-refusal, utility); the
signal model under each re-classification schedule, and its classifier on held-out prompts.
Each stage runs in ``<workdir>/<stage>/`` (the sub-runs are ordinary ``finetune`` and
``evaluate`` runs) and leaves ``stage.json`` (its identity and wall time) when it finishes; a
re-run skips finished stages, resumes the others, and refuses a finished stage whose identity
the config changed (the engine: :mod:`ssah_jax.pipeline`; this module defines the stages,
:class:`Signals`). See ``configs/signals.py`` for the stages and their settings.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from experiments import evaluate, finetune, generate
from experiments._mesh import check_mesh, model_on_mesh
from experiments._staged import ADDED as SUBRUN_ADDED
from experiments._staged import align_config as shared_align_config
from experiments._staged import (
    answers_config,
    answers_stage,
    attack_stage,
    check_attacks,
    evaluate_stage,
    train_config,
    train_stage,
)
from experiments._staged import attack_config as shared_attack_config
from experiments._staged import eval_config as shared_eval_config
from ssah_jax import hosts, runs, signals
from ssah_jax import pipeline as engine
from ssah_jax.data import (
    check_kit_dataset,
    load_local,
    load_mixture,
    parse_mixture,
    prompt_key,
    substitute_component,
)
from ssah_jax.evaluation import harmful_records
from ssah_jax.pipeline import Stage
from ssah_jax.train.memory import PlanItem

MODELS = ("sft", "augmented", "signal")  # the aligned models, align_<model>
STAGES = ("contrast", "compliant", "pretrain_signal", "align_sft", "align_augmented", "align_signal", "eval_sft",
          "eval_augmented", "eval_signal", "classifier", "attack", "report")
REQUIRES = {
    "pretrain_signal": ("compliant",),
    "align_sft": ("contrast",), "align_augmented": ("contrast",), "align_signal": ("contrast", "compliant",
                                                                                  "pretrain_signal"),
    "eval_sft": ("align_sft",), "eval_augmented": ("align_augmented",), "eval_signal": ("align_signal",),
    "classifier": ("align_signal",), "attack": ("align_sft", "align_augmented", "align_signal"),
    "report": tuple(s for s in STAGES if s != "report"),
}
COMPLIANT = "compliant"  # the component of signal.compliant / pretrain.dataset that is the compliant stage's answers
LIKELIHOOD_TASKS = ("mmlu", "sst2", "perplexity")  # scored once: no schedule touches them
REPORT_TASKS = ("asr", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity")


# ---------------------------------------------------------------------------------------------
# What each stage is given


def compliant_spec(spec: str, out: Path) -> str:
    """``spec`` with its ``compliant`` component read from the compliant stage's answers."""
    return substitute_component(spec, COMPLIANT, str(out / COMPLIANT / "generations.jsonl")) if spec else spec


def components(spec: str) -> list[str]:
    """The component names of a mixture ``spec`` that may name the compliant stage's answers
    (``compliant``, as itself); a spec that does not parse is a KeyError or ValueError."""
    where = compliant_spec(COMPLIANT, Path("."))
    return [COMPLIANT if n == where else n for n, _ in parse_mixture(compliant_spec(spec, Path(".")))] if spec else []


def needed(config: ConfigDict, stage: str) -> bool:
    """Whether the optional stage ``stage`` runs under ``config``: ``compliant`` where
    ``signal.compliant`` or (with signal pre-training) ``pretrain.dataset`` names its answers,
    ``pretrain_signal`` with ``pretrain.steps > 0``; every other stage always."""
    pretrain = config.pretrain.steps > 0
    if stage == COMPLIANT:
        return COMPLIANT in components(config.signal.compliant) + (components(config.pretrain.dataset) if pretrain
                                                                     else [])
    return pretrain if stage == "pretrain_signal" else True


def pretrain_config(config: ConfigDict, out: Path) -> ConfigDict:
    """The finetune config of ``pretrain_signal``: signal pre-training of the unaligned model on
    ``pretrain.dataset`` ([CLS] reads every token, the [CLS]-only loss, the model frozen whole)."""
    a, p = config.align, config.pretrain
    c = train_config(config, model=config.model, dataset=compliant_spec(p.dataset, out), split="",
                     max_length=a.max_length, steps=p.steps, batch_size=a.batch_size, heldout=0,
                     learning_rate=a.learning_rate, warmup_steps=a.warmup_steps, freeze={})
    malicious = tuple(compliant_spec(m, out) for m in p.malicious)
    runs.set_values(c, {"signal.head": config.signal.head, "signal.lam": p.lam, "signal.malicious": malicious,
                        "signal.lr_scale": p.lr_scale, "signal.probe": False, "signal.phase": "pretrain",
                        "signal.cls_only": True, "augment.dataset": "", "evaluation.tasks": ()})
    return c


def align_config(config: ConfigDict, model: str, out: Path) -> ConfigDict:
    """The finetune config of ``align_<model>``: reproduce's full alignment, plus the
    augmentation (``augmented``) or the signal (``signal``: started from signal pre-training's
    export when that stage runs)."""
    c = shared_align_config(config, out, steps=config.align.steps, freeze={})
    values: dict[str, Any] = {"signal.head": "", "augment.dataset": ""}
    if model == "augmented":
        values.update({f"augment.{k}": v for k, v in config.augment.items()})
    if model == "signal":  # the rechecks are trained on the views the decoding gives them
        values.update({f"signal.{k}": v for k, v in config.signal.items()})
        values.update({"signal.recheck_r1": config.decoding.r1, "signal.recheck_r2": config.decoding.r2,
                       "signal.compliant": compliant_spec(config.signal.compliant, out),
                       "signal.init": str(out / "pretrain_signal" / "export") if needed(config, "pretrain_signal")
                       else ""})
    runs.set_values(c, values)
    return c


def signal_settings(config: ConfigDict, out: Path, schedule: str) -> ConfigDict:
    d = config.decoding
    return ConfigDict(dict(file=str(out / "align_signal" / "export"), threshold=d.threshold, schedule=schedule,
                           period=d.period, r1=d.r1, r2=d.r2, r3=d.r3, tau=d.tau))


def eval_config(config: ConfigDict, section: ConfigDict, model: str, signal: ConfigDict | None) -> ConfigDict:
    """An evaluate config: ``section`` for ``model`` (with ``signal``'s strategic decoding, if any)."""
    c = shared_eval_config(config, section, model)
    with c.unlocked():
        c.signal = signal if signal is not None else ConfigDict(dict(
            file="", threshold=0.5, schedule="each", period=10, r1=10, r2=10, r3=10, tau=3))
    return c


def schedule_eval_config(config: ConfigDict, out: Path, schedule: str) -> ConfigDict:
    """``eval_signal/<schedule>``: the evaluation under that schedule; the log-likelihood tasks
    only under the first schedule."""
    c = eval_config(config, config.evaluation, str(out / "align_signal" / "export"),
                    signal_settings(config, out, schedule))
    if schedule != config.decoding.schedules[0]:
        c.tasks = tuple(t for t in c.tasks if t not in LIKELIHOOD_TASKS)
    return c


def attack_dir(model: str, attack: str, seed: int) -> str:
    """An attack run's directory, relative to the workdir."""
    return f"attack/{model}/{attack}/seed{seed}"


def attack_config(config: ConfigDict, out: Path, model: str, attack: str, seed: int) -> ConfigDict:
    """``attack/<model>/<attack>/seed<k>``: fine-tuning ``align_<model>``'s export on one of
    reproduce's attacks (the plain SFT loss on the weights: the attacker has no signal) and the
    evaluation of the attacked model (the signal model deployed with its trained signal)."""
    a, spec = config.attack, config.attack.datasets[attack]
    train = train_config(config, model=str(out / f"align_{model}"), dataset=spec.dataset, split=spec.split,
                         heldout=0, steps=spec.steps, batch_size=a.batch_size, max_length=spec.max_length,
                         learning_rate=a.learning_rate, warmup_steps=a.warmup_steps, freeze={}, seed=seed)
    signal = signal_settings(config, out, config.decoding.schedules[0]) if model == "signal" else None
    return shared_attack_config(train, eval_config(
        config, config.attack.evaluation, str(out / attack_dir(model, attack, seed) / "export"), signal))


def classifier_config(config: ConfigDict, out: Path) -> ConfigDict:
    h = config.evaluation.harmful
    return ConfigDict(dict(
        model=str(out / "align_signal" / "export"), dtype=config.dtype, data_dir=config.data_dir,
        mesh=copy.deepcopy(config.mesh), threshold=config.decoding.threshold,
        harmful=ConfigDict(dict(dataset=h.dataset, exclude=h.exclude)),
        **config.classifier.to_dict()))


# Keys added to the config after results were recorded (its sub-runs'), and its sections added
ADDED = SUBRUN_ADDED
ADDED_SECTIONS = ("reuse", "mesh")


class Signals:
    """The signals pipeline of ``config`` in the workdir ``out`` (a :class:`ssah_jax.pipeline.Pipeline`)."""

    added, sections = ADDED, ADDED_SECTIONS

    def __init__(self, config: ConfigDict, out: Path):
        self.config, self.out, self.order = config, out, STAGES
        # an optional stage that does not run is nobody's prerequisite
        self.requires = {stage: tuple(r for r in before if needed(config, r)) for stage, before in REQUIRES.items()}

    def runs(self, stage: str) -> list[str]:
        """A stage's directory (none for an optional stage that does not run); eval_signal: one
        per schedule; attack: one per attack run."""
        if not needed(self.config, stage):
            return []
        if stage == "eval_signal":
            return [f"eval_signal/{s}" for s in self.config.decoding.schedules]
        if stage == "attack":  # seed by seed
            a = self.config.attack
            return [attack_dir(m, d, s) for s in a.seeds for m in MODELS for d in a.datasets]
        return [stage]

    def stage(self, recorded: str) -> Stage:
        config, out = self.config, self.out
        kind, _, name = recorded.partition("/")
        reads = self.requires.get(kind, ())  # (an optional stage that does not run is read by none)
        if kind in ("contrast", COMPLIANT):
            return answers_stage(config, out, kind)
        if kind == "pretrain_signal":
            return train_stage(pretrain_config(config, out), reads)
        if kind.startswith("align_"):
            return train_stage(align_config(config, kind.removeprefix("align_"), out), reads)
        if kind in ("eval_sft", "eval_augmented"):
            model = str(out / kind.replace("eval_", "align_") / "export")
            return evaluate_stage(eval_config(config, config.evaluation, model, None), reads)
        if kind == "eval_signal":
            return evaluate_stage(schedule_eval_config(config, out, name), reads)
        if kind == "classifier":
            # forwards only: the batch size groups them, the mesh places them
            return Stage(classifier_config(config, out), classifier_quality, ("batch_size", "mesh"), reads)
        if kind == "attack":
            model, attack, seed = name.split("/")
            return attack_stage(attack_config(config, out, model, attack, int(seed.removeprefix("seed"))),
                                (f"align_{model}",))
        raise KeyError(recorded)

    def check(self) -> None:
        config = self.config
        check = lambda key, ok, why: runs.check(config, key, ok, why)  # noqa: E731
        check_attacks(config)
        check_mesh(config, config.model)
        for key in ("align.steps", "align.batch_size", "attack.batch_size", "decoding.period",
                    "decoding.tau", "classifier.batch_size", "classifier.benign_limit"):
            check(key, lambda v: v >= 1, "must be >= 1")
        for key in ("decoding.r1", "decoding.r2", "decoding.r3", "classifier.harmful_limit"):
            check(key, lambda v: v >= 0, "must be >= 0")
        check("decoding.schedules",
              lambda v: len(v) > 0 and set(v) <= set(signals.SCHEDULES) and len(set(v)) == len(v),
              f"must be distinct schedules of {signals.SCHEDULES}")
        check("decoding.threshold", lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
        runs.check_parses(config, "classifier.benign", check_kit_dataset)
        for section in ("evaluation.", "attack.evaluation."):
            evaluate.validate(config, section)
        check("evaluation.tasks", lambda v: set(v) == set(REPORT_TASKS),
              f"must be all of {REPORT_TASKS} (the report's)")
        check("evaluation.harmful.settings", lambda v: "no_system" in v, "must include no_system (the report's)")
        check("attack.evaluation.tasks", lambda v: "asr" in v, "must include asr (the report's)")
        check("attack.evaluation.harmful.settings", lambda v: "no_system" in v,
              "must include no_system (the report's)")
        check("pretrain.steps", lambda v: v >= 0, "must be >= 0 (0: no signal pre-training)")
        for key in ("pretrain.dataset", "signal.compliant"):
            runs.check_parses(config, key, components, optional=True)
        runs.check_parses(config, "compliant.prompts", parse_mixture)
        if needed(config, "pretrain_signal"):
            names = components(config.pretrain.dataset)
            check("pretrain.malicious", lambda v: set(v) <= set(names) and set(v) and set(names) - set(v),
                  f"must name some but not all of pretrain.dataset's components {names} (the rest are safe)")
            finetune.validate(pretrain_config(config, Path(".")))
        if needed(config, COMPLIANT):
            generate.validate(answers_config(config, Path("."), COMPLIANT))
        for model in MODELS:  # the sub-runs' own checks, before hours of work rather than after
            finetune.validate(align_config(config, model, Path(".")))
        for attack in config.attack.datasets:
            finetune.validate(attack_config(config, Path("."), "sft", attack, config.attack.seeds[0]).train)

    def plan(self) -> list[PlanItem]:
        """The signal's alignment, its fine-tuning attack and the evaluation's decoding (every
        model has ``config.model``'s architecture)."""
        config, out = self.config, self.out
        first = (next(iter(config.attack.datasets)), config.attack.seeds[0])
        attacked = attack_config(config, out, "signal", *first).train
        source = finetune.model_source(config.model)  # as the finetune runs resolve it
        return [PlanItem("align_signal", source, finetune.training_spec(align_config(config, "signal", out)),
                         "finetune."),
                PlanItem(attack_dir("signal", *first), source, finetune.training_spec(attacked), "finetune."),
                PlanItem("eval_signal", config.model,
                         finetune.decode_spec(eval_config(config, config.evaluation, config.model, None)))]

    def report(self, out: Path, report_dir: Path, invocations: list[dict[str, Any]]) -> Path:
        from experiments.signals import report

        return report.write(self.config, out, report_dir, invocations)


# ---------------------------------------------------------------------------------------------
# Stage bodies


def classifier_quality(config: ConfigDict, directory: Path) -> None:
    """p(malicious) of each held-out prompt set (``classifier.json``; the probabilities in
    ``scores.jsonl``): AUROC and accuracy at the threshold of harmful vs benign and of XSTest's
    unsafe vs safe prompts. ``config``: a classifier_config."""
    with model_on_mesh(config) as (model, tokenizer):
        _classifier_quality(config, directory, model, tokenizer)


def _classifier_quality(config: ConfigDict, directory: Path, model: Any, tokenizer: Any) -> None:
    signal = signals.load(config.model, model.config)
    harmful = [r.prompt for r in harmful_records(config.harmful.dataset, config.harmful.exclude,
                                                 config.data_dir or None)]
    harmful = harmful[: config.harmful_limit] if config.harmful_limit else harmful
    benign = [r.prompt for r in load_local(config.benign, None, config.data_dir or None)[0][-config.benign_limit:]]
    sets = {"harmful_vs_benign": (harmful, benign)}
    sources = [name for name, _ in parse_mixture(config.harmful.dataset)]
    if len(sources) > 1:  # each source of the harmful prompts alone (AdvBench, HarmBench, ...)
        for name in sources:
            own = {prompt_key(r.prompt) for r in load_mixture(name, config.data_dir or None)[0]}
            found = [p for p in harmful if prompt_key(p) in own]
            if found:
                sets[f"{name}_vs_benign"] = (found, benign)
    if config.xstest:
        xstest = load_local("xstest", None, config.data_dir or None)[0]
        sets["xstest_unsafe_vs_safe"] = ([r.prompt for r in xstest if r.label == "unsafe"],
                                         [r.prompt for r in xstest if r.label == "safe"])
    result: dict[str, Any] = {"threshold": config.threshold, "sets": {}}
    rows = []
    for name, (pos, neg) in sets.items():
        p_pos, p_neg = (signals.classify(model, signal, tokenizer, prompts, batch_size=config.batch_size)
                        for prompts in (pos, neg))
        for label, prompts, ps in ((1, pos, p_pos), (0, neg, p_neg)):
            rows += [{"set": name, "label": label, "prompt": prompt, "p": float(p)} for prompt, p in zip(prompts, ps)]
        r = result["sets"][name] = signals.separation(p_pos, p_neg, config.threshold)
        print(f"{name}: AUROC {r['auroc']:.3f}, accuracy {r['accuracy']:.3f} at {config.threshold}", flush=True)
    if hosts.is_main():
        (directory / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (directory / "classifier.json").write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The pipeline


# What the commands call (``ssah-jax signals`` / ``plan``): the engine's, for this pipeline
validate = functools.partial(engine.validate, Signals)
plan_configs = functools.partial(engine.plan, Signals)
run = functools.partial(engine.run, Signals)
