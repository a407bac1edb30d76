"""Prune each kind of SSAH unit and measure safety and utility (paper Table 1).

Steps, each kept in the workdir so that a re-run resumes where the last one stopped (a re-run
with other values of the determining keys is refused, see ``runs.prepare_workdir``):
  1. ``scores/{safety,utility}.npz``: unit scores on the two calibration sets (chat-rendered
     with the model's template; the counted tokens are ``attribution.tokens``)
  2. ``units.npz`` / ``units.json``: the unit kinds (SCU / UCU / CU / RU)
  3. ``variants/<model>/``: an ``ssah-jax evaluate`` run of each of ``config.variants``: the
     dense model, minus SCU, minus UCU, minus RU, and minus as many random units as there are
     SCU (the control); none when it is empty (the unit map is then the result)
  4. ``report.md`` (the table, the share of each kind) and ``kinds_per_layer.png``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from experiments import evaluate
from experiments._mesh import check_mesh, load_on_mesh, on_mesh
from experiments._report import asr_judged
from ssah_jax import hosts, runs
from ssah_jax.attribution import KINDS, SCORERS, TOKENS, calibration_scores, classify, score_cache
from ssah_jax.attribution.kinds import NORMALISATIONS, RANKINGS
from ssah_jax.data import check_kit_dataset, load_local, with_responses
from ssah_jax.evaluation import judges
from ssah_jax.masking import MODULES, prune_units

VARIANTS = ("dense", "minus_SCU", "minus_UCU", "minus_RU", "minus_random")
# Keys that only affect speed or logging (every other key determines the results, so a workdir
# holding results of other values of them is refused): the scores are sums over the calibration
# examples, which the batch size only groups; a score cache holds the same scores as the workdir;
# SNIP by layer gives the same scores; the mesh only places the work (experiments._mesh).
# (evaluation.batch_size is determining, see evaluate.)
EXCLUDED = ("attribution.batch_size", "attribution.cache_dir", "attribution.snip_by_layer", "mesh")
ADDED = evaluate.ADDED  # (its evaluation section is an evaluate config)
ADDED_SECTIONS = ("mesh",)  # added after results were recorded (a workdir from before it is resumed)


def validate(config: ConfigDict) -> None:
    runs.dtype(config)
    a = "attribution."
    runs.check(config, a + "scorer", lambda v: v in SCORERS, f"must be one of {SCORERS}")
    runs.check(config, a + "tokens", lambda v: v in TOKENS, f"must be one of {TOKENS}")
    runs.check(config, a + "batch_size", lambda v: v >= 1, "must be >= 1")
    runs.check(config, a + "snip_by_layer", lambda v: isinstance(v, bool), "must be True or False")
    runs.check(config, a + "max_length", lambda v: v >= 16, "must be >= 16")
    for which in ("safety", "utility"):
        runs.check(config, f"{a}{which}.limit", lambda v: v >= 0, "must be >= 0 (0 = all)")
    for kind in ("scu", "ucu", "ru"):
        runs.check(config, f"kinds.{kind}", lambda v: 0 <= v <= 1, "must be a fraction in [0, 1]")
    runs.check(config, "kinds.ru", lambda v: config.kinds.scu + config.kinds.ucu + v <= 1,
               "kinds.scu + kinds.ucu + kinds.ru must be at most 1")
    runs.check(config, "kinds.ranking", lambda v: v in RANKINGS, f"must be one of {RANKINGS}")
    runs.check(config, "kinds.normalise", lambda v: v in NORMALISATIONS, f"must be one of {NORMALISATIONS}")
    runs.check(config, "variants", lambda v: set(v) <= set(VARIANTS),
               f"must be a subset of {VARIANTS} (empty: the unit kinds only)")
    for which in ("safety", "utility"):
        runs.check_parses(config, f"{a}{which}.dataset", check_kit_dataset)
    evaluate.validate(config, "evaluation.")
    check_mesh(config)


def calibration_records(config: ConfigDict, which: str) -> list:
    spec = config.attribution[which]
    records = with_responses(load_local(spec.dataset, None, config.data_dir or None, on_error="skip")[0])
    return records[: spec.limit] if spec.limit else records


def scores(config: ConfigDict, model: Any, tokenizer: Any, out: Path, which: str) -> dict[str, np.ndarray]:
    """Scores on one calibration set, computed once and kept in ``scores/<which>.npz``; shared
    with other runs through ``attribution.cache_dir`` (a directory per model and settings) when set."""
    a = config.attribution
    cache = None
    if a.cache_dir:
        settings = {k: v for k, v in runs.leaves(a).items() if k not in ("batch_size", "cache_dir", "snip_by_layer")}
        cache = score_cache(a.cache_dir, model, source=config.model, dtype=config.dtype, attribution=settings,
                            data_dir=config.data_dir)
    return calibration_scores(model, tokenizer, calibration_records(config, which), out / "scores", which,
                              scorer=a.scorer, tokens=a.tokens, max_length=a.max_length, batch_size=a.batch_size,
                              dataset=a[which].dataset, cache=cache, by_layer=a.snip_by_layer)


def plan_configs(config: ConfigDict) -> list[Any]:
    """What ``ssah-jax plan`` compiles: a batch of the unit scoring, and the variants'
    evaluation (decoding a batch of prompts)."""
    from ssah_jax.train.memory import AttributionSpec, DecodeSpec, PlanItem

    a, e, dtype = config.attribution, config.evaluation, runs.DTYPES[config.dtype]
    items = [PlanItem(f"attribution ({a.scorer})", config.model,
                      AttributionSpec(a.scorer, a.batch_size, a.max_length, dtype, dict(config.mesh),
                                      a.snip_by_layer))]
    if config.variants:
        items.append(PlanItem("evaluation", config.model,
                              DecodeSpec(e.batch_size, e.max_new_tokens, dtype, dict(config.mesh))))
    return items


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    validate(config)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, added=ADDED, sections=ADDED_SECTIONS, overwrite=overwrite)
    with on_mesh(config) as mesh:
        model, tokenizer = load_on_mesh(config, mesh)
        judge = evaluate.load_judge(config.evaluation, config, mesh, "evaluation.") if config.variants else None
        return _prune(config, out, model, tokenizer, judge)


def _prune(config: ConfigDict, out: Path, model: Any, tokenizer: Any, judge: judges.Judge | None) -> Path:
    """The steps of the module docstring; ``judge``: the variants' judge of ASR (None: no variants)."""
    safety = scores(config, model, tokenizer, out, "safety")
    utility = scores(config, model, tokenizer, out, "utility")
    k = config.kinds
    a = config.attribution
    umap = classify(safety, utility, {"SCU": k.scu, "UCU": k.ucu, "RU": k.ru}, ranking=k.ranking,
                    normalise=k.normalise, model=model, info={
                        "scorer": a.scorer, "tokens": a.tokens,
                        "data": {w: {"dataset": a[w].dataset, "limit": a[w].limit, "max_length": a.max_length}
                                 for w in ("safety", "utility")},
                    })
    npz, summary = umap.save(out / "units")
    print(f"Unit kinds: {umap.counts()} of {umap.num_units} units -> {summary}")

    masks = {f"minus_{kind}": umap.mask(kind) for kind in ("SCU", "UCU", "RU")}
    masks["minus_random"] = umap.random_units(umap.counts()["SCU"], config.seed)
    graphdef, state = nnx.split(model)
    results = {}
    for name in [v for v in VARIANTS if v in config.variants]:
        print(f"== {name} ==")
        pruned = 0 if name == "dense" else int(sum(masks[name][m].sum() for m in MODULES))
        if name != "dense" and pruned == 0 and "dense" in results:  # a kind of fraction 0: the dense model
            print(f"{name} prunes no unit: the dense model's results")
            results[name] = results["dense"]
            continue
        variant = model if name == "dense" else nnx.merge(graphdef, prune_units(state, masks[name], model.config))
        results[name] = evaluate.evaluate_model(
            variant, tokenizer, evaluate.evaluation_spec(config.evaluation, config.data_dir), out / "variants" / name,
            description=f"Model `{config.model}` ({config.dtype}), {name} ({pruned} units pruned)", judge=judge)
        results[name]["pruned_units"] = pruned
        del variant

    plot = out / "kinds_per_layer.png"
    if hosts.is_main():
        plot_kinds(umap, plot)
    if not results:
        print(f"Unit map: {npz} (no pruned variants evaluated: config.variants is empty)")
        return npz
    report = out / "report.md"
    if hosts.is_main():
        report.write_text(render_report(config, umap, results, out, plot))
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    hosts.sync("prune written")
    print(f"Report: {report}")
    return report


# ---------------------------------------------------------------------------------------------
# Report

COLUMNS = (  # (metrics key, value key, header, format)
    ("mmlu", "accuracy", "MMLU", "pct"),
    ("sst2", "accuracy", "SST-2", "pct"),
    ("gsm8k", "accuracy", "GSM8K", "pct"),
    ("perplexity", "perplexity", "perplexity", "float"),
    ("overrefusal", "refusal_rate", "over-refusal", "pct"),
    ("asr_no_system", "asr", "ASR (no system prompt)", "pct"),
    ("asr_system", "asr", "ASR (safety system prompt)", "pct"),
)
LABELS = {"dense": "dense", "minus_SCU": "− SCU", "minus_UCU": "− UCU", "minus_RU": "− RU",
          "minus_random": "− random (as many as SCU)"}


def _value(metrics: dict, key: str, field: str, fmt: str) -> str:
    if key not in metrics:
        return "–"
    v = metrics[key][field]
    return f"{100 * v:.1f}%" if fmt == "pct" else f"{v:.2f}"


def render_report(config: ConfigDict, umap, results: dict, out: Path, plot: Path) -> str:
    a, e = config.attribution, config.evaluation
    counts, total = umap.counts(), umap.num_units
    first = next(iter(results.values()))
    columns = [c for c in COLUMNS if c[0] in first]
    lines = [
        "# prune", "",
        f"Model `{config.model}` ({config.dtype}). Units scored with `{a.scorer}` on the {a.tokens} tokens of "
        f"{a.safety.limit or 'all'} `{a.safety.dataset}` (safety) and {a.utility.limit or 'all'} `{a.utility.dataset}` "
        f"(utility) samples; kinds ranked {config.kinds.ranking}ly on {config.kinds.normalise}-normalised scores. "
        f"Pruning zeroes a unit's column of o_proj / down_proj and its rows of v / gate / up "
        f"(`ssah_jax.masking.prune_units`). Evaluation: greedy decoding, {e.max_new_tokens} new tokens, the harmful "
        f"prompts of `{e.harmful.dataset}`"
        + (f" without those of `{e.harmful.exclude}`" if e.harmful.exclude else "") + ". "
        + asr_judged({"evaluation": e}), "",
        "| model | units pruned | " + " | ".join(c[2] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, m in results.items():
        share = f"{m['pruned_units']} ({100 * m['pruned_units'] / total:.1f}%)"
        lines.append(f"| {LABELS[name]} | {share} | " + " | ".join(_value(m, *c[:2], c[3]) for c in columns) + " |")
    n = {c[0]: first[c[0]]["n"] for c in columns}
    lines += ["", "Examples per metric: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ".", "",
              "## Unit kinds", "",
              f"{total} units (" + ", ".join(f"{m}: {umap.masks['CU'][m].size}" for m in MODULES) + ").",
              "", "| kind | units | share | in attention | in MLP |", "|---|---|---|---|---|"]
    for kind in KINDS:
        per = {m: int(umap.masks[kind][m].sum()) for m in MODULES}
        lines.append(f"| {kind} | {counts[kind]} | {100 * counts[kind] / total:.2f}% | {per['attn']} | {per['mlp']} |")
    safety_prompts = set(json.loads((out / "scores" / "safety.json").read_text())["prompts"])
    asr_rows = out / "variants" / next(iter(results)) / "rows" / f"asr_{e.harmful.settings[0]}.jsonl"
    asr_prompts = {r["prompt"] for r in runs.read_jsonl(asr_rows)}
    lines += [
        "", f"![unit kinds per layer]({plot.name})", "",
        f"{len(safety_prompts & asr_prompts)} of the {len(asr_prompts)} ASR prompts are also prompts of the safety "
        "calibration set (Wei et al. 2024 calibrate on AdvBench refusals too).", "",
        "Files: `units.npz` / `units.json` (the unit map), `scores/` (unit scores and calibration details), "
        "`variants/<model>/` (each model's evaluate report and rows).", "",
    ]
    return "\n".join(lines)


def plot_kinds(umap, path: Path) -> Path:
    """Per-layer stacked bars of the kinds, for attention and MLP units."""
    plt = runs.pyplot()

    colours = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#c7c7c7", "RU": "#2ca02c"}
    per_layer = umap.per_layer()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, module, title in zip(axes, MODULES, ("attention (o_proj inputs)", "MLP (down_proj inputs)")):
        size = umap.masks["CU"][module].shape[1]
        layers = np.arange(umap.masks["CU"][module].shape[0])
        bottom = np.zeros(len(layers))
        for kind in ("SCU", "UCU", "RU", "CU"):
            share = np.asarray(per_layer[module][kind]) / size
            ax.bar(layers, share, bottom=bottom, color=colours[kind], label=kind, width=0.85)
            bottom += share
        ax.set_ylabel("share of units")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=4, loc="upper center", fontsize="small")
    axes[1].set_xlabel("layer")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
