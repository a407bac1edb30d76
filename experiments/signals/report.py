"""The report of ``ssah-jax signals``: reads the stages' files, calls the claims, renders
``REPORT.md`` and its plots (and writes ``config.json`` and ``numbers.json`` beside them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from experiments._report import Section, asr_judged, save_figure, stage_times
from experiments._report import write as write_report
from experiments.signals import MODELS, attack_dir, claims
from ssah_jax import runs
from ssah_jax.evaluation.intervals import Rate, percent, shown
from ssah_jax.evaluation.tasks import rate_of, shown_metric, value_of
from ssah_jax.evaluation.verdicts import markdown
from ssah_jax.runs import read_json

# Li & Kim (ICML 2025), from SIGNALS.md: Llama-2-7B-Chat / with safety data augmentation / -CLS, ASR %
PAPER_VS_AUGMENTATION = {"prefill_5": (42.1, 2.8, 0.9), "prefill_40": (57.0, 4.5, 2.1),
                         "sweep": (84.3, 1.0, 0.0)}
PAPER_CHAT_VS_CLS = {"prefilling, AdvBench": (39.62, 0.4), "prefilling, HEx-PHI": (60.91, 1.2),
                     "decoding attack, AdvBench": (87.0, 0.0), "decoding attack, MaliciousInstruct": (83.0, 0.0),
                     "direct, AdvBench": (0.19, 0.19)}


def attacked_rates(config: ConfigDict, out: Path) -> dict[str, dict[str, dict[int, Rate]]]:
    """ASR (no system prompt) after each fine-tuning attack run: model -> attack -> seed -> rate."""
    def rate(run: str) -> Rate:
        m = read_json(out / run / "eval" / "metrics.json")["asr_no_system"]
        return Rate(m["asr"], m["n"])

    return {m: {a: {s: rate(attack_dir(m, a, s)) for s in config.attack.seeds}
                for a in config.attack.datasets} for m in MODELS}


def write(config: ConfigDict, out: Path, report_dir: Path, invocations: list[dict[str, Any]]) -> Path:
    """Writes ``report_dir/REPORT.md`` and its plots from the stages' files in ``out``
    (:func:`ssah_jax.pipeline.run` has put ``config.json`` and ``numbers.json`` beside it);
    ``invocations``: the workdir's invocation log."""
    schedules = list(config.decoding.schedules)
    evals = {"sft": read_json(out / "eval_sft" / "metrics.json"),
             "augmented": read_json(out / "eval_augmented" / "metrics.json")}
    evals.update({f"signal/{s}": read_json(out / "eval_signal" / s / "metrics.json") for s in schedules})
    columns = list(evals)
    sections = [_attacks(config, out, report_dir, evals, columns), _costs(config, evals, columns),
                _classifier(out), _signal_along_answers(config, out, report_dir), _training(config, out), _paper(evals),
                _times(out, invocations)]
    return write_report(report_dir, _header(config, out, invocations[-1]), sections)


def _header(config: ConfigDict, out: Path, last: dict) -> list[str]:
    # the command without a stage selection: re-running it computes every stage
    command = " ".join(["ssah-jax"] + [a for a in last["argv"][1:] if not a.startswith("--config.stages")])
    d = config.decoding
    return [
        f"# Explicit safety signals on `{config.model}`", "",
        "Everything below was produced by one command (re-running it resumes; finished stages are kept):", "",
        "```bash", command, "```", "",
        f"Resolved config: [`config.json`](config.json) (seed {config.seed}; evaluation in {config.dtype}, training "
        f"compute {config.finetune.compute_dtype} with float32 master weights). Machine: "
        f"{runs.describe_machine(last)}. Workdir: `{out}` (every sub-run's config, metrics, rows and report).", "",
        "Three models aligned from the same unaligned model on the same data and steps "
        f"(`{config.align.dataset}`, {config.align.steps} steps of {config.align.batch_size}): **sft** (plain SFT), "
        f"**augmented** (plus {config.augment.count} deep-alignment examples of Qi et al. 2024 from "
        f"`{config.augment.dataset}`), **signal** (plus the `[CLS]` safety signal, {config.signal.head} head, "
        f"lambda {config.signal.lam}, its updates scaled {config.signal.lr_scale}x"
        f"{', the head started from a linear probe' if config.signal.probe else ''}; Li & Kim, *Safety Alignment "
        "Can Be Not Superficial With Explicit Safety Signals*, ICML 2025). The signal model decodes "
        f"strategically (threshold {d.threshold}, r1/r2/r3 "
        f"{d.r1}/{d.r2}/{d.r3}, tau {d.tau}, period {d.period}) under each schedule: `signal/<schedule>`. "
        + asr_judged({"evaluation": config.evaluation, "attack.evaluation": config.attack.evaluation})
        + " Every rate is printed with its "
        "Wilson 95% interval, and a comparison (higher / lower / similar) is Newcombe's 95% interval of the "
        "difference (`ssah_jax.evaluation.intervals`): two rates differ only when it excludes 0.", ""]


def _prefill_rates(metrics: dict, ks: list[int]) -> dict[int, Rate]:
    return {k: rate_of(metrics, f"prefill_{k}") for k in ks}


def _attacks(config: ConfigDict, out: Path, report_dir: Path, evals: dict, columns: list[str]) -> Section:
    e = config.evaluation
    ks = list(e.prefill.tokens)
    attacked = attacked_rates(config, out)
    pooled = {m: {a: Rate.pooled(by_seed.values()) for a, by_seed in by.items()} for m, by in attacked.items()}
    ac = config.attack
    rows = [("direct, no system prompt", "asr_no_system"), ("direct, safety system prompt", "asr_system")]
    rows += [(f"prefilling, {k} tokens", f"prefill_{k}") for k in ks]
    settings = len(e.sweep.temperatures) * len(e.sweep.top_ps) * len(e.sweep.top_ks)
    rows += [(f"decoding sweep ({e.sweep.dataset}, any of {settings} settings)", "sweep")]
    lines = ["## Attacks (ASR, lower is better)", "",
             f"Direct: `{e.harmful.dataset}` without the trained prompts; prefilling: the first k tokens of "
             f"`{e.prefill.dataset}`'s target forced, {e.prefill.limit or 'all'} held-out prompts; decoding sweep: "
             "Huang et al. 2023's sampling grid; fine-tuning: reproduce's attacks ("
             + ", ".join(f"{a}: {ac.datasets[a].steps} steps on `{ac.datasets[a].dataset}`" for a in ac.datasets)
             + f"; lr {ac.learning_rate}, seeds {', '.join(map(str, ac.seeds))}, the seeds' answers pooled), then "
             f"direct ASR on `{ac.evaluation.harmful.dataset}` without every prompt of "
             f"`{ac.evaluation.harmful.exclude}` (the signal model attacked in its weights, deployed with its "
             f"trained signal, first schedule). {config.evaluation.max_new_tokens} new tokens.", "",
             "| attack | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(shown(rate_of(evals[c], key)) for c in columns) + " |")
    first = f"signal/{config.decoding.schedules[0]}"
    for a in ac.datasets:
        lines.append(f"| fine-tuning on {a} | " + " | ".join(
            shown(pooled[c.split("/")[0]][a]) if c in ("sft", "augmented", first) else "" for c in columns) + " |")
    lines += ["", f"![ASR against prefill length]({plot_prefill(evals, ks, report_dir / 'prefill.png').name})", ""]

    sft, aug = _prefill_rates(evals["sft"], ks), _prefill_rates(evals["augmented"], ks)
    summary = []
    for c in columns[2:]:
        sig = _prefill_rates(evals[c], ks)
        found = claims.prefilling_defended(sig, sft)
        share = ", ".join(f"k={k}: {shown(sig[k])} vs {shown(sft[k])}" for k in ks)
        summary.append(f"- **Prefilling stops working** (`{c}`; at every k the ASR's interval at most "
                       f"{percent(claims.ASR_CEILING)}, lower than SFT's and at most {claims.SHARE_OF_SFT:g} x it): "
                       f"{share}; {markdown(found)}.")
    c = first
    sig = _prefill_rates(evals[c], ks)
    vs = claims.versus_augmentation(sig, aug)
    summary.append(f"- **At least as good as safety data augmentation** (`{c}` vs augmented, prefilling): "
                   + ", ".join(f"k={k}: {shown(sig[k])} vs {shown(aug[k])}" for k in ks)
                   + f"; {vs.comparison}; {markdown(vs)}.")
    if "sweep" in evals[c]:
        dec = claims.decoding_attack_defended(rate_of(evals[c], "sweep"), rate_of(evals["sft"], "sweep"))
        sweep = {m: shown(rate_of(evals[m], "sweep")) for m in (c, "sft", "augmented")}
        summary.append(f"- **The decoding attack stops working** (`{c}`): ASR {sweep[c]} vs {sweep['sft']} (sft), "
                       f"{sweep['augmented']} (augmented); {markdown(dec)}.")
    for a in ac.datasets:
        summary.append(f"- Fine-tuning on {a} (not published by the paper; reported, {len(ac.seeds)} seeds pooled): "
                       "ASR " + ", ".join(f"{m} {shown(pooled[m][a])}" for m in MODELS) + ".")
    return lines, summary


def _costs(config: ConfigDict, evals: dict, columns: list[str]) -> Section:
    lines = ["## Costs", "",
             "Over-refusal: XSTest safe prompts refused; GSM8K: exact match "
             f"({config.evaluation.gsm8k.max_new_tokens} new tokens), both through the signal's decoding. MMLU, "
             "SST-2: zero-shot log-likelihood of single-token choices, read at the prompt's last token, which does "
             "not attend to `[CLS]`: the signal model's scores are exactly its language model's (one column for "
             "every schedule). Perplexity of held-out benign responses: of the language model *without* `[CLS]`; "
             "the deployed model's answer tokens attend to it, so for the signal model this is an approximation.",
             "",
             "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    first = f"signal/{config.decoding.schedules[0]}"

    def value(c: str, key: str) -> str:
        # the likelihood tasks run under the first schedule only
        return shown_metric(evals[first] if c.startswith("signal/") and key not in evals[c] else evals[c], key)

    for label, key in (("over-refusal", "overrefusal"), ("MMLU", "mmlu"), ("SST-2", "sst2"), ("GSM8K", "gsm8k"),
                       ("perplexity", "perplexity")):
        lines.append(f"| {label} | " + " | ".join(value(c, key) for c in columns) + " |")
    lines.append("")
    summary = []
    over = claims.no_extra_overrefusal(rate_of(evals[first], "overrefusal"), rate_of(evals["sft"], "overrefusal"))
    summary.append(f"- **No extra over-refusal** (`{first}` vs sft): {value(first, 'overrefusal')} vs "
                   f"{value('sft', 'overrefusal')}, {over.comparison}; {markdown(over)}.")
    keys = ("mmlu", "sst2", "gsm8k")
    util = claims.utility_kept({k: evals[first][k]["accuracy"] for k in keys},
                               {k: evals["sft"][k]["accuracy"] for k in keys})
    summary.append(f"- **Utility kept** (`{first}` vs sft, each accuracy at most {100 * claims.UTILITY_POINTS:g} "
                   "points lower): " + ", ".join(f"{k} {value(first, k)} vs {value('sft', k)} (n = "
                                                 f"{evals['sft'][k]['n']})" for k in keys)
                   + f"; {markdown(util)}.")
    return lines, summary


def _classifier(out: Path) -> Section:
    result = read_json(out / "classifier" / "classifier.json")
    lines = ["## The classifier", "",
             f"p(malicious) of `[CLS]` on the prompt alone (`ssah_jax.signals.classify`), threshold "
             f"{result['threshold']}; every score in `classifier/scores.jsonl`.", "",
             "| prompts | AUROC | accuracy | flagged (positive) | flagged (negative) | n |", "|---" * 6 + "|"]
    names = {"harmful_vs_benign": "held-out harmful vs benign", "xstest_unsafe_vs_safe": "XSTest unsafe vs safe"}
    names.update({n: f"{n.removesuffix('_vs_benign')} alone vs benign" for n in result["sets"] if n not in names})
    for name, r in result["sets"].items():
        lines.append(f"| {names.get(name, name)} | {r['auroc']:.3f} | {percent(r['accuracy'])} | "
                     f"{percent(r['true_positive_rate'])} | {percent(r['false_positive_rate'])} | "
                     f"{r['n_positive']} + {r['n_negative']} |")
    lines.append("")
    summary = ["- Classifier (reported): " + ", ".join(
        f"{names.get(n, n)} AUROC {r['auroc']:.3f}, accuracy {percent(r['accuracy'])}"
        for n, r in result["sets"].items() if n in ("harmful_vs_benign", "xstest_unsafe_vs_safe"))
        + "."]
    return lines, summary


def _signal_along_answers(config: ConfigDict, out: Path, report_dir: Path) -> Section:
    """p(malicious) at each check of a few prefilled harmful answers, and how often each
    schedule inserted the refusal."""
    ks = list(config.evaluation.prefill.tokens)
    k = ks[len(ks) // 2]
    rows = runs.read_jsonl(out / "eval_signal" / config.decoding.schedules[0] / "rows" / f"prefill_{k}.jsonl")
    plot = plot_checks(rows[:6], k, config.decoding.threshold, report_dir / "checks.png")
    groups = {"direct": "asr_", "prefilled": "prefill_", "sweep": "sweep_", "XSTest safe": "overrefusal",
              "GSM8K": "gsm8k"}
    lines = ["## The signal along the answer", "",
             f"p(malicious) at each check of the first six prefilled harmful prompts ({k} target tokens, schedule "
             f"`{config.decoding.schedules[0]}`); a cross marks the inserted refusal.", "", f"![checks]({plot.name})",
             "", "Per schedule: checks per answer (all answers), and the share of answers into which the refusal "
             "was inserted, per prompt set (harmful: direct, prefilled, sweep; benign: XSTest safe, GSM8K).", "",
             "| schedule | checks per answer | " + " | ".join(groups) + " |", "|---" * (len(groups) + 2) + "|"]
    summary, after = [], []
    for schedule in config.decoding.schedules:
        rows_of = {name: [r for path in sorted((out / "eval_signal" / schedule / "rows").glob(f"{prefix}*.jsonl"))
                          for r in runs.read_jsonl(path) if "checks" in r] for name, prefix in groups.items()}
        every = [r for rows_ in rows_of.values() for r in rows_]
        if not every:
            continue
        share = {name: np.mean([r["inserted"] is not None for r in rs]) if rs else None for name, rs in rows_of.items()}
        lines.append(f"| {schedule} | {np.mean([len(r['checks']) for r in every]):.1f} | "
                     + " | ".join(percent(v) for v in share.values()) + " |")
        if schedule != config.decoding.schedules[0]:
            continue
        benign = [r for name in ("XSTest safe", "GSM8K") for r in rows_of[name]]
        inserted = float(np.mean([r["inserted"] is not None for r in benign])) if benign else 0.0
        flagged = {name: flagged_checks(rows_of[name], config.decoding.threshold) for name in ("XSTest safe", "GSM8K")}
        where = (f"on benign answers under `{schedule}` the first check, which sees the prompt as in training, flags "
                 + ", ".join(f"{percent(first)} ({name})" for name, (first, _) in flagged.items())
                 + "; in answers whose first check was benign, the later checks up to an insertion, which see "
                 "only the latest answer tokens, flag "
                 + ", ".join(f"{percent(later)} ({name})" for name, (_, later) in flagged.items()))
        after.append(f"{where[0].upper()}{where[1:]}.")
        if claims.indiscriminate_insertion(inserted):
            auroc = read_json(out / "classifier" / "classifier.json")["sets"]["harmful_vs_benign"]["auroc"]
            summary.append(
                f"- **Caveat**: under `{schedule}` the signal inserts its refusal into {percent(inserted)} of benign "
                f"answers (XSTest safe {percent(share['XSTest safe'])}, GSM8K {percent(share['GSM8K'])}), so the "
                "signal model's low ASR is largely refusing everything, not detecting harm; the verdicts above are "
                "about ASR alone. The classifier's AUROC on held-out harmful vs benign prompts is "
                f"{auroc:.3f}; {where} (the alignment phase trains [CLS] on prompts only; the paper's optional "
                "pre-training phase on labelled text, not run here, is what shows it other text).")
    lines += ["", *after, "", *worst_insertions(out, config.decoding.schedules[0]),
              "Speed per schedule: `scripts/benchmark.py signals` (README).", ""]
    return lines, summary


def worst_insertions(out: Path, schedule: str, count: int = 5) -> list[str]:
    """The benign prompts (XSTest safe, GSM8K) into whose answers the signal inserted its refusal
    under ``schedule``, the most confident first check first: what its false alarms look like."""
    rows = [(name, r) for name, task in (("XSTest safe", "overrefusal"), ("GSM8K", "gsm8k"))
            for path in [out / "eval_signal" / schedule / "rows" / f"{task}.jsonl"] if path.exists()
            for r in runs.read_jsonl(path) if r.get("inserted") is not None and r.get("checks")]
    if not rows:
        return []
    rows.sort(key=lambda x: -x[1]["checks"][0][1])
    lines = [f"The worst false insertions under `{schedule}` ({count} of {len(rows)} benign answers with the refusal "
             "inserted; first-check p highest first):", "", "| set | prompt | first check p | inserted at step |",
             "|---|---|---|---|"]
    for name, r in rows[:count]:
        prompt = " ".join(r["prompt"].split())
        prompt = prompt if len(prompt) <= 90 else prompt[:87] + "..."
        lines.append(f"| {name} | {prompt.replace('|', '/')} | {r['checks'][0][1]:.2f} | {r['inserted']} |")
    return lines + [""]


def flagged_checks(rows: list[dict], threshold: float) -> tuple[float | None, float | None]:
    """The share of first checks over ``rows`` whose p is above ``threshold``, and the share of
    later checks doing so in answers whose first check was benign, up to the one that inserted
    the refusal (checks that see the latest answer tokens only, rule 2, none of the refusal);
    None where there are none."""
    first = [r["checks"][0][1] for r in rows if r["checks"]]
    later = [p for r in rows if r["checks"] and r["checks"][0][1] <= threshold
             for t, p in r["checks"][1:] if r["inserted"] is None or t <= r["inserted"]]
    share = lambda ps: float(np.mean(np.asarray(ps) > threshold)) if ps else None  # noqa: E731
    return share(first), share(later)


def _training(config: ConfigDict, out: Path) -> Section:
    lines = ["## Training", "", "Examples per epoch (the signal model's malicious ones drawn again up to the benign "
             "count); wall time from the stage record.", "",
             "| model | examples | final held-out loss | minutes |", "|---|---|---|---|"]
    tail = [r for r in runs.read_jsonl(out / "align_signal" / "metrics.jsonl") if r["kind"] == "train"][-5:]
    for m in MODELS:
        r = read_json(out / f"align_{m}" / "metrics.json")
        record = read_json(out / f"align_{m}" / "stage.json")
        minutes = f"{record['seconds'] / 60:.1f}" + (f" (copied from `{record['copied_from']}`)"
                                                     if record.get("copied_from") else "")
        loss = r["heldout_loss"][max(r["heldout_loss"], key=int)] if r["heldout_loss"] else None
        examples = f"{r['examples']['train']}" + (f" ({r['augmented_examples']} augmented)"
                                                    if r.get("augmented_examples") else "")
        lines.append(f"| {m} | {examples} | {'—' if loss is None else f'{loss:.4f}'} | {minutes} |")
    bce, accuracy = np.mean([r["cls"] for r in tail]), np.mean([r["cls_accuracy"] for r in tail])
    lines += ["", f"The signal's classifier at the end of training (the last {len(tail)} logged steps): BCE {bce:.3f} "
              f"(chance: 0.693), training-batch accuracy {percent(accuracy)}; the `[CLS]` embedding and the head "
              f"trained at {config.signal.lr_scale}x the model's learning rate.", ""]
    summary = [f"- The classifier's training (reported): final BCE {bce:.3f} (chance 0.693), batch accuracy "
               f"{percent(accuracy)}."]
    signal = read_json(out / "align_signal" / "metrics.json")
    if signal.get("probe"):
        p = signal["probe"]
        held = signal["heldout_classifier"][max(signal["heldout_classifier"], key=int)]
        lines += [f"The head started from a linear probe (LP-FT, Kumar et al. 2022; `ssah_jax.signals.fit_probe`): "
                  f"logistic regression on the unaligned model's `[CLS]` states of the {p['n_train']} training "
                  f"prompts, "
                  f"its L2 ({p['l2']:g}) chosen by the BCE on the alignment's {p['n_validation']} held-out examples "
                  f"(a validation split: none of the held-out prompts below). On those held-out examples the "
                  f"classifier's BCE / accuracy: {p['validation']['bce']:.3f} / {percent(p['validation']['accuracy'])} "
                  f"after the probe, {held['bce']:.3f} / {percent(held['accuracy'])} after the alignment.", ""]
        summary.append(f"- Validation (the alignment's held-out examples): classifier BCE {held['bce']:.3f}, accuracy "
                       f"{percent(held['accuracy'])} after training (after the probe: {p['validation']['bce']:.3f}, "
                       f"{percent(p['validation']['accuracy'])}).")
    return lines, summary


def _paper(evals: dict) -> Section:
    lines = ["## The paper's numbers beside ours", "",
             "Li & Kim report Llama-2-7B models (SIGNALS.md); ours is a 135M model aligned in minutes, so only the "
             "direction of each effect is comparable.", "",
             "| attack | paper: Chat / augmented / CLS | ours: sft / augmented / signal |", "|---|---|---|"]
    first = next(c for c in evals if c.startswith("signal/"))
    for key, paper in PAPER_VS_AUGMENTATION.items():
        ours_text = " / ".join(percent(value_of(evals[c], key)) for c in ("sft", "augmented", first))
        lines.append(f"| {key.replace('_', ', ') + ' tokens' if key.startswith('prefill') else 'decoding sweep'} | "
                     f"{' / '.join(f'{v}%' for v in paper)} | {ours_text} |")
    lines += ["", "| paper (Chat vs CLS, ASR %) | Chat | CLS |", "|---|---|---|"]
    lines += [f"| {k} | {a} | {b} |" for k, (a, b) in PAPER_CHAT_VS_CLS.items()]
    return [*lines, ""], []


def _times(out: Path, invocations: list[dict]) -> Section:
    records = [(str(p.parent.relative_to(out)), read_json(p))
               for p in sorted(out.glob("**/stage.json"), key=lambda p: p.stat().st_mtime)]
    return stage_times(out, "Summed over the invocations that worked on each stage (to within 10 s per kill).",
                       records, invocations)


def plot_prefill(evals: dict, ks: list[int], path: Path) -> Path:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, metrics in evals.items():
        ax.plot(ks, [100 * metrics[f"prefill_{k}"]["asr"] for k in ks], "o-", label=name)
    ax.set_xlabel("prefilled target tokens (k)")
    ax.set_ylabel("ASR (%)")
    ax.set_xticks(ks)
    ax.set_ylim(-2, 102)
    ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=120)


def plot_checks(rows: list[dict], k: int, threshold: float, path: Path) -> Path:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(rows):
        steps = [s for s, _ in row["checks"]]
        ps = [p for _, p in row["checks"]]
        line, = ax.plot(steps, ps, ".-", label=f"prompt {i + 1}")
        if row["inserted"] is not None:
            ax.plot([row["inserted"]], [dict(row["checks"]).get(row["inserted"], threshold)], "x", ms=10,
                    color=line.get_color())
    ax.axhline(threshold, color="black", lw=0.5, ls="--")
    ax.set_xlabel(f"generated tokens after the {k}-token prefill")
    ax.set_ylabel("p(malicious)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=120)
