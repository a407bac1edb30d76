"""Compare the defences of ``reproduce`` and ``signals`` under the same attacks, from their reports.

See ``configs/compare.py``. The report has a table of ASR after each fine-tuning attack
(the seeds' answers pooled, Wilson 95% intervals) per method, each method set against the
unprotected runs of its own pipeline (Newcombe's interval of the difference), a table of ASR
under prefilling and one of the costs before any attack (over-refusal, MMLU, SST-2, GSM8K), a
plot, ``numbers.json`` and ``REPORT.md``. It computes nothing new: every number is read from
the two reports' ``numbers.json`` (each finished stage's record and ``metrics.json`` files,
which each pipeline writes beside its ``REPORT.md`` and ``config.json``), and the report names
the commits the numbers were computed by. So it needs neither workdir: the committed reports
suffice, and regenerating one pipeline's report does not need the other run again.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from experiments._report import save_figure
from experiments.reproduce import ADDED as REPRODUCE_ADDED
from experiments.reproduce.subruns import attack_dir as reproduce_run
from experiments.signals import ADDED as SIGNALS_ADDED
from experiments.signals import attack_dir as signals_run
from ssah_jax import hosts, runs, stages
from ssah_jax.evaluation.intervals import Rate, compare, percent_bars
from ssah_jax.evaluation.tasks import rate_of

EXCLUDED: tuple[str, ...] = ()
# What both runs must share (dotted config keys, or their prefixes): the same unaligned model,
# alignment recipe and contrast data, and the same attacks, seeds and attack evaluation
SHARED = ("model", "data_dir", "dtype", "contrast", "align", "attack.datasets", "attack.seeds",
          "attack.batch_size", "attack.learning_rate", "attack.warmup_steps", "attack.evaluation.harmful",
          "attack.evaluation.max_new_tokens", "finetune")
ONLY_REPRODUCE = ("align.ru_epochs",)  # keys of reproduce's sections that signals does not have
# (pipeline, run name, label, the pipeline's unprotected run it is compared with)
METHODS = (
    ("reproduce", "none", "no protection (reproduce)", None),
    ("reproduce", "scu_cu6", "SSAH: freeze SCU + top 6% CU", "none"),
    ("reproduce", "scu_cu", "SSAH: freeze SCU + all CU", "none"),
    ("reproduce", "random", "control: freeze as many random units", "none"),
    ("reproduce", "layers", "freeze a block of layers", "none"),
    ("reproduce", "lora", "LoRA", "none"),
    ("signals", "sft", "no protection (signals: plain SFT)", None),
    ("signals", "augmented", "safety data augmentation (Qi et al. 2024)", "sft"),
    ("signals", "signal", "explicit safety signal (Li & Kim 2025)", "sft"),
)


def validate(config: ConfigDict) -> None:
    for key in ("reproduce", "signals"):
        runs.check(config, key, lambda v: (Path(v) / "config.json").exists(),
                   f"must be the report directory of an `ssah-jax {key}` run (no config.json there)")
        runs.check(config, key, lambda v: (Path(v) / stages.NUMBERS).exists(),
                   f"holds no {stages.NUMBERS} (a report written before it was added): run `ssah-jax {key}` "
                   "on its workdir again to rewrite the report")


def _shared(config: dict) -> dict[str, Any]:
    """The leaves of ``config`` the comparison holds fixed; a key added to the configs after a
    report was written (the pipelines' ``ADDED``) counts only away from its old value, so a report
    written before the key existed compares with one written after."""
    return {k: v for k, v in runs.leaves(ConfigDict(config)).items()
            if any(k == s or k.startswith(s + ".") for s in SHARED) and k not in ONLY_REPRODUCE
            and not runs.added_at_old_value(k, v, {**REPRODUCE_ADDED, **SIGNALS_ADDED})}


def check_sources(rep: dict, sig: dict) -> None:
    """Refuses a maker-aligned reproduce run (signals aligns the model itself) and runs that
    differ in what the comparison holds fixed (SHARED)."""
    if rep.get("maker_aligned"):
        raise runs.ConfigError("config.reproduce: a run on a model aligned by its makers; signals aligns the "
                               "unaligned model itself, so there is no common aligned model to compare on")
    a, b = _shared(rep), _shared(sig)
    if a != b:
        raise runs.ConfigError("config.reproduce and config.signals differ in what the comparison holds fixed: "
                               + runs.differences(a, b) + " (reproduce -> signals)")


def _metrics(numbers: dict, key: str, stage: str, file: str, names: tuple[str, ...],
             codes: dict[str, list[str]]) -> dict[str, Any]:
    """The ``file`` (a ``metrics.json``) of ``stage`` in the ``numbers.json`` of ``config.<key>``
    (``numbers["source"]``: that report directory), which must hold every metric of ``names``
    (else a ConfigError naming the run, the stage and what it lacks); adds the commits that
    computed the stage to ``codes``."""
    where = f"config.{key}={numbers['source']}"
    if stage not in numbers.get("stages", {}):
        raise runs.ConfigError(f"{where}: its {stages.NUMBERS} holds no finished stage {stage} "
                               f"(finish it with `ssah-jax {key}` on that run's workdir)")
    record = numbers["stages"][stage]
    metrics = record["files"].get(file)
    missing = list(names) if metrics is None else [n for n in names if n not in metrics]
    if missing:
        raise runs.ConfigError(f"{where}: stage {stage} has no "
                               + (f"{file}" if metrics is None else f"{', '.join(missing)} in its {file}")
                               + f" in {stages.NUMBERS} (a run of `ssah-jax {key}` that skipped it?)")
    for code in record.get("code") or ["not recorded"]:
        codes.setdefault(code or "not a checkout", []).append(f"{key}: {stage}")
    return metrics


# What each model costs before any attack (signals' evaluations): (label, metric)
COSTS = (("over-refusal", "overrefusal"), ("MMLU", "mmlu"), ("SST-2", "sst2"), ("GSM8K", "gsm8k"))


def gather(rep_numbers: dict, sig_numbers: dict, rep: dict, sig: dict) -> dict[str, Any]:
    """Every number of the comparison, read from the two reports' ``numbers.json`` (each with
    its ``source``, the report directory; a run that is not there is a ConfigError naming it)."""
    attacks, seeds = list(rep["attack"]["datasets"]), list(rep["attack"]["seeds"])
    result: dict[str, Any] = {"attacks": attacks, "seeds": seeds, "methods": {}, "prefill": {}, "costs": {},
                              "codes": {}}
    for pipeline, name, label, baseline in METHODS:
        if pipeline == "reproduce" and name not in rep["attack"]["variants"]:
            continue
        numbers = rep_numbers if pipeline == "reproduce" else sig_numbers
        run_of = ((lambda a, s, n=name: reproduce_run(a, n, s)) if pipeline == "reproduce"
                  else (lambda a, s, n=name: signals_run(n, a, s)))
        per_attack = {}
        for attack in attacks:
            rates = [rate_of(_metrics(numbers, pipeline, run_of(attack, seed), "eval/metrics.json", ("asr_no_system",),
                                    result["codes"]), "asr_no_system") for seed in seeds]
            per_attack[attack] = {"pooled": Rate.pooled(rates), "seeds": rates}
        result["methods"][label] = {"pipeline": pipeline, "run": name, "baseline": baseline, "attacks": per_attack}
    first, ks = sig["decoding"]["schedules"][0], sig["evaluation"]["prefill"]["tokens"]
    for label, stage in (("plain SFT (also every freezing and LoRA model before fine-tuning)", "eval_sft"),
                         ("safety data augmentation", "eval_augmented"),
                         (f"explicit safety signal (schedule {first})", f"eval_signal/{first}")):
        metrics = _metrics(sig_numbers, "signals", stage, "metrics.json",
                           (*(f"prefill_{k}" for k in ks), *(key for _, key in COSTS)), result["codes"])
        result["prefill"][label] = {k: rate_of(metrics, f"prefill_{k}") for k in ks}
        result["costs"][label] = {name: rate_of(metrics, key) for name, key in COSTS}
    return result


def _baseline_label(result: dict, pipeline: str, run: str) -> str:
    return next(label for label, m in result["methods"].items() if m["pipeline"] == pipeline and m["run"] == run)


def _link(source: str, report_dir: Path) -> str:
    """A markdown link from ``report_dir`` to the ``REPORT.md`` of the report directory ``source``."""
    target = Path(source).resolve() / "REPORT.md"
    return f"[{Path(source).name}/REPORT.md]({os.path.relpath(target, report_dir.resolve())})"


def render(config: ConfigDict, result: dict, rep: dict, sig: dict, report_dir: Path, argv: list[str]) -> Path:
    attacks, seeds = result["attacks"], result["seeds"]
    ev = rep["attack"]["evaluation"]
    lines = ["# Defences compared under the same attacks", "",
             "```bash", " ".join(["ssah-jax", *argv[1:]]), "```", "",
             f"Read from the reports of `ssah-jax reproduce` ({_link(config.reproduce, report_dir)}) and "
             f"`ssah-jax signals` ({_link(config.signals, report_dir)}) (their `numbers.json`), "
             f"both on `{rep['model']}` aligned by the same recipe (`{rep['align']['dataset']}`, "
             f"{rep['align']['steps']} steps); nothing is recomputed. Each fine-tuning attack ("
             + ", ".join(f"{a}: {d['steps']} steps on `{d['dataset']}`" for a, d in rep["attack"]["datasets"].items())
             + f"; frozen variants train {rep['attack']['frozen_epochs']}x the steps) ran once per seed "
             f"({', '.join(map(str, seeds))}); ASR without a system prompt on `{ev['harmful']['dataset']}` without "
             f"every prompt of `{ev['harmful']['exclude']}`, {ev['max_new_tokens']} new tokens; each cell pools the "
             "seeds' answers and gives the Wilson 95% interval, then the comparison with the unprotected runs of the "
             "same pipeline (Newcombe's 95% interval of the difference: lower / higher / similar).", "",
             "## ASR after fine-tuning attacks", "",
             "| method | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for label, m in result["methods"].items():
        cells = []
        for attack in attacks:
            pooled = m["attacks"][attack]["pooled"]
            if m["baseline"] is None:
                cells.append(f"{pooled}")
            else:
                base = result["methods"][_baseline_label(result, m["pipeline"], m["baseline"])]["attacks"][attack]
                cells.append(f"{pooled}, {compare(pooled, base['pooled'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ks = sorted({k for rates in result["prefill"].values() for k in rates})
    lines += ["", "Per seed: `numbers.json`.", "", "## ASR under prefilling (no fine-tuning)", "",
              f"The first k tokens of AdvBench's target forced (`{sig['evaluation']['prefill']['dataset']}`, held-out "
              "prompts; signals' evaluation). Freezing and LoRA act only during fine-tuning, so before it the "
              "protected models are the aligned model itself: the plain SFT row.", "",
              "| model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    sft = next(iter(result["prefill"].values()))
    for label, rates in result["prefill"].items():
        cells = [f"{rates[k]}" + ("" if rates is sft else f", {compare(rates[k], sft[k])}") for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    names = [name for name, _ in COSTS]
    lines += ["", "## Costs before any attack", "",
              "Over-refusal: XSTest's safe prompts refused; MMLU, SST-2, GSM8K: accuracy (signals' evaluation, "
              "where its report says how each is measured). Each against plain SFT.", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    sft = next(iter(result["costs"].values()))
    for label, costs in result["costs"].items():
        cells = [f"{costs[n]}" + ("" if costs is sft else f", {compare(costs[n], sft[n])}") for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    codes = result["codes"]
    lines += ["", f"![ASR after each attack and under prefilling]({plot(result, report_dir / 'compare.png').name})", "",
              "## Provenance", "",
              "The commits that computed the stages read here (each stage's record in `numbers.json`):", ""]
    lines += [f"- `{code}`: {len(where)} stages" for code, where in sorted(codes.items())]
    if len(codes) > 1:
        lines += ["", "**Note**: the stages came from different code; check that the commits in between change "
                  "nothing these stages compute."]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(result: dict, path: Path) -> Path:
    plt = runs.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    attacks, methods = result["attacks"], list(result["methods"])
    width = 0.8 / len(methods)
    for i, label in enumerate(methods):
        values, errors = percent_bars(result["methods"][label]["attacks"][a]["pooled"] for a in attacks)
        left.bar(np.arange(len(attacks)) + i * width, values, width, label=label, yerr=errors, capsize=2)
    left.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
    left.set_ylabel("ASR after fine-tuning (%), 95% interval")
    left.legend(fontsize="xx-small", ncol=2)
    for label, rates in result["prefill"].items():
        ks = sorted(rates)
        values, errors = percent_bars(rates[k] for k in ks)
        right.errorbar(ks, values, yerr=errors, marker="o", capsize=2, label=label.split(" (")[0])
    right.set_xlabel("prefilled target tokens (k)")
    right.set_ylabel("ASR (%), 95% interval")
    right.set_ylim(-2, 102)
    right.legend(fontsize="x-small")
    return save_figure(fig, path, dpi=120)


def numbers(result: dict) -> dict:
    def rate(r: Rate, name: str = "asr") -> dict:
        low, high = r.interval
        return {name: r.value, "n": r.n, "low": low, "high": high}

    return {"attacks": result["attacks"], "seeds": result["seeds"], "codes": result["codes"],
            "methods": {label: {**{k: m[k] for k in ("pipeline", "run", "baseline")},
                                "attacks": {a: {"pooled": rate(v["pooled"]), "seeds": [rate(r) for r in v["seeds"]]}
                                            for a, v in m["attacks"].items()}}
                        for label, m in result["methods"].items()},
            "prefill": {label: {str(k): rate(r) for k, r in rates.items()}
                        for label, rates in result["prefill"].items()},
            "costs": {label: {name: rate(r, "rate") for name, r in costs.items()}
                      for label, costs in result["costs"].items()}}


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    validate(config)
    sources = {key: Path(config[key]) for key in ("reproduce", "signals")}
    rep, sig = (runs.read_json(sources[key] / "config.json") for key in ("reproduce", "signals"))
    check_sources(rep, sig)
    result = gather(*({**runs.read_json(sources[key] / stages.NUMBERS), "source": str(sources[key])}
                      for key in ("reproduce", "signals")), rep, sig)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, overwrite=overwrite)
    report_dir = Path(config.report_dir) if config.report_dir else out / "report"
    path = report_dir / "REPORT.md"
    if hosts.is_main():
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "numbers.json").write_text(json.dumps(
            {**numbers(result), "written": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2) + "\n")
        path = render(config, result, rep, sig, report_dir, sys.argv)
    print(f"Report: {path}")
    return path
