"""Explicit safety signals (Li & Kim, ICML 2025) against plain and augmented safety alignment,
end to end on one model, in stages, into one report (DESIGN.md section 2.4).

Three models are aligned from the same unaligned model on the same data and steps (reproduce's
full alignment, its contrast data made by this pipeline's own contrast stage): plain SFT, SFT
with the deep-alignment augmentation of Qi et al. (2024), and SFT with the ``[CLS]`` safety
signal trained alongside. Each is attacked (direct, prefilling,
the decoding sweep, harmful fine-tuning) and its costs measured (over-refusal, utility); the
signal model under each re-classification schedule, and its classifier on held-out prompts.
Each stage runs in ``<workdir>/<stage>/`` (the sub-runs are ordinary ``finetune`` and
``evaluate`` runs) and leaves ``stage.json`` (its identity and wall time) when it finishes; a
re-run skips finished stages, resumes the others, and refuses a finished stage whose identity
the config changed. See ``configs/signals.py`` for the stages and their settings.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from scipy.stats import mannwhitneyu

from experiments import evaluate, finetune
from experiments.reproduce import make_contrast
from experiments.reproduce.subruns import align_dataset, contrast_config, train_config
from ssah_jax import hosts, runs, signals
from ssah_jax import stages as stages_lib
from ssah_jax.checkpoints import load_model
from ssah_jax.data import check_kit_dataset, load_local
from ssah_jax.evaluation import harmful_records

MODELS = ("sft", "augmented", "signal")  # the aligned models, align_<model>
STAGES = ("contrast", "align_sft", "align_augmented", "align_signal", "eval_sft", "eval_augmented", "eval_signal",
          "classifier", "attack", "report")
REQUIRES = {
    "align_sft": ("contrast",), "align_augmented": ("contrast",), "align_signal": ("contrast",),
    "eval_sft": ("align_sft",), "eval_augmented": ("align_augmented",), "eval_signal": ("align_signal",),
    "classifier": ("align_signal",), "attack": ("align_sft", "align_augmented", "align_signal"),
    "report": tuple(s for s in STAGES if s != "report"),
}
LIKELIHOOD_TASKS = ("mmlu", "sst2", "perplexity")  # scored once: no schedule touches them
REPORT_TASKS = ("asr", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity")
ATTACK_EXCLUDED = (tuple(f"train.{k}" for k in finetune.EXCLUDED)
                   + tuple(f"evaluation.{k}" for k in evaluate.EXCLUDED))


# ---------------------------------------------------------------------------------------------
# What each stage is given


def align_config(config: ConfigDict, model: str, out: Path) -> ConfigDict:
    """The finetune config of ``align_<model>``: reproduce's full alignment, plus the
    augmentation (``augmented``) or the signal (``signal``)."""
    a = config.align
    c = train_config(config, model=config.model, dataset=align_dataset(config, out), split="", steps=a.steps,
                     batch_size=a.batch_size, max_length=a.max_length, heldout=a.heldout,
                     learning_rate=a.learning_rate, warmup_steps=a.warmup_steps, freeze={})
    values: dict[str, Any] = {"signal.head": "", "augment.dataset": ""}
    if model == "augmented":
        values.update({f"augment.{k}": v for k, v in config.augment.items()})
    if model == "signal":
        values.update({f"signal.{k}": v for k, v in config.signal.items()})
    runs.set_values(c, values)
    return c


def signal_settings(config: ConfigDict, out: Path, schedule: str) -> ConfigDict:
    d = config.decoding
    return ConfigDict(dict(file=str(out / "align_signal" / "export"), threshold=d.threshold, schedule=schedule,
                           period=d.period, r1=d.r1, r2=d.r2, r3=d.r3, tau=d.tau))


def eval_config(config: ConfigDict, section: ConfigDict, model: str, signal: ConfigDict | None) -> ConfigDict:
    """An evaluate config: ``section`` for ``model`` (with ``signal``'s strategic decoding, if any)."""
    c = copy.deepcopy(section)
    with c.unlocked():
        c.model, c.dtype, c.data_dir = model, config.dtype, config.data_dir
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
    return ConfigDict(dict(train=train, evaluation=eval_config(
        config, config.attack.evaluation, str(out / attack_dir(model, attack, seed) / "export"), signal)))


def attack_runs(config: ConfigDict) -> list[tuple[str, str, int]]:
    """``(model, attack, seed)`` of every attack run, seed by seed."""
    return [(m, a, s) for s in config.attack.seeds for m in MODELS for a in config.attack.datasets]


def classifier_config(config: ConfigDict, out: Path) -> ConfigDict:
    h = config.evaluation.harmful
    return ConfigDict(dict(
        model=str(out / "align_signal" / "export"), dtype=config.dtype, data_dir=config.data_dir,
        threshold=config.decoding.threshold, harmful=ConfigDict(dict(dataset=h.dataset, exclude=h.exclude)),
        **config.classifier.to_dict()))


def recorded_stages(config: ConfigDict) -> list[str]:
    """Every directory that records a stage identity: eval_signal and attack record one per run."""
    expand = {"eval_signal": [f"eval_signal/{s}" for s in config.decoding.schedules],
              "attack": [attack_dir(*r) for r in attack_runs(config)]}
    return [r for s in STAGES if s != "report" for r in expand.get(s, [s])]


def stage_plan(config: ConfigDict, out: Path, stage: str
               ) -> tuple[ConfigDict, Callable[[ConfigDict, Path], Any], tuple[str, ...]]:
    """``(given, body, excluded)``: ``body(given, directory)`` runs the stage and sees nothing of
    ``config`` but ``given``; ``excluded``: the keys of ``given`` that only affect speed or logging."""
    kind, _, name = stage.partition("/")
    if kind == "contrast":
        return contrast_config(config, out), make_contrast, ()
    if kind.startswith("align_"):
        return align_config(config, kind.removeprefix("align_"), out), finetune.run_for_export, finetune.EXCLUDED
    if kind in ("eval_sft", "eval_augmented"):
        model = str(out / kind.replace("eval_", "align_") / "export")
        return eval_config(config, config.evaluation, model, None), run_evaluate, evaluate.EXCLUDED
    if kind == "eval_signal":
        return schedule_eval_config(config, out, name), run_evaluate, evaluate.EXCLUDED
    if kind == "classifier":
        return classifier_config(config, out), classifier_quality, ("batch_size",)  # forward passes only
    if kind == "attack":
        model, attack, seed = name.split("/")
        return attack_config(config, out, model, attack, int(seed.removeprefix("seed"))), run_attack, ATTACK_EXCLUDED
    raise KeyError(stage)


def _inputs(stage: str) -> tuple[str, ...]:
    kind, _, name = stage.partition("/")
    if kind == "attack":
        return (f"align_{name.split('/')[0]}",)
    return REQUIRES.get(kind, ())


def stage_identities(config: ConfigDict, out: Path) -> dict[str, dict[str, Any]]:
    """Per recorded stage, in pipeline order: its identity (see :func:`ssah_jax.stages.identities`)."""
    def plan(stage: str) -> tuple[ConfigDict, tuple[str, ...]]:
        given, _, excluded = stage_plan(config, out, stage)
        return given, excluded

    return stages_lib.identities(recorded_stages(config), plan, _inputs, out)


def stages(config: ConfigDict) -> list[str]:
    """``config.stages`` in pipeline order (see :func:`ssah_jax.stages.selected`)."""
    return stages_lib.selected(config, STAGES)


def validate(config: ConfigDict) -> None:
    check = lambda key, ok, why: runs.check(config, key, ok, why)  # noqa: E731
    runs.dtype(config)
    stages(config)
    check("attack.datasets", lambda v: len(v) > 0, "needs at least one attack")
    check("attack.seeds", lambda v: len(v) > 0 and len(set(v)) == len(v), "needs at least one seed, none twice")
    for name in config.attack.datasets:
        check(f"attack.datasets.{name}.steps", lambda v: v >= 1, "must be >= 1")
    for key in ("align.steps", "align.batch_size", "attack.batch_size", "decoding.period",
                "decoding.tau", "classifier.batch_size", "classifier.benign_limit"):
        check(key, lambda v: v >= 1, "must be >= 1")
    for key in ("decoding.r1", "decoding.r2", "decoding.r3", "classifier.harmful_limit"):
        check(key, lambda v: v >= 0, "must be >= 0")
    check("decoding.schedules", lambda v: len(v) > 0 and set(v) <= set(signals.SCHEDULES) and len(set(v)) == len(v),
          f"must be distinct schedules of {signals.SCHEDULES}")
    check("decoding.threshold", lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
    runs.check_parses(config, "classifier.benign", check_kit_dataset)
    for section in ("evaluation.", "attack.evaluation."):
        evaluate.validate(config, section)
    check("evaluation.tasks", lambda v: set(v) == set(REPORT_TASKS), f"must be all of {REPORT_TASKS} (the report's)")
    check("evaluation.harmful.settings", lambda v: "no_system" in v, "must include no_system (the report's)")
    check("attack.evaluation.tasks", lambda v: "asr" in v, "must include asr (the report's)")
    check("attack.evaluation.harmful.settings", lambda v: "no_system" in v, "must include no_system (the report's)")
    for model in MODELS:  # the sub-runs' own checks, before hours of work rather than after
        finetune.validate(align_config(config, model, Path(".")))
    for attack in config.attack.datasets:
        finetune.validate(attack_config(config, Path("."), "sft", attack, config.attack.seeds[0]).train)


# ---------------------------------------------------------------------------------------------
# Stage bodies


def run_evaluate(config: ConfigDict, directory: Path) -> None:
    evaluate.run(config, str(directory))


def run_attack(config: ConfigDict, directory: Path) -> None:
    """Fine-tune (the attack), evaluate, drop the export."""
    finetune.run_for_export(config.train, directory)
    evaluate.run(config.evaluation, str(directory / "eval"))
    if hosts.is_main():
        shutil.rmtree(directory / "export")


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The area under the ROC curve of scores ``positive`` (label 1) against ``negative``: the
    Mann-Whitney U statistic over ``len(positive) * len(negative)`` (ties count half)."""
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def classifier_quality(config: ConfigDict, directory: Path) -> None:
    """p(malicious) of each held-out prompt set (``classifier.json``; the probabilities in
    ``scores.jsonl``): AUROC and accuracy at the threshold of harmful vs benign and of XSTest's
    unsafe vs safe prompts. ``config``: a classifier_config."""
    model, tokenizer = load_model(config.model, runs.dtype(config))
    signal = signals.load(config.model, model.config)
    harmful = [r.prompt for r in harmful_records(config, config.data_dir or None)]
    harmful = harmful[: config.harmful_limit] if config.harmful_limit else harmful
    benign = [r.prompt for r in load_local(config.benign, None, config.data_dir or None)[0][-config.benign_limit:]]
    sets = {"harmful_vs_benign": (harmful, benign)}
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
        correct = np.concatenate([p_pos > config.threshold, p_neg <= config.threshold])
        result["sets"][name] = {
            "auroc": auroc(p_pos, p_neg), "accuracy": float(correct.mean()), "n_positive": len(pos),
            "n_negative": len(neg), "true_positive_rate": float(np.mean(p_pos > config.threshold)),
            "false_positive_rate": float(np.mean(p_neg > config.threshold))}
        r = result["sets"][name]
        print(f"{name}: AUROC {r['auroc']:.3f}, accuracy {r['accuracy']:.3f} at {config.threshold}", flush=True)
    if hosts.is_main():
        (directory / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (directory / "classifier.json").write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The pipeline


def finished(config: ConfigDict, out: Path, stage: str) -> bool:
    """A stage with runs (eval_signal, attack) is finished when each of its runs is."""
    done = [r for r in recorded_stages(config) if r == stage or r.startswith(stage + "/")]
    return bool(done) and all(stages_lib.finished(out / r) is not None for r in done)


def plan_configs(config: ConfigDict) -> list[Any]:
    """What ``ssah-jax plan`` compiles: the signal's alignment, its fine-tuning attack and the
    evaluation's decoding (every model has ``config.model``'s architecture)."""
    from ssah_jax.planning import Item

    first = (next(iter(config.attack.datasets)), config.attack.seeds[0])

    return [Item("align_signal", "train", config.model, align_config(config, "signal", Path("<workdir>")),
                 "finetune."),
            Item(attack_dir("signal", *first), "train", config.model,
                 attack_config(config, Path("<workdir>"), "signal", *first).train, "finetune."),
            Item("eval_signal", "generate", config.model, eval_config(config, config.evaluation, config.model, None))]


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    validate(config)
    out = Path(workdir)
    todo = stages(config)
    identities = stage_identities(config, out)
    if not overwrite:
        stages_lib.check_finished(config, out, identities, lambda c: stage_identities(c, out))
    out = stages_lib.open_pipeline(config, workdir, todo, REQUIRES, lambda r: finished(config, Path(workdir), r),
                                   overwrite=overwrite)
    elsewhere = None
    if config.reuse:
        elsewhere = stages_lib.finished_elsewhere(config.reuse)
        if not Path(config.reuse).is_dir():
            print(f"config.reuse: {config.reuse} does not exist (relative to {Path.cwd()}): nothing to copy")
        else:
            todo_here = [r for r in identities if stages_lib.finished(out / r) is None]
            print(f"config.reuse: of the stages still to run, "
                  f"{sum(identities[r]['identity'] in elsewhere for r in todo_here)} are finished in {config.reuse} "
                  f"with the same identity and will be copied")
    for stage in todo:
        if stage == "report":
            continue
        for recorded in (r for r in recorded_stages(config) if r == stage or r.startswith(stage + "/")):
            given, body, _ = stage_plan(config, out, recorded)
            stages_lib.run_stage(out / recorded, lambda d, body=body, given=given: body(given, d),
                                 {**identities[recorded], "config": runs.determining(config)}, elsewhere)
    if "report" not in todo:
        print(f"Stages done: {todo} in {out}; add 'report' to config.stages for the report")
        return out
    from experiments.signals import report as report_module

    report = Path(config.report_dir) if config.report_dir else out / "report"
    if hosts.is_main():  # the report only reads the stages' files
        report = report_module.write(config, out, report)
    else:
        report = report / "REPORT.md"
    print(f"Report: {report}")
    return report
