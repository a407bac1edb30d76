"""REPORT.md of ``ssah-jax reproduce``: every table from the stages' files, the plots copied
beside it, the claims of SSAH with a verdict each (``claims.py`` decides them), the commands and
the wall times. It reads what the stages wrote, and the table of the sweep that chose the
alignment recipe (``config.align_sweep``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from experiments import prune, reproduce
from experiments._report import Section, asr_judged, save_figure, stage_times
from experiments._report import write as write_report
from experiments.reproduce import claims
from experiments.reproduce.subruns import attack_dir
from ssah_jax import runs
from ssah_jax.attribution import KINDS
from ssah_jax.evaluation.intervals import Rate, mean_interval, percent, percent_bars, shown
from ssah_jax.evaluation.tasks import headline, rate_of, shown_metric, value_of
from ssah_jax.evaluation.verdicts import markdown
from ssah_jax.runs import read_json

# Paper numbers (Li & Kim, SSAH), for the rows where the paper has them.
PAPER_TABLE1 = {  # Llama-2-7B-Chat: (ASR %, utility)
    "dense": ("10.0", "58.3"), "minus_SCU": ("66.0", "56.9"), "minus_UCU": ("–", "42.7"),
    "minus_RU": ("14.6", "55.5"), "minus_random": ("–", "–"),
}
PAPER_TABLE2 = {"initial": "0.19", "none": "11.92", "scu_cu6": "3.65", "scu_cu": "2.88"}  # Dolly, AdvBench ASR %
VARIANT_LABELS = {
    "none": "no protection", "scu_cu6": "freeze SCU + top 6% CU", "scu_cu": "freeze SCU + all CU",
    "random": "freeze as many random units (control)", "layers": "freeze a block of layers", "lora": "LoRA",
}


def _share(x: float) -> str:
    """A fraction of the model's units (``0.05%``, ``0.5%``, ``20%``): three significant digits,
    so a fraction below 0.1% is not printed as another."""
    return f"{100 * x:.3g}%"


TAX = (("overrefusal", "over-refusal"), ("mmlu", "MMLU"), ("sst2", "SST-2"), ("gsm8k", "GSM8K"))


def _tax(evals: dict, key: str, label: str) -> str:
    before, after = rate_of(evals["unaligned"], key), rate_of(evals["aligned"], key)
    if before is None or after is None:
        return f"{label} not measured"
    return f"{label} {shown(before)} -> {shown(after)} ({claims.alignment_tax(before, after)})"


def _copy(src: Path, dst_dir: Path, name: str) -> str:
    shutil.copyfile(src, dst_dir / name)
    return name




def write(config: ConfigDict, out: Path, report_dir: Path, invocations: list[dict[str, Any]]) -> Path:
    """Writes ``report_dir/REPORT.md`` and its plots from the stages' files in ``out``
    (:func:`ssah_jax.pipeline.run` has put ``config.json`` and ``numbers.json`` beside it);
    ``invocations``: the workdir's invocation log."""
    if config.maker_aligned:  # no unaligned model: the aligned model's evaluation, then the studies
        aligned = read_json(out / "eval_aligned" / "metrics.json")
        took = claims.refuses(rate_of(aligned, "asr_no_system"))
        sections = [_maker_aligned(config, aligned, took), _pruning(config, out, report_dir, took.held),
                    _attacks(config, out, report_dir), _times(out, invocations)]
    else:
        evals = {name: read_json(out / f"eval_{name}" / "metrics.json") for name in ("unaligned", "aligned", "ru")}
        took = _alignment_took(evals)
        sections = [_alignment(config, out, report_dir, evals, took), _pruning(config, out, report_dir, took.held),
                    _attacks(config, out, report_dir), _transfer(out, report_dir), _probing(out, report_dir),
                    _times(out, invocations)]
    return write_report(report_dir, _header(config, out, invocations[-1]), sections)


def _header(config: ConfigDict, out: Path, last: dict) -> list[str]:
    command = " ".join(["ssah-jax"] + last["argv"][1:])
    return ["# SSAH reproduced on `" + config.model + "`", "",
            "Everything below was produced by one command (re-running it resumes; finished stages are kept):", "",
            "```bash", command, "```", "",
            f"Resolved config: [`config.json`](config.json) (seed {config.seed}; evaluation and attribution in "
            f"{config.dtype}, training compute {config.finetune.compute_dtype} with float32 master weights). "
            f"Machine: {runs.describe_machine(last)}. "
            f"Workdir: `{out}` (every sub-run's config, metrics, rows and report).", "",
            "Claims of the paper (Li & Kim, *Superficial Safety Alignment Hypothesis*) and what happened here are in "
            "[the summary](#summary-which-claims-held); the numbers follow. Greedy decoding. "
            + asr_judged({"evaluation": config.evaluation, "table": config.table,
                          "attack.evaluation": config.attack.evaluation})
            + " Every rate is printed with its Wilson 95% interval "
            "(`ssah_jax.evaluation.intervals`), and every comparison (higher / lower / similar) is Newcombe's 95% "
            "interval of the difference: two rates differ only when it excludes 0, and a claim holds only then.", ""]


def _alignment_took(evals: dict) -> claims.Finding:
    """Whether alignment lowered the ASR without a system prompt (the claims about the aligned
    model's units are testable only then)."""
    return claims.alignment_took(*(rate_of(evals[m], "asr_no_system") for m in ("unaligned", "aligned")))


# Where the stages recorded how many prompts of each held-out harmful set were in the alignment data.
OVERLAP = (("evaluation", "eval_aligned"), ("table", "prune_aligned"), ("attack", "attacks/initial"))


def _overlap(out: Path) -> str:
    """The counts of the stages' ``overlap.json``; a workdir of an earlier version has none."""
    paths = {name: out / stage / "overlap.json" for name, stage in OVERLAP}
    found = [f"{name} {read_json(path)['in_training_data']}" for name, path in paths.items() if path.exists()]
    missing = [f"`{stage}/overlap.json`" for name, stage in OVERLAP if not paths[name].exists()]
    if not missing:
        return ", ".join(found)
    return ", ".join([*found, "not recorded: this workdir has no " + ", ".join(missing)
                      + " (its stages finished before reproduce wrote them; "
                      "`experiments.reproduce.training_overlap(config)` counts them)"])


def _alignment(config: ConfigDict, out: Path, report_dir: Path, evals: dict, took: claims.Finding) -> Section:
    """Section 1: the unaligned, aligned and RU-aligned models side by side (paper Table 4)."""
    lines: list[str] = []
    found: list[str] = []
    align = {name: read_json(out / f"align_{name}" / "metrics.json") for name in ("full", "ru")}
    overlap = _overlap(out)
    e, a = config.evaluation, config.align
    lines += ["## 1. Alignment: full SFT and RU only (paper Table 4, with safety)", "",
              f"The unaligned model was aligned by response-only SFT on `{a.dataset}` (harmful prompts with "
              f"refusals, rendered in the model's own chat template, benign instructions, and `contrast`: "
              f"`{config.contrast.prompts}` prompts that sound harmful but are not, answered by the unaligned model "
              f"itself in the contrast stage, `contrast/generations.jsonl`; {_recipe_source(config)}): "
              f"{a.steps} steps of {a.batch_size} examples (up to {a.max_length} tokens), AdamW "
              f"{a.learning_rate}, cosine. **RU only** trained only the {percent(config.budget_ru)} redundant units of "
              f"the unaligned model (its lowest I_S + I_U; embeddings, norms and head frozen) for {a.ru_epochs}x the "
              f"steps: "
              f"{align['ru']['trained_elements']:,} of {align['ru']['total_elements']:,} parameters trained, the "
              f"rest bit-identical after training: {'yes' if align['ru']['frozen_unchanged'] else 'NO'}.", "",
              f"Held-out harmful prompts: `{e.harmful.dataset}` without every prompt of `{e.harmful.exclude}`; "
              f"prompts of the evaluation sets found in the alignment data: {overlap}.", "",
              "| metric | n | unaligned | aligned (full) | aligned (RU only) |", "|---|---|---|---|---|"]
    rows = (("asr_no_system", "ASR, no system prompt"), ("asr_system", "ASR, safety system prompt"),
            ("overrefusal", "over-refusal, XSTest safe prompts"), ("mmlu", "MMLU"), ("sst2", "SST-2"),
            ("gsm8k", "GSM8K"), ("perplexity", "perplexity, held-out alpaca_libre"))
    for key, label in rows:
        if key not in evals["unaligned"]:
            continue
        cells = [shown_metric(evals[m], key) for m in ("unaligned", "aligned", "ru")]
        lines.append(f"| {label} | {headline(evals['unaligned'][key])[1]} | " + " | ".join(cells) + " |")
    heldout = {n: align[n]["heldout_loss"] for n in align}
    lines.append("| held-out alignment loss (start -> end) | | | "
                 + " | ".join(f"{_first(heldout[n]):.3f} -> {_last(heldout[n]):.3f}" for n in ("full", "ru")) + " |")
    lines += ["", "Paper (LLaMA-7B aligned on Alpaca, RU only vs full): GSM8K 13.4 vs 8.8, MMLU 33.7 vs 37.8.", "",
              f"![alignment loss, full]({_copy(out / 'align_full' / 'loss.png', report_dir, 'align_full_loss.png')}) "
              f"![alignment loss, RU only]({_copy(out / 'align_ru' / 'loss.png', report_dir, 'align_ru_loss.png')})",
              ""]
    asr = {m: rate_of(evals[m], "asr_no_system") for m in evals}
    lines += [targets(config, evals), ""]
    found.append(f"- **Alignment took** (precondition): ASR without a system prompt {shown(asr['unaligned'])} "
                 f"unaligned -> {shown(asr['aligned'])} aligned ({took.comparison}); the alignment tax, "
                 "unaligned -> aligned: " + ", ".join(_tax(evals, key, label) for key, label in TAX) + ".")
    over = value_of(evals["aligned"], "overrefusal")
    if claims.indiscriminate_refusal(took.held, over):
        found.append(
            f"- **Caveat**: the aligned model also refuses {shown(rate_of(evals['aligned'], 'overrefusal'))} of the "
            "safe XSTest prompts, so much of its "
            "lower ASR is indiscriminate refusal rather than discrimination of harmful requests; the claims below "
            "are about the units that carry this refusal behaviour.")
    budget = claims.alignment_budget(asr["ru"], asr["aligned"], took.held)
    sys_asr = {m: rate_of(evals[m], "asr_system") for m in evals}
    found.append(
        f"- **Alignment budget (RU only reaches full alignment's safety)**: ASR {shown(asr['ru'])} (RU only) vs "
        f"{shown(asr['aligned'])} (full), {budget.comparison}; " + markdown(budget)
        + ("" if sys_asr["ru"] is None or sys_asr["aligned"] is None else
           f"; with the safety system prompt {shown(sys_asr['ru'])} vs {shown(sys_asr['aligned'])} "
           f"({claims.compare(sys_asr['ru'], sys_asr['aligned'])}, not part of the verdict)")
        + f"; over-refusal {percent(value_of(evals['ru'], 'overrefusal'))} vs "
        f"{percent(value_of(evals['aligned'], 'overrefusal'))}, MMLU {percent(value_of(evals['ru'], 'mmlu'))} vs "
        f"{percent(value_of(evals['aligned'], 'mmlu'))}, GSM8K {percent(value_of(evals['ru'], 'gsm8k'))} vs "
        f"{percent(value_of(evals['aligned'], 'gsm8k'))}.")
    return lines, found


def _maker_aligned(config: ConfigDict, metrics: dict, took: claims.Finding) -> Section:
    """Section 1 of a model its makers aligned: its evaluation (no unaligned model to compare)."""
    e = config.evaluation
    lines = ["## 1. The model, aligned by its makers", "",
             f"`{config.model}` was aligned by its makers (their data is unknown), so no stage aligns it and no claim "
             "compares it with an unaligned model (alignment budget, attribute transfer and probing are not run). "
             f"Held-out harmful prompts: `{e.harmful.dataset}` without every prompt of `{e.harmful.exclude}`.", "",
             "| metric | n | value |", "|---|---|---|"]
    for key, label in (("asr_no_system", "ASR, no system prompt"), ("asr_system", "ASR, safety system prompt"),
                       ("overrefusal", "over-refusal, XSTest safe prompts"), ("mmlu", "MMLU"), ("sst2", "SST-2"),
                       ("gsm8k", "GSM8K"), ("perplexity", "perplexity, held-out alpaca_libre")):
        if key in metrics:
            lines.append(f"| {label} | {headline(metrics[key])[1]} | {shown_metric(metrics, key)} |")
    lines.append("")
    asr = rate_of(metrics, "asr_no_system")
    found = [f"- **The model refuses** (precondition): ASR without a system prompt {shown(asr)}, rule: its interval "
             f"below {percent(claims.REFUSAL_CEILING)}; " + markdown(took) + "."]
    return lines, found


def _path(path: str) -> str:
    """``path`` relative to the working directory when it is inside it (a report names checkout paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _recipe_source(config: ConfigDict) -> str:
    s = config.align_sweep
    if not s.csv:
        return "a recipe no sweep chose (`align_sweep`)"
    return f"the recipe of point `{s.point}` of the alignment sweep on validation prompts, `{_path(s.csv)}`"


SAFETY_TARGETS = (("asr_no_system", "asr", "ASR without a system prompt"),
                  ("overrefusal", "overrefusal", "XSTest over-refusal"))
METRIC_NAMES = {"asr": "ASR", "overrefusal": "over-refusal"}


def targets(config: ConfigDict, evals: dict) -> str:
    """The alignment targets (claims.TARGETS, claims.TARGET_UTILITY) on the held-out prompts:
    reached, or missed by how much, and for a missed safety target why (:func:`why_missed`)."""
    parts = []
    missed: dict[str, Rate] = {}
    for key, metric, label in SAFETY_TARGETS:
        rate, ceiling = rate_of(evals["aligned"], key), claims.TARGETS[metric]
        if rate is not None:
            parts.append(f"{label} at most {percent(ceiling)}: {shown(rate)}, " + claims.target(rate.value, ceiling))
            if claims.missed(rate.value, ceiling):
                missed[metric] = rate
    for key, label in TAX[1:]:
        before, after = rate_of(evals["unaligned"], key), rate_of(evals["aligned"], key)
        if before is not None and after is not None:
            parts.append(f"{label} within {100 * claims.TARGET_UTILITY:.0f} points of the unaligned model's: "
                         f"{percent(before.value)} -> {percent(after.value)}, "
                         + claims.target(before.value - after.value, claims.TARGET_UTILITY))
    text = "Targets of the aligned model (issue 20): " + "; ".join(parts) + "."
    return text + (" " + why_missed(config, missed) if missed else "")


def why_missed(config: ConfigDict, missed: dict[str, Rate]) -> str:
    """Why the aligned model missed the safety targets ``missed`` (metric -> its held-out rate),
    from the table of the sweep that chose its recipe on validation prompts
    (``config.align_sweep``, :func:`claims.recipe_tradeoff`)."""
    rows = reproduce.recipe_sweep(config)
    names = " and ".join(METRIC_NAMES[m] for m in missed)
    head = f"Why the {names} target{'s were' if len(missed) > 1 else ' was'} missed: "
    if rows is None:
        return head + "not known here (no sweep chose this recipe: `align_sweep`)."
    s = config.align_sweep
    found = {m: claims.recipe_tradeoff(rows, s.point, m) for m in missed}
    first = next(iter(found.values()))
    text = [head + f"the recipe is point `{s.point}` of the alignment sweep (`{_path(s.csv)}`), chosen on its "
            f"validation prompts (other prompts than these; the sweep's report names them), where it had ASR "
            f"{percent(first.chosen['asr'])} and over-refusal {percent(first.chosen['overrefusal'])}."]
    if first.both:
        among = "the chosen point among them" if s.point in first.both else "the chosen point not among them"
        text.append(f"{len(first.both)} of the sweep's {first.points} finished points reached both targets there "
                    f"({', '.join(first.both)}; {among}).")
    else:
        text.append(f"None of the sweep's {first.points} finished points reached both targets there.")
        for metric, tr in found.items():
            name, other, bound = METRIC_NAMES[metric], METRIC_NAMES[tr.other], percent(claims.TARGETS[tr.other])
            if tr.best is None:
                text.append(f"No point had {other} at most {bound}.")
                continue
            chosen = "" if s.point in tr.best_points else "; not the chosen point"
            line = (f"Of the points with {other} at most {bound}, the lowest {name} was {percent(tr.best)} "
                    f"({', '.join(tr.best_points)}{chosen})")
            if tr.better_other:
                low, high = (percent(v) for v in tr.better_other)
                line += (f"; the {tr.better_count} with less {name} had {other} "
                         + (low if low == high else f"{low}-{high}"))
            text.append(line + ".")
    held_out = {"asr": config.evaluation.harmful.dataset, "overrefusal": config.evaluation.overrefusal.dataset}
    for metric, rate in missed.items():
        text.append(f"On the held-out prompts here (`{held_out[metric]}`) its {METRIC_NAMES[metric]} is "
                    f"{shown(rate)}; on the sweep's validation prompts, {percent(found[metric].chosen[metric])}.")
    return " ".join(text)


def _pruning(config: ConfigDict, out: Path, report_dir: Path, took: bool) -> Section:
    """Section 2: the pruning table of the aligned model (paper Table 1)."""
    lines: list[str] = []
    found: list[str] = []
    table = read_json(out / "prune_aligned" / "metrics.json")
    umap_summary = read_json(out / "prune_aligned" / "units.json")
    t = config.table
    kinds_png = "kinds_per_layer.png"
    lines += ["## 2. Pruning the aligned model (paper Table 1)", "",
              f"Units scored with {config.attribution.scorer} on {config.attribution.safety.limit} "
              f"`{config.attribution.safety.dataset}` and {config.attribution.utility.limit} "
              f"`{config.attribution.utility.dataset}` samples; fractions SCU {_share(config.kinds.scu)}, UCU "
              f"{_share(config.kinds.ucu)}, RU {_share(config.kinds.ru)} (`kinds`; configs/reproduce.py says where "
              f"each preset's come from). ASR on "
              f"`{t.harmful.dataset}` (held out), {t.max_new_tokens} new tokens.", "",
              "| model | units pruned | MMLU | SST-2 | perplexity | ASR | paper ASR | paper utility |",
              "|---|---|---|---|---|---|---|---|"]
    total = umap_summary["units"]
    for name in prune.VARIANTS:
        m = table[name]
        cells = [shown(rate_of(m, "mmlu")), shown(rate_of(m, "sst2")), f"{value_of(m, 'perplexity'):.2f}",
                 shown(rate_of(m, "asr_no_system"))]
        lines.append(f"| {prune.LABELS[name]} | {m['pruned_units']} ({_share(m['pruned_units'] / total)}) | "
                     + " | ".join(cells) + f" | {PAPER_TABLE1[name][0]} | {PAPER_TABLE1[name][1]} |")
    lines += ["", f"n: ASR {table['dense']['asr_no_system']['n']}, MMLU {table['dense']['mmlu']['n']}, SST-2 "
              f"{table['dense']['sst2']['n']}, perplexity {table['dense']['perplexity']['n']} responses. Paper: "
              "Llama-2-7B-Chat, AdvBench keyword ASR and mean utility.", "",
              f"![unit kinds per layer]({_copy(out / 'prune_aligned' / 'kinds_per_layer.png', report_dir, kinds_png)})",
              ""]
    p_asr = {n: rate_of(table[n], "asr_no_system") for n in prune.VARIANTS}
    scu = claims.safety_units_carry_refusal(p_asr["dense"], p_asr["minus_SCU"], p_asr["minus_random"], took)
    found.append(
        f"- **SCU carry the refusal (pruning them breaks safety, Table 1)**: ASR {shown(p_asr['dense'])} dense "
        f"-> {shown(p_asr['minus_SCU'])} without SCU ({scu.comparison}), {shown(p_asr['minus_random'])} "
        f"without as many random units ({scu.control}); " + markdown(scu) + ".")
    ppl = {n: value_of(table[n], "perplexity") for n in prune.VARIANTS}
    found.append(
        f"- **RU are redundant (pruning them costs little)**: perplexity {ppl['dense']:.2f} dense, "
        f"{ppl['minus_RU']:.2f} without RU, {ppl['minus_UCU']:.2f} without UCU; ASR without RU "
        f"{shown(p_asr['minus_RU'])}; " + markdown(claims.redundant_units_are_cheap(
            ppl["dense"], ppl["minus_RU"], table["minus_RU"]["pruned_units"]))
        + f" (rule: perplexity within {claims.PERPLEXITY_RATIO - 1:.0%} of dense).")
    return lines, found


def _attacks(config: ConfigDict, out: Path, report_dir: Path) -> Section:
    """Section 3: the fine-tuning attacks with each protection (paper Tables 2, 3), every run
    once per seed of ``attack.seeds``; the verdicts read the seeds' answers pooled."""
    lines: list[str] = []
    found: list[str] = []
    ac = config.attack
    attacks, seeds = list(ac.datasets), list(ac.seeds)
    initial_m = read_json(out / "attacks" / "initial" / "metrics.json")["asr_no_system"]
    initial = Rate(initial_m["asr"], initial_m["n"])
    results = {a_: {v: [_attack_result(out / attack_dir(a_, v, k)) for k in seeds] for v in ac.variants}
               for a_ in attacks}
    pooled = {a_: {v: Rate.pooled(Rate(r["asr"], r["n"]) for r in per) for v, per in by.items()}
              for a_, by in results.items()}
    lines += ["## 3. Fine-tuning attacks on the aligned model (paper Tables 2, 3)", "",
              f"Each attack fine-tunes the aligned model ({ac.batch_size} examples per step, "
              f"AdamW {ac.learning_rate}; LoRA rank {ac.lora.rank} on {', '.join(ac.lora.targets)} at "
              f"{ac.lora.learning_rate}); frozen variants train {ac.frozen_epochs}x the steps, as in the paper. "
              f"Every run is repeated with seeds {', '.join(map(str, seeds))} (data order, random units, LoRA "
              f"initialisation). {_selection(config, out)} ASR on `{ac.evaluation.harmful.dataset}` without every "
              f"prompt of `{ac.evaluation.harmful.exclude}` (held out from the alignment and from every attack), "
              f"{ac.evaluation.max_new_tokens} new tokens, no system prompt, n = {initial.n} per run; each cell: "
              f"the seeds' answers pooled, with its interval, then each seed's ASR.", "",
              "| protection | " + " | ".join(f"{a_} ({ac.datasets[a_].steps} steps, {ac.datasets[a_].max_length} "
                                             "tokens)" for a_ in attacks)
              + " | paper (Dolly) |", "|---|" + "---|" * (len(attacks) + 1),
              "| initial (aligned) | " + " | ".join(shown(initial) for _ in attacks)
              + f" | {PAPER_TABLE2['initial']}% |"]
    for v in ac.variants:
        paper = PAPER_TABLE2.get(v)
        lines.append(f"| {VARIANT_LABELS[v]} | " + " | ".join(
            f"{shown(pooled[a_][v])} ({', '.join(percent(r['asr']) for r in results[a_][v])})" for a_ in attacks)
            + f" | {paper + '%' if paper else '–'} |")
    first = {v: results[attacks[0]][v][0] for v in ac.variants}  # each protection's first run

    def trainable(variant: str) -> str:
        return _share(first[variant]["trained_elements"] / first[variant]["total_elements"])

    every = [r for by in results.values() for per in by.values() for r in per]
    frozen_ok = all(r["frozen_unchanged"] for r in every)
    step = [r["step_seconds"] for r in every if r["step_seconds"] is not None]
    asr_minutes = [r["asr_seconds"] / 60 for r in every]
    lines += ["", "Frozen parameters bit-identical after every attack run (checksum of their bits before and "
              f"after): {'yes' if frozen_ok else '**NO**'}. Trained parameters per run and the final training loss "
              "are in each run's `metrics.json`; the paper's column is Llama-2-7B-Chat fine-tuned on Dolly "
              "(AdvBench ASR).", "",
              "Parameters each protection trained (the first run's `metrics.json`): " + ", ".join(
                  f"{VARIANT_LABELS[v]} {first[v]['trained_elements']:,} "
                  + ("adapter parameters" if v == "lora" else f"of {first[v]['total_elements']:,} ({trainable(v)})")
                  for v in ac.variants) + ".", "",
              "Time per run (each run's `metrics.json` and `eval/metrics.json`, its last invocation): training "
              + (f"{spread(step, 's per step')}; the first step of an invocation includes compiling"
                 if step else "no step (every run resumed finished)")
              + f", ASR {spread(asr_minutes, 'min')}.", "",
              f"![attack ASR]({plot_attacks(pooled, initial, report_dir / 'attacks.png').name})", ""]
    for name, variant in (("SCU + top 6% CU", "scu_cu6"), ("SCU + all CU", "scu_cu")):
        if variant not in ac.variants or "none" not in ac.variants:
            continue
        rates = {a_: claims.AttackRates(pooled[a_]["none"], pooled[a_][variant], pooled[a_].get("random"))
                 for a_ in attacks}
        freezing = claims.freezing_protects(initial, rates)
        found.append(
            f"- **Freezing {name} protects during fine-tuning (Tables 2, 3)**: of the {len(freezing.testable)} attacks "
            f"that raised ASR without protection, ASR is lower with the freeze in {len(freezing.protected)} ("
            + "; ".join(
                f"{o.attack}: {shown(pooled[o.attack][variant])} vs {shown(pooled[o.attack]['none'])} "
                f"unprotected, {o.vs_unprotected}; vs the random control {o.vs_control or 'n/a'}"
                + ("" if o.raised else " (the attack did not raise ASR)") for o in freezing.outcomes)
            + f"; {len(seeds)} seeds pooled; the freeze leaves {trainable(variant)} of the parameters trainable"
            + (f", the control (as many units as SCU + top 6% CU) {trainable('random')}" if "random" in ac.variants
               else "") + "); " + markdown(freezing) + ".")
    return lines, found


def _selection(config: ConfigDict, out: Path) -> str:
    """What the freezing variants freeze: the selection, and the layer block when one was found."""
    ac = config.attack
    text = f"`{ac.selection}` is the freeze of `scu_cu6`; the random control freezes as many units."
    if "layers" not in ac.variants:
        return text
    layers = read_json(out / "layers" / "layers.json")
    block = next(b for b in layers["blocks"] if b["layers"] == layers["chosen"])
    return (f"`{ac.selection}` is {layers['selection_units']} units; the random control freezes as many; the "
            f"layer block ({layers['size']} layers, as many units) is the one whose removal lowered the refusal "
            f"rate most on {layers['prompts']} held-in harmful prompts among the blocks whose removal kept the "
            f"perplexity of {layers['perplexity_samples']} held-out benign responses within "
            f"{layers['max_perplexity_ratio']}x of the dense model's: layers {layers['chosen']} (refusal "
            f"{percent(block['refusal_rate'])} and perplexity {block['perplexity']:.2f} without them, "
            f"{percent(layers['dense_refusal_rate'])} and {layers['dense_perplexity']:.2f} dense; every block in "
            "`layers/layers.json`).")


def _transfer(out: Path, report_dir: Path) -> Section:
    """Section 4: kind transitions through alignment and through one attack (paper Figs 5, 6)."""
    transfer = read_json(out / "transfer" / "transfer.json")
    lines = ["## 4. Attribute transfer (paper Figs 5, 6)", "",
             "Every model's units classified with the same fractions; rows: kind before, columns: kind after; "
             "each cell the share of the row's units (count in brackets).", ""]
    for key, title in (("alignment", "unaligned -> aligned (full)"),
                       ("fine_tuning", f"aligned -> after the unprotected {transfer['attack']} attack")):
        m = np.asarray(transfer[key])
        lines += [f"**{title}**", "", "| before \\ after | " + " | ".join(KINDS) + " |",
                  "|---|" + "---|" * len(KINDS)]
        for i, k in enumerate(KINDS):
            row = m[i] / max(m[i].sum(), 1)
            lines.append(f"| {k} | " + " | ".join(f"{row[j]:.2f} ({m[i, j]})" for j in range(len(KINDS))) + " |")
        lines.append("")
    lines += [f"![kind transitions]({_copy(out / 'transfer' / 'transfer.png', report_dir, 'transfer.png')})", ""]
    scu = KINDS.index("SCU")
    aligned, attacked = (claims.kind_transfer(transfer[key], scu) for key in ("alignment", "fine_tuning"))
    claim = (f"- **Attribute transfer** (reported, no verdict): {aligned.kept} of {aligned.of} SCU of the unaligned "
             f"model are SCU after alignment; {attacked.kept} of {attacked.of} SCU of the aligned model stay SCU "
             f"after the {transfer['attack']} attack; units keeping their kind: {aligned.kept_share:.0%} (alignment), "
             f"{attacked.kept_share:.0%} (fine-tuning).")
    return lines, [claim]


def _probing(out: Path, report_dir: Path) -> Section:
    """Section 5: cosine distances toward refusals and compliances (paper Figs 2-4)."""
    probing = read_json(out / "probing" / "probing.json")
    k_max, phrasings = probing["max_tokens"], probing["continuations"]
    lines = ["## 5. Reasoning-direction probing (paper Figs 2-4)", "",
             f"{probing['prompts']} held-out harmful queries. Cosine distance between each layer's output at the end "
             f"of the query (after the assistant header) and after each of the first k tokens of a continuation, "
             f"averaged over those k positions (so no single token decides it) and over "
             f"{len(phrasings['refusal'])} refusal and {len(phrasings['compliance'])} compliance phrasings "
             "(`probing/probing.json` lists them); mean over queries and layers. Smaller = the query state already "
             "points that way.", "",
             "| model | continuation | " + " | ".join(f"k={k}" for k in range(1, k_max + 1))
             + " | layers with d(refusal) < d(compliance), k=" + str(k_max) + " |",
             "|---|---|" + "---|" * (k_max + 1)]
    direction = {name: claims.reasoning_direction(r["refusal"], r["compliance"])
                 for name, r in probing["models"].items()}
    for name, r in probing["models"].items():
        for c in ("refusal", "compliance"):
            mean = np.asarray(r[c]).mean(axis=0)
            count = f"{direction[name].closer}/{direction[name].layers}" if c == "refusal" else ""
            lines.append(f"| {name} | {c} | " + " | ".join(f"{x:.3f}" for x in mean) + f" | {count} |")
    lines += ["", f"![probing]({_copy(out / 'probing' / 'probing.png', report_dir, 'probing.png')})", ""]
    aligned, unaligned = (np.asarray(probing["models"][m]["gaps"]) for m in ("aligned", "unaligned"))
    confidence = probing["confidence"]
    gap, gain = (claims.Mean(*mean_interval(x, confidence)) for x in (aligned, aligned - unaligned))
    claim = (f"- **Aligned models steer toward refusal (probing)**: at {k_max} tokens the aligned model's query "
             f"state is closer to the refusals than to the compliances by {gap} (mean per-query gap d(compliance) - "
             f"d(refusal) over layers, {confidence:.0%} t-interval), more than the unaligned model's by {gain} "
             f"(paired per query); layers closer to the refusal: {direction['aligned'].closer}/"
             f"{direction['aligned'].layers} aligned, {direction['unaligned'].closer}/{direction['unaligned'].layers} "
             "unaligned; rule (configs/reproduce.py, fixed before the run): both intervals above 0; "
             + markdown(claims.steers_toward_refusal(gap, gain)) + ".")
    return lines, [claim]


def _times(out: Path, invocations: list[dict]) -> Section:
    """The wall time of every stage, summed over the invocations that worked on it."""
    records = [(stage, read_json(path)) for stage, path in stage_records(out)]
    return stage_times(out, "Wall time of each stage on the machine named above, summed over the invocations that "
                       "worked on it (a stage resumed after a kill counts every invocation, to within 10 s per kill).",
                       records, invocations)


def spread(values: list[float], unit: str) -> str:
    """``"2.8-5.8 s per step (mean 4.4)"``, or ``"0.6 min each"`` where they all print alike."""
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return f"{low} {unit} each" if low == high else f"{low}-{high} {unit} (mean {np.mean(values):.1f})"


def _first(d: dict) -> float:
    return d[min(d, key=int)]


def _last(d: dict) -> float:
    return d[max(d, key=int)]


def _attack_result(directory: Path) -> dict:
    train = read_json(directory / "metrics.json")
    asr = read_json(directory / "eval" / "metrics.json")["asr_no_system"]
    steps = train["train"]["steps_run"]
    return {"asr": asr["asr"], "n": asr["n"], "frozen_unchanged": train["frozen_unchanged"],
            "trained_elements": train["trained_elements"], "total_elements": train["total_elements"],
            "loss": train["train"]["last"].get("loss"),
            "step_seconds": train["train"]["seconds"] / steps if steps else None, "asr_seconds": asr["seconds"]}


def stage_records(out: Path) -> list[tuple[str, Path]]:
    found = []
    for stage in reproduce.STAGES:
        if (out / stage / "stage.json").exists():
            found.append((stage, out / stage / "stage.json"))
        if stage == "attacks":
            found += [(str(p.parent.relative_to(out)), p)
                      for p in sorted((out / "attacks").glob("*/*/seed*/stage.json"))]
            if (out / "attacks" / "initial" / "stage.json").exists():
                found.append(("attacks/initial", out / "attacks" / "initial" / "stage.json"))
    return found


def plot_attacks(pooled: dict[str, dict[str, Rate]], initial: Rate, path: Path) -> Path:
    """Bars: each attack's ASR per protection (seeds pooled), with Wilson 95% intervals."""
    plt = runs.pyplot()
    attacks = list(pooled)
    variants = list(next(iter(pooled.values())))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(attacks)), 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        values, errors = percent_bars(pooled[a][v] for a in attacks)
        ax.bar(np.arange(len(attacks)) + i * width, values, width, label=VARIANT_LABELS[v], yerr=errors, capsize=2)
    ax.axhline(100 * initial.value, color="black", ls="--", lw=1, label="aligned, before the attack")
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
    ax.set_ylabel("ASR (%), 95% interval")
    # below the axes: inside, it covered bars whatever corner it took
    ax.legend(fontsize="x-small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
