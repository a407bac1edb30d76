"""Reproduce SSAH end to end on one model (DESIGN.md section 2.3): align it (full and RU only),
find its units, prune them, freeze them during fine-tuning attacks, follow the kinds through
alignment and fine-tuning, probe the reasoning direction, and write one report.

Each stage runs in ``<workdir>/<stage>/`` (the sub-runs are ordinary ``finetune``, ``prune``
and ``evaluate`` runs) and leaves ``stage.json`` (its wall time, summed over the invocations
that worked on it) when it finishes; a re-run skips finished stages and resumes the others (the
sub-runs resume themselves). See
``configs/reproduce.py`` for the stages and their settings.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from experiments import evaluate, finetune, prune
from ssah_jax import runs
from ssah_jax.attribution import KINDS, UnitMap, classify, transition_matrix
from ssah_jax.checkpoints import load_model
from ssah_jax.data import Record, load_mixture, prompt_key
from ssah_jax.evaluation import answer_rows, perplexity_rows, summarise_perplexity
from ssah_jax.masking import GROUPS, MODULES
from ssah_jax.masking import prune as prune_units
from ssah_jax.probing import direction_distances

STAGES = ("units_unaligned", "align_full", "align_ru", "eval_unaligned", "eval_aligned", "eval_ru",
          "prune_aligned", "layers", "attacks", "units_attacked", "transfer", "probing", "report")
REQUIRES = {
    "align_ru": ("units_unaligned",), "eval_aligned": ("align_full",), "eval_ru": ("align_ru",),
    "prune_aligned": ("align_full",), "layers": ("prune_aligned",), "attacks": ("prune_aligned", "layers"),
    "units_attacked": ("attacks",), "transfer": ("units_unaligned", "prune_aligned", "units_attacked"),
    "probing": ("align_full", "align_ru"),
    "report": tuple(s for s in STAGES if s != "report"),
}
VARIANTS = ("none", "scu_cu6", "scu_cu", "random", "layers", "lora")
FROZEN = ("scu_cu6", "scu_cu", "random", "layers")  # trained attack.frozen_epochs times the steps
# The config keys each stage's results depend on (directly; what it reads from earlier stages
# is covered by theirs). A finished stage is refused if any of its keys changed since.
STAGE_KEYS = {
    "units_unaligned": ("model", "dtype", "seed", "attribution", "kinds", "budget_ru"),
    "align_full": ("model", "seed", "align", "finetune"),
    "align_ru": ("model", "seed", "align", "finetune"),
    "eval_unaligned": ("model", "dtype", "evaluation"),
    "eval_aligned": ("dtype", "evaluation"),
    "eval_ru": ("dtype", "evaluation"),
    "prune_aligned": ("dtype", "seed", "attribution", "kinds", "table"),
    "layers": ("dtype", "layers", "attack.selection", "attribution.safety", "evaluation.batch_size",
               "table.perplexity"),
    "attacks/initial": ("dtype", "attack.evaluation"),
    # and attacks/<attack>/<variant>: ATTACK_KEYS plus attack.datasets.<attack>
    "units_attacked": ("dtype", "attribution", "kinds", "transfer_attack"),
    "transfer": ("kinds", "transfer_attack"),
    "probing": ("dtype", "probing", "evaluation.harmful", "evaluation.batch_size"),
}
ATTACK_KEYS = ("dtype", "seed", "finetune", "attack.selection", "attack.frozen_epochs", "attack.batch_size",
               "attack.learning_rate", "attack.warmup_steps", "attack.lora", "attack.evaluation")


# ---------------------------------------------------------------------------------------------
# Sub-run configs


def _set(config: ConfigDict, values: dict[str, Any]) -> ConfigDict:
    config = copy.deepcopy(config)
    runs.set_values(config, values)
    return config


def train_config(config: ConfigDict, *, model: str, dataset: str, split: str, steps: int, batch_size: int,
                 max_length: int, heldout: int, learning_rate: float, warmup_steps: int,
                 freeze: dict[str, Any]) -> ConfigDict:
    """A ``finetune`` config: ``config.finetune`` with this run's model, data, length and freeze."""
    values = {
        "model": model, "data_dir": config.data_dir, "seed": config.seed, "data.dataset": dataset,
        "data.split": split, "data.limit": 0, "data.heldout": heldout, "data.max_length": max_length,
        "data.system_prompt": "", "steps": steps, "batch_size": batch_size,
        "optimizer.learning_rate": learning_rate, "optimizer.warmup_steps": warmup_steps,
        "freeze.mode": "none", "freeze.units.file": "", "freeze.units.selection": "", "freeze.units.random": False,
        "freeze.layers": "", "freeze.groups": (),
    }
    values.update({f"freeze.{k}": v for k, v in freeze.items()})
    return _set(config.finetune, values)


def eval_config(config: ConfigDict, section: ConfigDict, model: str) -> ConfigDict:
    c = copy.deepcopy(section)
    with c.unlocked():
        c.model, c.dtype, c.data_dir = model, config.dtype, config.data_dir
    return c


def prune_config(config: ConfigDict, model: str, *, ru: float | None = None, table: bool = False) -> ConfigDict:
    c = ConfigDict(dict(
        model=model, dtype=config.dtype, data_dir=config.data_dir, seed=config.seed,
        attribution=copy.deepcopy(config.attribution), kinds=copy.deepcopy(config.kinds),
        variants=prune.VARIANTS if table else (), evaluation=copy.deepcopy(config.table),
    ))
    if ru is not None:
        c.kinds.ru = ru
    return c


def align_config(config: ConfigDict, ru_units: Path | None) -> ConfigDict:
    a = config.align
    freeze = {} if ru_units is None else {
        "mode": "only_units", "units.file": str(ru_units), "units.selection": "RU", "groups": GROUPS}
    return train_config(config, model=config.model, dataset=a.dataset, split="", max_length=a.max_length,
                        steps=a.steps * (1 if ru_units is None else a.ru_epochs), batch_size=a.batch_size,
                        heldout=a.heldout, learning_rate=a.learning_rate, warmup_steps=a.warmup_steps, freeze=freeze)


def attack_config(config: ConfigDict, out: Path, attack: str, variant: str, layers: str) -> ConfigDict:
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
        config, model=str(out / "align_full"), dataset=spec.dataset, split=spec.split, heldout=0,
        steps=spec.steps * (a.frozen_epochs if variant in FROZEN else 1), batch_size=a.batch_size,
        max_length=spec.max_length, learning_rate=a.lora.learning_rate if variant == "lora" else a.learning_rate,
        warmup_steps=a.warmup_steps, freeze=freeze)


def stages(config: ConfigDict) -> list[str]:
    """``config.stages`` in pipeline order; ``--config.stages=a,b`` (one string) works too."""
    names = {s.strip() for entry in config.stages for s in entry.split(",") if s.strip()}
    runs.check(config, "stages", lambda v: names and names <= set(STAGES), f"must be a non-empty subset of {STAGES}")
    return [s for s in STAGES if s in names]


def validate(config: ConfigDict) -> None:
    check = lambda key, ok, why: runs.check(config, key, ok, why)  # noqa: E731
    runs.dtype(config)
    stages(config)
    check("budget_ru", lambda v: 0 < v < 1, "must be a fraction in (0, 1)")
    for key in ("align.steps", "align.batch_size", "align.ru_epochs", "attack.batch_size",
                "attack.frozen_epochs", "layers.prompts", "layers.max_new_tokens", "layers.perplexity_samples",
                "probing.prompts",
                "probing.max_tokens"):
        check(key, lambda v: v >= 1, "must be >= 1")
    check("layers.size", lambda v: v >= 0, "must be >= 0 (0: as many units as attack.selection)")
    check("layers.max_perplexity_ratio", lambda v: v >= 1, "must be >= 1 (a multiple of the dense perplexity)")
    check("attack.variants", lambda v: len(v) > 0 and set(v) <= set(VARIANTS),
          f"must be a non-empty subset of {VARIANTS}")
    check("attack.datasets", lambda v: len(v) > 0, "needs at least one attack")
    for name, spec in config.attack.datasets.items():
        check(f"attack.datasets.{name}.steps", lambda v: v >= 1, "must be >= 1")
    check("transfer_attack", lambda v: v in config.attack.datasets, "must name one of attack.datasets")
    for section in ("evaluation.", "table.", "attack.evaluation."):
        evaluate.validate(config, section)
    # The sub-runs' own checks, before hours of work rather than after.
    finetune.validate(align_config(config, Path("units.npz")))
    for name in config.attack.datasets:
        for variant in config.attack.variants:
            finetune.validate(attack_config(config, Path("."), name, variant, "0-1"))
    prune.validate(prune_config(config, config.model, table=True))


# ---------------------------------------------------------------------------------------------
# Stages


def _finished(directory: Path) -> dict | None:
    marker = directory / "stage.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _values(config: ConfigDict, keys: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = runs.get(config, key)
        out[key] = json.loads(value.to_json_best_effort()) if isinstance(value, ConfigDict) else value
    return json.loads(json.dumps(out))  # tuples as lists, as they are read back


def check_finished(config: ConfigDict, directory: Path, keys: tuple[str, ...]) -> dict | None:
    """The record of a finished stage (None if it is not); refuses one whose config keys
    changed since (its results would not match)."""
    done = _finished(directory)
    if done is None:
        return None
    now = _values(config, keys)
    changed = [k for k in keys if done["config"].get(k) != now[k]]
    if changed:
        raise runs.ConfigError(f"{directory} finished with other values of " + ", ".join(f"config.{k}" for k in changed)
                               + "; restore them, delete that stage's directory to redo it, or use a new --workdir")
    return done


def _stage(directory: Path, fn: Callable[[Path], Any], config: ConfigDict, keys: tuple[str, ...]) -> None:
    """Runs ``fn(directory)`` unless it finished before; records its wall time and ``keys``."""
    done = check_finished(config, directory, keys)
    if done is not None:
        print(f"[{directory.name}] finished in an earlier run ({done['seconds']} s), kept")
        return
    print(f"\n=== {directory} ===", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    with _StageTimer(directory) as timer:
        fn(directory)  # its results are the files it writes
    record = {"seconds": round(timer.seconds, 1), "invocations": timer.invocations,
              "finished": datetime.datetime.now().isoformat(timespec="seconds"), "config": _values(config, keys)}
    (directory / "stage.json").write_text(json.dumps(record, indent=2) + "\n")
    (directory / _StageTimer.FILE).unlink()


class _StageTimer:
    """Wall time of a stage summed over the invocations that worked on it.

    A killed invocation cannot report its time, so the running total is written to
    ``<stage>/elapsed.json`` every ``every`` seconds; a resumed stage starts from it (a kill
    loses at most ``every`` seconds of the count).
    """

    FILE = "elapsed.json"

    def __init__(self, directory: Path, every: float = 10.0):
        self.path, self.every = directory / self.FILE, every
        earlier = json.loads(self.path.read_text()) if self.path.exists() else {"seconds": 0.0, "invocations": 0}
        self.earlier, self.invocations = earlier["seconds"], earlier["invocations"] + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    @property
    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self._start

    def _save(self) -> None:
        self.path.write_text(json.dumps({"seconds": round(self.seconds, 1), "invocations": self.invocations}))

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._save()

    def __enter__(self) -> _StageTimer:
        self._start = time.perf_counter()
        self._save()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._save()


def _train(config: ConfigDict, directory: Path) -> None:
    """A finetune run whose checkpoints are dropped once it finished (its export is the result)."""
    finetune.run(config, str(directory))
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)


def _heldout_prompts(config: ConfigDict) -> list[Record]:
    return evaluate.harmful_records(config.evaluation, config.data_dir or None)


def training_overlap(config: ConfigDict) -> dict[str, int]:
    """How many prompts of each evaluation set were in the alignment data (must be 0)."""
    trained = {prompt_key(r.prompt) for r in finetune.split_records(align_config(config, None))[0]}
    sets = {"evaluation": config.evaluation, "table": config.table, "attack": config.attack.evaluation}
    return {name: sum(prompt_key(r.prompt) in trained for r in evaluate.harmful_records(s, config.data_dir or None))
            for name, s in sets.items()}


def find_layer_block(config: ConfigDict, out: Path, directory: Path) -> None:
    """The contiguous block of layers whose removal (every unit of the block pruned: the layers
    become the identity) most lowers the aligned model's refusal rate on held-in harmful
    prompts while the model stays a language model: among the blocks whose removal keeps the
    perplexity of held-out benign responses within ``layers.max_perplexity_ratio`` of the
    dense model's (removing an early layer breaks the model, and a broken model does not
    refuse either). Its size matches the unit count of ``attack.selection`` unless
    ``layers.size``."""
    model, tokenizer = load_model(str(out / "align_full" / "export"), runs.dtype(config))
    umap = UnitMap.load(out / "prune_aligned" / "units.npz", model=model)
    selected = int(sum(umap.select(config.attack.selection)[m].sum() for m in MODULES))
    per_layer = sum(umap.masks["CU"][m].shape[1] for m in MODULES)
    layers = model.config.num_layers
    size = config.layers.size or max(1, round(selected / per_layer))
    held_in = load_mixture(config.attribution.safety.dataset, config.data_dir or None)[0]
    unique = dict.fromkeys(r.prompt for r in held_in)  # first occurrences, in order
    prompts = [Record(p) for p in list(unique)[: config.layers.prompts]]
    kw = dict(max_new_tokens=config.layers.max_new_tokens, batch_size=config.evaluation.batch_size)

    benign = evaluate.perplexity_records(config.table, config.data_dir or None, config.layers.perplexity_samples)

    def measure(m) -> dict[str, float]:
        refused = [row["refused"] for row in answer_rows(m, tokenizer, prompts, **kw)]
        ppl = summarise_perplexity(perplexity_rows(m, tokenizer, benign, max_length=config.table.perplexity.max_length,
                                                   batch_size=config.evaluation.batch_size))["perplexity"]
        return {"refusal_rate": float(np.mean(refused)), "perplexity": ppl}

    graphdef, state = nnx.split(model)
    dense = measure(model)
    blocks = []
    for start in range(layers - size + 1):
        units = {m: np.zeros(umap.masks["CU"][m].shape, bool) for m in MODULES}
        for m in MODULES:
            units[m][start : start + size] = True
        blocks.append({"layers": f"{start}-{start + size - 1}",
                       **measure(nnx.merge(graphdef, prune_units(state, units, model.config)))})
        b = blocks[-1]
        print(f"layers {b['layers']} removed: refusal rate {b['refusal_rate']:.3f} "
              f"(dense {dense['refusal_rate']:.3f}), perplexity {b['perplexity']:.2f} "
              f"(dense {dense['perplexity']:.2f})", flush=True)
    chosen = choose_block(blocks, dense["perplexity"], config.layers.max_perplexity_ratio)
    result = {"size": size, "selection": config.attack.selection, "selection_units": selected,
              "units_per_layer": per_layer, "prompts": len(prompts), "perplexity_samples": len(benign),
              "max_perplexity_ratio": config.layers.max_perplexity_ratio,
              "dense_refusal_rate": dense["refusal_rate"], "dense_perplexity": dense["perplexity"],
              "blocks": blocks, "chosen": chosen["layers"]}
    (directory / "layers.json").write_text(json.dumps(result, indent=2) + "\n")


def choose_block(blocks: list[dict], dense_perplexity: float, max_ratio: float) -> dict:
    """The block with the lowest ``refusal_rate`` (the first of ties) among those whose
    ``perplexity`` is within ``max_ratio`` times ``dense_perplexity``."""
    limit = max_ratio * dense_perplexity
    intact = [b for b in blocks if b["perplexity"] <= limit]
    if not intact:
        raise runs.ConfigError(
            f"config.layers.max_perplexity_ratio={max_ratio}: removing any block of layers raises the perplexity "
            f"above {limit:.2f} (every block is in the log); raise the ratio or set a smaller config.layers.size")
    return min(intact, key=lambda b: b["refusal_rate"])


def attack_runs(config: ConfigDict) -> list[tuple[str, str]]:
    return [(a, v) for a in config.attack.datasets for v in config.attack.variants]


def finished(config: ConfigDict, out: Path, stage: str) -> bool:
    """``attacks`` is finished when each of its runs is (adding an attack reopens it)."""
    if stage == "attacks":
        runs_ = [out / "attacks" / "initial"] + [out / "attacks" / a / v for a, v in attack_runs(config)]
        return all(_finished(d) is not None for d in runs_)
    return _finished(out / stage) is not None


def run_attacks(config: ConfigDict, out: Path, directory: Path) -> None:
    block = json.loads((out / "layers" / "layers.json").read_text())["chosen"]
    aligned = str(out / "align_full" / "export")
    initial = eval_config(config, config.attack.evaluation, aligned)
    _stage(directory / "initial", lambda d: evaluate.run(initial, str(d)), config, STAGE_KEYS["attacks/initial"])
    for attack, variant in attack_runs(config):
        def one(d, attack=attack, variant=variant):
            _train(attack_config(config, out, attack, variant, block), d)
            evaluate.run(eval_config(config, config.attack.evaluation, str(d / "export")), str(d / "eval"))
            if not (attack == config.transfer_attack and variant == "none"):
                shutil.rmtree(d / "export")  # 0.5 GB each; the transfer stage needs only one

        _stage(directory / attack / variant, one, config, ATTACK_KEYS + (f"attack.datasets.{attack}",))


def _scores(directory: Path) -> tuple[dict, dict]:
    out = []
    for which in ("safety", "utility"):
        with np.load(directory / "scores" / f"{which}.npz") as data:
            out.append({m: data[m] for m in MODULES})
    return out[0], out[1]


def kind_transfer(config: ConfigDict, out: Path, directory: Path) -> None:
    """Transition matrices between the kinds of the unaligned, aligned and attacked models,
    every map classified with the same fractions (``kinds``)."""
    k = config.kinds
    maps = {name: classify(*_scores(out / stage), {"SCU": k.scu, "UCU": k.ucu, "RU": k.ru}, ranking=k.ranking,
                           normalise=k.normalise)
            for name, stage in (("unaligned", "units_unaligned"), ("aligned", "prune_aligned"),
                                ("attacked", "units_attacked"))}
    result = {"kinds": list(KINDS), "fractions": {"SCU": k.scu, "UCU": k.ucu, "RU": k.ru},
              "attack": config.transfer_attack,
              "alignment": transition_matrix(maps["unaligned"], maps["aligned"]).tolist(),
              "fine_tuning": transition_matrix(maps["aligned"], maps["attacked"]).tolist()}
    (directory / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_transfer(result, directory / "transfer.png")


def probe(config: ConfigDict, out: Path, directory: Path) -> None:
    p = config.probing
    queries = [r.prompt for r in _heldout_prompts(config)[: p.prompts]]
    continuations = {"refusal": p.refusal, "compliance": p.compliance}
    result = {"prompts": len(queries), "max_tokens": p.max_tokens, "continuations": continuations, "models": {}}
    for name, ref in (("unaligned", config.model), ("aligned", str(out / "align_full" / "export")),
                      ("aligned_ru", str(out / "align_ru" / "export"))):
        model, tokenizer = load_model(ref, runs.dtype(config))
        d = direction_distances(model, tokenizer, queries, continuations, max_tokens=p.max_tokens,
                                batch_size=config.evaluation.batch_size)
        # mean over queries: [layers, max_tokens]
        result["models"][name] = {c: d[c].mean(axis=0).tolist() for c in continuations}
        del model
    (directory / "probing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_probing(result, directory / "probing.png")


def run(config: ConfigDict, workdir: str) -> Path:
    validate(config)
    out = runs.prepare_workdir(workdir, config)  # each stage checks its own keys (STAGE_KEYS)
    if config.jax_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    todo = stages(config)
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"argv": sys.argv, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                            "stages": todo, **runs.machine()}) + "\n")
    for stage in todo:
        missing = [r for r in REQUIRES.get(stage, ()) if not finished(config, out, r) and r not in todo]
        if missing:
            raise runs.ConfigError(f"config.stages: stage {stage!r} needs {missing} finished first "
                                   f"(in {out}) or in config.stages")
    unaligned, aligned = config.model, str(out / "align_full" / "export")
    work: dict[str, Callable[[Path], Any]] = {
        "units_unaligned": lambda d: prune.run(prune_config(config, unaligned, ru=config.budget_ru), str(d)),
        "align_full": lambda d: _train(align_config(config, None), d),
        "align_ru": lambda d: _train(align_config(config, out / "units_unaligned" / "units.npz"), d),
        "eval_unaligned": lambda d: evaluate.run(eval_config(config, config.evaluation, unaligned), str(d)),
        "eval_aligned": lambda d: evaluate.run(eval_config(config, config.evaluation, aligned), str(d)),
        "eval_ru": lambda d: evaluate.run(eval_config(config, config.evaluation, str(out / "align_ru" / "export")),
                                          str(d)),
        "prune_aligned": lambda d: prune.run(prune_config(config, aligned, table=True), str(d)),
        "layers": lambda d: find_layer_block(config, out, d),
        "attacks": lambda d: run_attacks(config, out, d),
        "units_attacked": lambda d: prune.run(prune_config(
            config, str(out / "attacks" / config.transfer_attack / "none" / "export")), str(d)),
        "transfer": lambda d: kind_transfer(config, out, d),
        "probing": lambda d: probe(config, out, d),
    }
    for stage, keys in STAGE_KEYS.items():  # every finished stage, scheduled or not
        check_finished(config, out / stage, keys)
    for attack, variant in attack_runs(config):
        check_finished(config, out / "attacks" / attack / variant, ATTACK_KEYS + (f"attack.datasets.{attack}",))
    for stage in todo:
        if stage == "attacks":
            work[stage](out / stage)  # its runs are stages of their own
        elif stage != "report":
            _stage(out / stage, work[stage], config, STAGE_KEYS[stage])
    if "report" not in todo:
        print(f"Stages done: {todo} in {out}; add 'report' to config.stages for the report")
        return out
    from experiments import _reproduce_report

    report = _reproduce_report.write(config, out, Path(config.report_dir))
    print(f"Report: {report}")
    return report


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_probing(result: dict, path: Path) -> Path:
    plt = runs.pyplot()
    models = list(result["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    ks = np.arange(1, result["max_tokens"] + 1)
    for col, name in enumerate(models):
        r = {c: np.asarray(v) for c, v in result["models"][name].items()}  # [layers, K]
        ax = axes[0, col]
        for c, colour in (("refusal", "#2ca02c"), ("compliance", "#d62728")):
            ax.plot(ks[1:], r[c].mean(axis=0)[1:], "o-", color=colour, label=c)
        ax.set_title(f"{name}: mean over layers")
        ax.set_xlabel("appended tokens")
        ax.set_ylabel("cosine distance to the query state")
        ax.legend(fontsize="small")
        ax = axes[1, col]
        gap = r["compliance"][:, -1] - r["refusal"][:, -1]
        ax.bar(np.arange(len(gap)), gap, color=np.where(gap > 0, "#2ca02c", "#d62728"))
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{name}: d(compliance) - d(refusal), {result['max_tokens']} tokens")
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
