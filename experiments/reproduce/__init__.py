"""Reproduce SSAH (Li & Kim, arXiv 2410.10862) end to end on one model, in stages, into one report.

The stages align the model (full and RU only), find its units, prune them, freeze them during
fine-tuning attacks, follow the kinds through alignment and fine-tuning and probe the
reasoning direction. Each stage runs in ``<workdir>/<stage>/`` (the sub-runs are ordinary
``finetune``, ``prune`` and ``evaluate`` runs) and leaves ``stage.json`` (its identity and its
wall time, summed over the invocations that worked on it) when it finishes; a re-run skips
finished stages and resumes the others (the sub-runs resume themselves), and refuses a finished
stage whose identity the config changed (the engine: :mod:`ssah_jax.pipeline`; this module
defines the stages, :class:`Reproduce`). See ``configs/reproduce.py`` for the stages and their settings.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from experiments import evaluate, finetune, generate, prune
from experiments._mesh import check_mesh, load_on_mesh, model_on_mesh, on_mesh
from experiments._report import save_figure
from experiments._staged import ADDED as SUBRUN_ADDED
from experiments._staged import (
    answers_config,
    answers_stage,
    attack_stage,
    check_attacks,
    eval_config,
    evaluate_stage,
    run_evaluate,
    train_stage,
)
from experiments.reproduce.subruns import (
    VARIANTS,
    align_config,
    aligned_model,
    attack_config,
    attack_dir,
    attack_run_config,
    layers_config,
    probing_config,
    prune_config,
    transfer_config,
    transfer_run,
)
from ssah_jax import hosts, runs
from ssah_jax import pipeline as engine
from ssah_jax.attribution import KINDS, UnitMap, kind_transitions, load_scores
from ssah_jax.data import Record, load_mixture, parse_mixture, prompt_key, substitute_component
from ssah_jax.evaluation import harmful_records, perplexity_records
from ssah_jax.evaluation.ablation import choose_block, layer_blocks
from ssah_jax.evaluation.tasks.spec import Perplexity
from ssah_jax.masking import MODULES
from ssah_jax.pipeline import Stage
from ssah_jax.probing import reasoning_direction
from ssah_jax.train.memory import PlanItem

STAGES = ("contrast", "units_unaligned", "align_full", "align_ru", "eval_unaligned", "eval_aligned", "eval_ru",
          "prune_aligned", "layers", "attacks", "units_attacked", "transfer", "probing", "report")
REQUIRES = {
    "align_full": ("contrast",), "align_ru": ("units_unaligned", "contrast"), "eval_aligned": ("align_full",),
    "eval_ru": ("align_ru",),
    "prune_aligned": ("align_full",), "layers": ("prune_aligned",), "attacks": ("prune_aligned", "layers"),
    "units_attacked": ("attacks",), "transfer": ("units_unaligned", "prune_aligned", "units_attacked"),
    "probing": ("align_full", "align_ru"),
    "report": tuple(s for s in STAGES if s != "report"),
}


# The stages that need an unaligned model (aligning it, or comparing with it): a model its makers
# aligned (``maker_aligned``) is studied without them.
ALIGNING = ("contrast", "units_unaligned", "align_full", "align_ru", "eval_unaligned", "eval_ru", "units_attacked",
            "transfer", "probing")


def order(config: ConfigDict) -> tuple[str, ...]:
    """The stages of this config, in order: all of STAGES, but ``layers`` only when an attack
    variant freezes the block it finds, and none of ALIGNING for a maker-aligned model."""
    return tuple(s for s in STAGES if (s != "layers" or "layers" in config.attack.variants)
                 and not (config.maker_aligned and s in ALIGNING))


def requires(config: ConfigDict) -> dict[str, tuple[str, ...]]:
    """REQUIRES among the stages of :func:`order`."""
    kept = set(order(config))
    return {s: tuple(r for r in rs if r in kept) for s, rs in REQUIRES.items() if s in kept}


# Keys added to the config after results were recorded (its sub-runs'), and its sections added
# (align_sweep, read by the report only; reuse).
ADDED = {**SUBRUN_ADDED, **prune.ADDED}
ADDED_SECTIONS = ("align_sweep", "reuse", "mesh")


class Reproduce:
    """The reproduce pipeline of ``config`` in the workdir ``out`` (a :class:`ssah_jax.pipeline.Pipeline`).

    A stage's identity is the hash of what it is given and of the identities of the stages
    whose results it reads (:meth:`stage`), so a changed key, or a redone prerequisite of another
    config, never mixes into results computed without it."""

    added, sections = ADDED, ADDED_SECTIONS

    def __init__(self, config: ConfigDict, out: Path):
        self.config, self.out = config, out
        self.order, self.requires = order(config), requires(config)

    def runs(self, stage: str) -> list[str]:
        """A stage's directory; ``attacks``: the aligned model's ASR before any attack
        (``attacks/initial``), then each attack run (``attacks/<attack>/<variant>/seed<k>``), seed
        by seed (a first seed of every protection finishes before the next seed starts)."""
        if stage == "attacks":
            a = self.config.attack
            return ["attacks/initial"] + [attack_dir(d, v, s) for s in a.seeds for d in a.datasets for v in a.variants]
        return [stage]

    def stage(self, recorded: str) -> Stage:
        config, out = self.config, self.out
        aligned = aligned_model(config, out)
        # the overlap of the held-out prompts with the alignment data, where we aligned the model
        overlap = (lambda body, section: body) if config.maker_aligned else _then_overlap
        reads = tuple(s for s in ("align_full",) if s in self.order)  # the aligned model, where aligned here
        if recorded.startswith("attacks/") and recorded != "attacks/initial":
            _, attack, variant, seed = recorded.split("/")
            return attack_stage(attack_run_config(config, out, attack, variant, int(seed.removeprefix("seed"))),
                                self.requires["attacks"])
        requires = self.requires.get(recorded, ())
        plans = {
            "contrast": lambda: answers_stage(config, out),
            "units_unaligned": lambda: prune_stage(prune_config(config, config.model, ru=config.budget_ru)),
            "align_full": lambda: train_stage(align_config(config, None, out), requires),
            "align_ru": lambda: train_stage(align_config(config, out / "units_unaligned" / "units.npz", out),
                                            requires),
            "eval_unaligned": lambda: evaluate_stage(eval_config(config, config.evaluation, config.model)),
            "eval_aligned": lambda: Stage(eval_config(config, config.evaluation, aligned),
                                          overlap(run_evaluate, lambda g: g), evaluate.EXCLUDED, requires,
                                          evaluate.ADDED),
            "eval_ru": lambda: evaluate_stage(eval_config(config, config.evaluation,
                                                          str(out / "align_ru" / "export")), requires),
            "prune_aligned": lambda: Stage(prune_config(config, aligned, table=True),
                                           overlap(run_prune, lambda g: g.evaluation), prune.EXCLUDED, requires,
                                           prune.ADDED),
            # greedy answers and log-likelihoods: the batch size only groups them, the mesh places them
            "layers": lambda: Stage(layers_config(config, out), find_layer_block, ("batch_size", "mesh"), requires),
            "attacks/initial": lambda: Stage(eval_config(config, config.attack.evaluation, aligned),
                                             overlap(run_evaluate, lambda g: g), evaluate.EXCLUDED, reads,
                                             evaluate.ADDED),
            "units_attacked": lambda: prune_stage(prune_config(config, str(out / transfer_run(config) / "export")),
                                                  (transfer_run(config),)),
            "transfer": lambda: Stage(transfer_config(config, out), kind_transfer, (), requires),
            # forwards only: the batch size groups them, the mesh places them
            "probing": lambda: Stage(probing_config(config, out), probe, ("batch_size", "mesh"), requires),
        }
        return plans[recorded]()

    def check(self) -> None:
        config = self.config
        check = lambda key, ok, why: runs.check(config, key, ok, why)  # noqa: E731
        check("budget_ru", lambda v: 0 < v < 1, "must be a fraction in (0, 1)")
        for key in ("align.steps", "align.batch_size", "align.ru_epochs", "attack.batch_size",
                    "attack.frozen_epochs", "layers.prompts", "layers.max_new_tokens", "layers.perplexity_samples",
                    "probing.max_tokens"):
            check(key, lambda v: v >= 1, "must be >= 1")
        check("probing.refusals", lambda v: len(v) >= 1, "needs at least one refusal phrasing")
        check("probing.compliances", lambda v: len(v) >= 1, "needs at least one compliance phrasing")
        check("probing.confidence", lambda v: 0 < v < 1, "must be in (0, 1)")
        check("probing.prompts", lambda v: v >= 2, "must be >= 2 (the verdict's intervals need two queries)")
        check("layers.size", lambda v: v >= 0, "must be >= 0 (0: as many units as attack.selection)")
        check("layers.max_perplexity_ratio", lambda v: v >= 1, "must be >= 1 (a multiple of the dense perplexity)")
        check("attack.variants", lambda v: len(v) > 0 and set(v) <= set(VARIANTS),
              f"must be a non-empty subset of {VARIANTS}")
        check_attacks(config)
        check_mesh(config, config.model)
        if not config.maker_aligned:
            check("align.dataset", lambda v: "contrast" in [p.split(":")[0].strip() for p in v.split(",")],
                  "needs the contrast component (the contrast stage's answers), e.g. 'alpaca_libre:168,contrast:56'")
            generate.validate(answers_config(config, Path(".")))
            finetune.validate(align_config(config, Path("units.npz"), Path(".")))
            # (a model its makers aligned has no unaligned model to trace its units' kinds from)
            check("transfer_attack", lambda v: v in config.attack.datasets, "must name one of attack.datasets")
            recipe_sweep(config)
        for section in ("evaluation.", "table.", "attack.evaluation."):
            evaluate.validate(config, section)
        # The sub-runs' own checks, before hours of work rather than after.
        for name in config.attack.datasets:
            for variant in config.attack.variants:
                finetune.validate(attack_config(config, Path("."), name, variant, "0-1", config.attack.seeds[0]))
        prune.validate(prune_config(config, config.model, table=True))

    def plan(self) -> list[PlanItem]:
        """The full alignment, the first attack (unprotected), the attribution and the pruned
        variants' decoding, and the evaluation's decoding (every model has ``config.model``'s
        architecture)."""
        config, out = self.config, self.out
        attack, seed = next(iter(config.attack.datasets)), config.attack.seeds[0]
        attacked = attack_config(config, out, attack, "none", "", seed)
        source = finetune.model_source(config.model)  # as the finetune runs resolve it
        return [PlanItem("align_full", source, finetune.training_spec(align_config(config, None, out)), "finetune."),
                PlanItem(attack_dir(attack, "none", seed), source, finetune.training_spec(attacked), "finetune."),
                *[PlanItem(f"prune_aligned: {item.label}", config.model, item.spec)
                  for item in prune.plan_configs(prune_config(config, config.model, table=True))],
                PlanItem("eval_aligned", config.model,
                         finetune.decode_spec(eval_config(config, config.evaluation, config.model)))]

    def report(self, out: Path, report_dir: Path, invocations: list[dict[str, Any]]) -> Path:
        from experiments.reproduce import report

        return report.write(self.config, out, report_dir, invocations)


def prune_stage(given: ConfigDict, reads: tuple[str, ...] = ()) -> Stage:
    return Stage(given, run_prune, prune.EXCLUDED, reads, prune.ADDED)


SWEEP_COLUMNS = ("point", "status", "asr", "overrefusal")  # what recipe_sweep reads of a sweep.csv


def _same_mixture(theirs: str, ours: str) -> bool:
    """Whether the sweep point's ``data.dataset`` is ``align.dataset``, whose ``contrast``
    component the sweep read from the contrast run's JSONL file."""
    components = parse_mixture(theirs)
    jsonl = next((name for name, _ in components if name.endswith(".jsonl")), "")
    return components == parse_mixture(substitute_component(ours, "contrast", jsonl))


def _holds(check: Callable[[str], bool], value: str) -> bool:
    try:
        return check(value)
    except (KeyError, ValueError):  # not a number where one is due, or not a mixture
        return False


def recipe_sweep(config: ConfigDict) -> list[dict[str, Any]] | None:
    """The finished points of the sweep that chose the alignment recipe on validation prompts
    (``config.align_sweep.csv``, an ``ssah-jax sweep`` table): ``point``, ``asr`` and
    ``overrefusal`` (fractions) each; None when the config names no sweep. Raises ConfigError
    naming the key when the file cannot be read, lacks a column of SWEEP_COLUMNS or a finite
    metric, has no finished point ``config.align_sweep.point``, or that point's recipe (its
    ``data.dataset``, ``steps`` and ``optimizer.learning_rate``, where the table has them) is
    not ``config.align``'s."""
    path, point = config.align_sweep.csv, config.align_sweep.point
    if not path:
        return None
    key = f"config.align_sweep.csv={path!r}"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            table = list(reader)
            missing = [c for c in SWEEP_COLUMNS if c not in (reader.fieldnames or ())]
    except OSError as e:
        raise runs.ConfigError(f"{key}: {e.strerror}") from None
    except csv.Error as e:
        raise runs.ConfigError(f"{key}: not a CSV table ({e})") from None
    if missing:
        raise runs.ConfigError(f"{key}: no column {', '.join(missing)} (a sweep.csv of `ssah-jax sweep`)")
    done = [r for r in table if r["status"] == "ok"]
    rows = []
    for r in done:
        try:
            values = {m: float(r[m]) for m in ("asr", "overrefusal")}
        except (TypeError, ValueError):
            values = {}
        if len(values) < 2 or not all(np.isfinite(v) for v in values.values()):
            raise runs.ConfigError(f"{key}: point {r['point']!r} is finished but its asr / overrefusal "
                                   f"({r['asr']!r}, {r['overrefusal']!r}) are not numbers")
        rows.append({"point": r["point"], **values})
    chosen = next((r for r in done if r["point"] == point), None)
    if chosen is None:
        raise runs.ConfigError(f"config.align_sweep.point={point!r}: not a finished point of {path} "
                               f"(finished: {', '.join(r['point'] for r in rows) or 'none'})")
    a = config.align
    ours = {"data.dataset": lambda v: _same_mixture(v, a.dataset), "steps": lambda v: float(v) == a.steps,
            "optimizer.learning_rate": lambda v: float(v) == a.learning_rate}
    differs = [f"{k}={chosen[k]}" for k, same in ours.items() if chosen.get(k) and not _holds(same, chosen[k])]
    if differs:
        raise runs.ConfigError(f"config.align_sweep.point={point!r}: its recipe ({', '.join(differs)}) is not "
                               "config.align's; set config.align_sweep.csv='' for a recipe no sweep chose")
    return rows


# ---------------------------------------------------------------------------------------------
# Stages


def run_prune(config: ConfigDict, directory: Path) -> None:
    prune.run(config, str(directory))


def heldout_prompts(config: ConfigDict) -> list[Record]:
    """The held-out harmful prompts of ``config.evaluation`` (the ASR set)."""
    h = config.evaluation.harmful
    return harmful_records(h.dataset, h.exclude, config.data_dir or None)


def training_overlap(config: ConfigDict) -> dict[str, int]:
    """How many prompts of each evaluation set were in the alignment data, or (the attacks' set)
    in an attack's data (must be 0). The stages that evaluate the aligned model on a set record
    its count (``overlap.json``). The contrast answers are benign prompts: not read here (they
    are made by the contrast stage)."""
    align = align_config(config, None, Path("."))
    with align.unlocked():
        align.data.dataset = ",".join(p for p in align.data.dataset.split(",") if ".jsonl" not in p)
    trained = set() if config.maker_aligned else training_prompts(align)  # its makers' data: unknown
    attacked = trained | {prompt_key(r.prompt) for a in config.attack.datasets
                          for r in finetune.split_records(attack_config(config, Path("."), a, "none", "", 0))[0]}
    sets = {"evaluation": (config.evaluation, trained), "table": (config.table, trained),
            "attack": (config.attack.evaluation, attacked)}
    return {name: sum(prompt_key(r.prompt) in seen
                      for r in harmful_records(s.harmful.dataset, s.harmful.exclude, config.data_dir or None))
            for name, (s, seen) in sets.items()}


def training_prompts(train: ConfigDict) -> set[str]:
    """The prompts (``prompt_key``) a ``finetune`` config trains on."""
    return {prompt_key(r.prompt) for r in finetune.split_records(train)[0]}


def _then_overlap(body: Callable[[ConfigDict, Path], Any], section: Callable[[ConfigDict], ConfigDict]
                  ) -> Callable[[ConfigDict, Path], Any]:
    """``body``, then ``overlap.json``: how many prompts of the stage's held-out harmful set
    (``section(given)``, an ``evaluate`` config) the model it evaluates was trained on. That model
    (``given.model``) is the export of a finetune run (align_full, a stage it reads), whose
    ``config.json`` names the training data, so the count is determined by the stage's identity."""
    def run_(given: ConfigDict, directory: Path) -> None:
        body(given, directory)
        trained = training_prompts(ConfigDict(runs.read_json(Path(given.model).parent / "config.json")))
        h = section(given).harmful
        heldout = harmful_records(h.dataset, h.exclude, given.data_dir or None)
        result = {"prompts": len(heldout), "in_training_data": sum(prompt_key(r.prompt) in trained for r in heldout)}
        if hosts.is_main():
            (directory / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    return run_


def find_layer_block(config: ConfigDict, directory: Path) -> None:
    """The contiguous block of layers whose removal (every unit of the block pruned: the layers
    become the identity) most lowers the aligned model's refusal rate on held-in harmful
    prompts while the model stays a language model: among the blocks whose removal keeps the
    perplexity of held-out benign responses within ``layers.max_perplexity_ratio`` of the
    dense model's (removing an early layer breaks the model, and a broken model does not
    refuse either). Its size matches the unit count of ``selection`` unless ``layers.size``.
    ``config``: a layers_config."""
    with model_on_mesh(config) as (model, tokenizer):
        _find_layer_block(config, directory, model, tokenizer)


def _find_layer_block(config: ConfigDict, directory: Path, model: Any, tokenizer: Any) -> None:
    umap = UnitMap.load(config.units, model=model)
    selected = int(sum(umap.select(config.selection)[m].sum() for m in MODULES))
    per_layer = sum(umap.masks["CU"][m].shape[1] for m in MODULES)
    size = config.layers.size or max(1, round(selected / per_layer))
    held_in = load_mixture(config.held_in, config.data_dir or None)[0]
    unique = dict.fromkeys(r.prompt for r in held_in)  # first occurrences, in order
    prompts = [Record(p) for p in list(unique)[: config.layers.prompts]]
    benign = perplexity_records(Perplexity(config.perplexity.dataset, config.layers.perplexity_samples,
                                           config.perplexity.max_length), config.data_dir or None)
    dense, blocks = layer_blocks(model, tokenizer, prompts, benign, size=size,
                                 max_new_tokens=config.layers.max_new_tokens,
                                 max_length=config.perplexity.max_length, batch_size=config.batch_size)
    try:
        chosen = choose_block(blocks, dense["perplexity"], config.layers.max_perplexity_ratio)
    except ValueError as e:
        raise runs.ConfigError(f"config.layers.max_perplexity_ratio={config.layers.max_perplexity_ratio}: {e} "
                               "(every block is in the log); raise the ratio or set a smaller config.layers.size"
                               ) from None
    result = {"size": size, "selection": config.selection, "selection_units": selected,
              "units_per_layer": per_layer, "prompts": len(prompts), "perplexity_samples": len(benign),
              "max_perplexity_ratio": config.layers.max_perplexity_ratio,
              "dense_refusal_rate": dense["refusal_rate"], "dense_perplexity": dense["perplexity"],
              "blocks": blocks, "chosen": chosen["layers"]}
    if hosts.is_main():
        (directory / "layers.json").write_text(json.dumps(result, indent=2) + "\n")


def _scores(directory: Path) -> tuple[dict, dict]:
    return load_scores(directory / "scores" / "safety.npz"), load_scores(directory / "scores" / "utility.npz")


def kind_transfer(config: ConfigDict, directory: Path) -> None:
    """Transition matrices between the kinds of the unaligned, aligned and attacked models,
    every map classified with the same fractions (``kinds``). ``config``: a transfer_config."""
    k = config.kinds
    fractions = {"SCU": k.scu, "UCU": k.ucu, "RU": k.ru}
    alignment, fine_tuning = kind_transitions([_scores(Path(config.runs[name])) for name in ("unaligned", "aligned",
                                                                                            "attacked")],
                                              fractions, ranking=k.ranking, normalise=k.normalise)
    result = {"kinds": list(KINDS), "fractions": fractions, "attack": config.attack,
              "alignment": alignment.tolist(), "fine_tuning": fine_tuning.tolist()}
    if hosts.is_main():
        (directory / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_transfer(result, directory / "transfer.png")


def probe(config: ConfigDict, directory: Path) -> None:
    """Reasoning-direction distances of the three models (``config``: a probing_config): per
    model, the distances to each kind of continuation (its phrasings averaged, each over its
    appended positions) per layer and length, averaged over queries, and the per-query gaps."""
    p = config.probing
    h = config.harmful
    queries = [r.prompt for r in harmful_records(h.dataset, h.exclude, config.data_dir or None)[: p.prompts]]
    result = {"prompts": len(queries), "max_tokens": p.max_tokens, "confidence": p.confidence,
              "continuations": {"refusal": list(p.refusals), "compliance": list(p.compliances)}, "models": {}}
    with on_mesh(config) as mesh:
        for name in ("unaligned", "aligned", "aligned_ru"):
            model, tokenizer = load_on_mesh(config, mesh, config.models[name])
            # refusal / compliance: mean over queries, [layers, max_tokens]; gaps: one per query
            result["models"][name] = reasoning_direction(model, tokenizer, queries, p.refusals, p.compliances,
                                                         max_tokens=p.max_tokens, batch_size=config.batch_size)
            del model
    if hosts.is_main():
        (directory / "probing.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_probing(result, directory / "probing.png")


# What the commands call (``ssah-jax reproduce`` / ``plan``): the engine's, for this pipeline
validate = functools.partial(engine.validate, Reproduce)
plan_configs = functools.partial(engine.plan, Reproduce)
run = functools.partial(engine.run, Reproduce)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_transfer(result: dict, path: Path) -> Path:
    plt = runs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, title in zip(axes, ("alignment", "fine_tuning"),
                              ("unaligned -> aligned", f"aligned -> after the {result['attack']} attack")):
        m = np.asarray(result[key], float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(4):
            for j in range(4):
                ax.text(j, i, f"{share[i, j]:.2f}\n({int(m[i, j])})", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(4), result["kinds"])
        ax.set_yticks(range(4), result["kinds"])
        ax.set_xlabel("kind after")
        ax.set_ylabel("kind before")
        ax.set_title(title)
    return save_figure(fig, path, dpi=120)


def plot_probing(result: dict, path: Path) -> Path:
    plt = runs.pyplot()
    models = list(result["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    ks = np.arange(1, result["max_tokens"] + 1)
    for col, name in enumerate(models):
        r = {c: np.asarray(v) for c, v in result["models"][name].items()}  # [layers, K]
        ax = axes[0, col]
        for c, colour in (("refusal", "#2ca02c"), ("compliance", "#d62728")):
            ax.plot(ks, r[c].mean(axis=0), "o-", color=colour, label=c)
        ax.set_title(f"{name}: mean over layers")
        ax.set_xlabel("appended tokens")
        ax.set_ylabel("mean cosine distance to the query state")
        ax.legend(fontsize="small")
        ax = axes[1, col]
        gap = r["compliance"][:, -1] - r["refusal"][:, -1]
        ax.bar(np.arange(len(gap)), gap, color=np.where(gap > 0, "#2ca02c", "#d62728"))
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{name}: d(compliance) - d(refusal), {result['max_tokens']} tokens")
        ax.set_xlabel("layer")
    return save_figure(fig, path, dpi=110)
