"""The sub-runs of ``reproduce``: the ``finetune``, ``prune`` and ``evaluate`` configs (and the
configs of its own stage bodies) that each stage is given, built from the reproduce config
(the builders it shares with ``signals`` are in :mod:`experiments._staged`)."""

from __future__ import annotations

import copy
from pathlib import Path

from ml_collections import ConfigDict

from experiments import prune
from experiments._staged import align_config as shared_align_config
from experiments._staged import attack_config as shared_attack_config
from experiments._staged import eval_config, train_config
from ssah_jax.masking import GROUPS

VARIANTS = ("none", "scu_cu6", "scu_cu", "random", "layers", "lora")  # the freeze settings of an attack
FROZEN = ("scu_cu6", "scu_cu", "random", "layers")  # trained attack.frozen_epochs times the steps


def aligned_model(config: ConfigDict, out: Path, *, run: bool = False) -> str:
    """The aligned model the studies read: ``config.model`` itself when its makers aligned it
    (``maker_aligned``), else the full alignment's export (``run``: its finetune workdir, which
    a finetune run continues from)."""
    if config.maker_aligned:
        return config.model
    return str(out / "align_full" if run else out / "align_full" / "export")


def prune_config(config: ConfigDict, model: str, *, ru: float | None = None, table: bool = False) -> ConfigDict:
    c = ConfigDict(dict(
        model=model, dtype=config.dtype, data_dir=config.data_dir, seed=config.seed, mesh=copy.deepcopy(config.mesh),
        attribution=copy.deepcopy(config.attribution), kinds=copy.deepcopy(config.kinds),
        variants=prune.VARIANTS if table else (), evaluation=copy.deepcopy(config.table),
    ))
    if ru is not None:
        c.kinds.ru = ru
    return c


def align_config(config: ConfigDict, ru_units: Path | None, out: Path) -> ConfigDict:
    """The alignment's ``finetune`` config: full SFT, or (``ru_units``) only the RU trained."""
    a = config.align
    if ru_units is None:
        return shared_align_config(config, out, steps=a.steps, freeze={})
    return shared_align_config(config, out, steps=a.steps * a.ru_epochs, freeze={
        "mode": "only_units", "units.file": str(ru_units), "units.selection": "RU", "groups": GROUPS})


def attack_config(config: ConfigDict, out: Path, attack: str, variant: str, layers: str, seed: int) -> ConfigDict:
    a, spec = config.attack, config.attack.datasets[attack]
    units = str(out / "prune_aligned" / "units.npz")
    freeze = {
        "none": {},
        "scu_cu6": {"mode": "units", "units.file": units, "units.selection": a.selection},
        "scu_cu": {"mode": "units", "units.file": units, "units.selection": "SCU+CU"},
        "random": {"mode": "units", "units.file": units, "units.selection": a.selection, "units.random": True},
        "layers": {"mode": "layers", "layers": layers},
        "lora": {"mode": "lora", "lora.rank": a.lora.rank, "lora.alpha": a.lora.alpha,
                 "lora.targets": tuple(a.lora.targets)},
    }[variant]
    return train_config(
        config, model=aligned_model(config, out, run=True), dataset=spec.dataset, split=spec.split, heldout=0,
        steps=spec.steps * (a.frozen_epochs if variant in FROZEN else 1), batch_size=a.batch_size,
        max_length=spec.max_length, learning_rate=a.lora.learning_rate if variant == "lora" else a.learning_rate,
        warmup_steps=a.warmup_steps, freeze=freeze, seed=seed)


def attack_dir(attack: str, variant: str, seed: int) -> str:
    """An attack run's directory, relative to the workdir."""
    return f"attacks/{attack}/{variant}/seed{seed}"


def transfer_run(config: ConfigDict) -> str:
    """The attack run whose model the units_attacked stage re-attributes: ``transfer_attack``
    unprotected, first seed."""
    return attack_dir(config.transfer_attack, "none", config.attack.seeds[0])


def attack_run_config(config: ConfigDict, out: Path, attack: str, variant: str, seed: int) -> ConfigDict:
    """An attack run: its ``finetune`` config (``train``; the ``layers`` variant's block is the
    one the layers stage chose, read from ``layers_file``) and the ``evaluate`` config of the
    attacked model; ``keep_export``: the transfer stage needs this run's model."""
    run = attack_dir(attack, variant, seed)
    return shared_attack_config(attack_config(config, out, attack, variant, "", seed),
                                eval_config(config, config.attack.evaluation, str(out / run / "export")),
                                layers_file=str(out / "layers" / "layers.json"),
                                keep_export=run == transfer_run(config))


def layers_config(config: ConfigDict, out: Path) -> ConfigDict:
    """What find_layer_block is given: the aligned model and its units, the size of
    ``attack.selection``, the held-in harmful prompts (the safety calibration set) and the
    held-out benign responses of ``table.perplexity``."""
    p = config.table.perplexity
    return ConfigDict(dict(
        model=aligned_model(config, out), units=str(out / "prune_aligned" / "units.npz"),
        dtype=config.dtype, data_dir=config.data_dir, mesh=copy.deepcopy(config.mesh),
        selection=config.attack.selection,
        held_in=config.attribution.safety.dataset, batch_size=config.evaluation.batch_size,
        perplexity=ConfigDict(dict(dataset=p.dataset, max_length=p.max_length)),
        layers=copy.deepcopy(config.layers),
    ))


def transfer_config(config: ConfigDict, out: Path) -> ConfigDict:
    """What kind_transfer is given: the fractions and the three attribution runs."""
    return ConfigDict(dict(
        kinds=copy.deepcopy(config.kinds), attack=config.transfer_attack,
        runs=ConfigDict(dict(unaligned=str(out / "units_unaligned"), aligned=str(out / "prune_aligned"),
                             attacked=str(out / "units_attacked"))),
    ))


def probing_config(config: ConfigDict, out: Path) -> ConfigDict:
    """What probe is given: the three models and the held-out harmful prompts (those of
    ``evaluation.harmful``)."""
    h = config.evaluation.harmful
    return ConfigDict(dict(
        models=ConfigDict(dict(unaligned=config.model, aligned=str(out / "align_full" / "export"),
                               aligned_ru=str(out / "align_ru" / "export"))),
        dtype=config.dtype, data_dir=config.data_dir, mesh=copy.deepcopy(config.mesh),
        batch_size=config.evaluation.batch_size, harmful=ConfigDict(dict(dataset=h.dataset, exclude=h.exclude)),
        probing=copy.deepcopy(config.probing),
    ))


