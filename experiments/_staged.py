"""What the staged pipelines (``reproduce``, ``signals``) share: the configs of the sub-runs their
stages are given (``finetune``, ``evaluate``, ``generate`` runs built from the pipeline's
config) and the stage bodies that run them. Each pipeline adds its own stages beside these
(see :mod:`ssah_jax.pipeline` for the engine that runs them)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from experiments import evaluate, finetune, generate
from ssah_jax import hosts, runs
from ssah_jax.data import load_mixture, substitute_component
from ssah_jax.pipeline import Stage

CONTRAST = "contrast"  # the component of align.dataset that is the contrast stage's answers

# An attack run's keys that only affect speed or logging are those of its finetune and evaluate
# runs; whether its export is kept is disk space, not a result.
ATTACK_EXCLUDED = (tuple(f"train.{k}" for k in finetune.EXCLUDED)
                   + tuple(f"evaluation.{k}" for k in evaluate.EXCLUDED) + ("keep_export",))
# The keys added later to any sub-run a pipeline stage is given (matched on their tails)
ADDED = {**finetune.ADDED, **evaluate.ADDED, **generate.ADDED}


def train_config(config: ConfigDict, *, model: str, dataset: str, split: str, steps: int, batch_size: int,
                 max_length: int, heldout: int, learning_rate: float, warmup_steps: int,
                 freeze: dict[str, Any], seed: int | None = None) -> ConfigDict:
    """A ``finetune`` config: ``config.finetune`` with this run's model, data, length, freeze
    and seed (``config.seed`` unless given)."""
    values = {
        "model": model, "data_dir": config.data_dir, "seed": config.seed if seed is None else seed,
        "data.dataset": dataset,
        "data.split": split, "data.limit": 0, "data.heldout": heldout, "data.max_length": max_length,
        "data.system_prompt": "", "steps": steps, "batch_size": batch_size,
        "optimizer.learning_rate": learning_rate, "optimizer.warmup_steps": warmup_steps,
        "freeze.mode": "none", "freeze.units.file": "", "freeze.units.selection": "", "freeze.units.random": False,
        "freeze.layers": "", "freeze.groups": (),
    }
    values.update({f"freeze.{k}": v for k, v in freeze.items()})
    c = copy.deepcopy(config.finetune)
    runs.set_values(c, values)
    return c


def eval_config(config: ConfigDict, section: ConfigDict, model: str) -> ConfigDict:
    """An ``evaluate`` config: ``section`` (an evaluation section of the pipeline's config) for
    ``model``, in the pipeline's dtype, data kit and mesh."""
    c = copy.deepcopy(section)
    with c.unlocked():
        c.model, c.dtype, c.data_dir, c.mesh = model, config.dtype, config.data_dir, copy.deepcopy(config.mesh)
    return c


def align_config(config: ConfigDict, out: Path, *, steps: int, freeze: dict[str, Any]) -> ConfigDict:
    """The alignment's ``finetune`` config: ``config.align``'s recipe on its data (the
    ``contrast`` component read from the contrast stage's answers) for ``steps``, with ``freeze``."""
    a = config.align
    return train_config(config, model=config.model, dataset=align_dataset(config, out), split="",
                        max_length=a.max_length, steps=steps, batch_size=a.batch_size, heldout=a.heldout,
                        learning_rate=a.learning_rate, warmup_steps=a.warmup_steps, freeze=freeze)


def contrast_file(out: Path) -> Path:
    """The contrast stage's answers (an ``ssah-jax generate`` run's ``generations.jsonl``)."""
    return out / "contrast" / "generations.jsonl"


def align_dataset(config: ConfigDict, out: Path) -> str:
    """``align.dataset`` with its ``contrast`` component read from the contrast stage's answers."""
    return substitute_component(config.align.dataset, CONTRAST, str(contrast_file(out)))


def answers_config(config: ConfigDict, out: Path, name: str = CONTRAST) -> ConfigDict:
    """What :func:`make_answers` is given for the stage ``name`` (``contrast``; the signals
    pipeline's ``compliant``): an ``ssah-jax generate`` config (``config.<name>.generate``) of the
    unaligned model on ``<stage>/prompts.jsonl``, and ``source``: the prompts
    (``config.<name>.prompts``) it writes there."""
    c = copy.deepcopy(config[name].generate)
    with c.unlocked():
        c.model, c.dtype, c.prompts, c.prompts_dataset = config.model, config.dtype, (), ""
        c.mesh = copy.deepcopy(config.mesh)
        c.prompts_file = str(out / name / "prompts.jsonl")
        c.source = ConfigDict(dict(prompts=config[name].prompts, data_dir=config.data_dir))
    return c


def make_answers(config: ConfigDict, directory: Path) -> None:
    """An answers stage (``config``: an answers_config; the stage is named by its directory):
    writes the prompts of ``source.prompts`` to ``prompts.jsonl`` and answers them with the
    unaligned model (an ``ssah-jax generate`` run in the stage directory: ``generations.jsonl``)."""
    try:
        records = load_mixture(config.source.prompts, config.source.data_dir or None)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.{directory.name}.prompts={config.source.prompts!r}: {e}") from None
    if hosts.is_main():
        with open(config.prompts_file, "w") as f:
            f.writelines(json.dumps({"prompt": r.prompt}) + "\n" for r in records)
    hosts.sync(f"{directory.name} prompts written")
    answers = copy.deepcopy(config)
    with answers.unlocked():
        del answers.source
    generate.run(answers, str(directory))


def answers_stage(config: ConfigDict, out: Path, name: str = CONTRAST) -> Stage:
    """The stage ``name`` that answers ``config.<name>.prompts`` with the unaligned model."""
    return Stage(answers_config(config, out, name), make_answers, generate.EXCLUDED, added=generate.ADDED)


def run_evaluate(config: ConfigDict, directory: Path) -> None:
    evaluate.run(config, str(directory))


def evaluate_stage(given: ConfigDict, reads: tuple[str, ...] = ()) -> Stage:
    """A stage that is an ``ssah-jax evaluate`` run of ``given``."""
    return Stage(given, run_evaluate, evaluate.EXCLUDED, reads, evaluate.ADDED)


def train_stage(given: ConfigDict, reads: tuple[str, ...] = ()) -> Stage:
    """A stage that is a ``finetune`` run of ``given`` whose export is its result."""
    return Stage(given, finetune.run_for_export, finetune.EXCLUDED, reads, finetune.ADDED)


def attack_config(train: ConfigDict, evaluation: ConfigDict, **extra: Any) -> ConfigDict:
    """An attack run (see :func:`run_attack`): its ``finetune`` config and the ``evaluate``
    config of the attacked model, with ``keep_export`` (False unless given) and ``extra``."""
    return ConfigDict(dict(train=train, evaluation=evaluation, **{"keep_export": False, **extra}))


def run_attack(config: ConfigDict, directory: Path) -> None:
    """One fine-tuning attack run (an :func:`attack_config`): fine-tune, evaluate the attacked
    model in ``eval/``, and drop the export unless ``keep_export``. A ``layers`` freeze takes the
    block that the ``layers_file`` (a reproduce layers stage's ``layers.json``) chose."""
    train = config.train
    if train.freeze.mode == "layers":
        train = copy.deepcopy(train)
        train.freeze.layers = json.loads(Path(config.layers_file).read_text())["chosen"]
    finetune.run_for_export(train, directory)
    evaluate.run(config.evaluation, str(directory / "eval"))
    if not config.keep_export and hosts.is_main():
        shutil.rmtree(directory / "export")  # 0.5 GB each


def attack_stage(given: ConfigDict, reads: tuple[str, ...]) -> Stage:
    return Stage(given, run_attack, ATTACK_EXCLUDED, reads, ADDED)


def check_attacks(config: ConfigDict) -> None:
    """The checks of a pipeline's ``attack`` section that every pipeline has: its attacks, their
    steps and its seeds."""
    runs.check(config, "attack.datasets", lambda v: len(v) > 0, "needs at least one attack")
    runs.check(config, "attack.seeds", lambda v: len(v) > 0 and len(set(v)) == len(v),
               "needs at least one seed, none twice")
    for name in config.attack.datasets:
        runs.check(config, f"attack.datasets.{name}.steps", lambda v: v >= 1, "must be >= 1")
