"""Evaluate a model's safety (ASR, attacks, over-refusal) and utility (MMLU, SST-2, GSM8K, perplexity).

Writes ``metrics.json``, ``report.md`` and per-task rows (``rows/<task>.jsonl``: every
generation and every scored question) into the workdir.

Tasks (``config.tasks``; computed in this order, the order of the registry
``ssah_jax.evaluation.tasks.TASKS``, where each task and the recipe choosing its data live):
  asr          ASR on the harmful set, without and / or with the safety system prompt
  prefill      ASR when the answer is forced to start with k tokens of the harmful target
  sweep        ASR under a grid of sampling settings; a prompt is broken if any setting breaks it
  overrefusal  refusal rate on benign prompts that sound harmful (XSTest's safe prompts)
  mmlu, sst2   zero-shot multiple-choice accuracy by log-likelihood
  gsm8k        exact match of the final number, greedy
  perplexity   perplexity of held-out benign responses (response tokens only)

ASR is the share of answers the configured judge (``config.judge``: keyword, harmbench,
llama_guard; ``ssah_jax.evaluation.judges``) calls the attack's success; over-refusal is the
keyword judge's refusal rate whatever the judge.

Resumes: rows already written are kept, and a task whose rows are complete is not rerun; a
workdir of another config is refused (``runs.prepare_workdir``; the judge is part of a run's
identity).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from experiments._mesh import check_mesh, load_on_mesh, on_mesh
from experiments._report import asr_judged
from ssah_jax import hosts, runs, signals
from ssah_jax.attacks import task as attack_task
from ssah_jax.data import check_kit_dataset, parse_mixture
from ssah_jax.evaluation import judges, tasks
from ssah_jax.evaluation.intervals import percent
from ssah_jax.sharding import MeshMismatch

# Keys that only affect speed or logging: the mesh (experiments._mesh). ``batch_size`` determines
# the answers of the sampled tasks (a batch is sampled with the seed ``seed + its first index``).
EXCLUDED: tuple[str, ...] = ("mesh",)
# Keys added after results were recorded, at the value that gives the results of before
# (runs.determining): over-refusal was XSTest's safe prompts before it had a dataset key, and
# every verdict the keyword judge's rules of then (keyword_v1) before there was a judge to choose:
# a run recorded before resumes with --config.judge=keyword_v1 and is refused with another judge.
ADDED = {"overrefusal.dataset": "xstest", "judge": "keyword_v1", "judge_model": "",
         **{f"gcg.{k}": v for k, v in dict(dataset="advbench", limit=20, steps=50, search_width=64, topk=256,
                                            n_replace=1, init=" ".join(["!"] * 20), chunk=64, early_stop=True,
                                            transfer="").items()}}
# Top-level sections and keys added after results were recorded (a workdir from before them is resumed)
ADDED_SECTIONS = ("mesh", "judge", "judge_model", "gcg")


def validate(config: ConfigDict, prefix: str = "") -> None:
    """Checks the evaluation keys; ``prefix`` locates them in a larger config (``"evaluation."``)."""

    def check(key, ok, requirement):
        runs.check(config, prefix + key, ok, requirement)

    check("harmful.settings", lambda v: len(v) > 0 and set(v) <= set(tasks.ASR_SETTINGS),
          f"must be a non-empty subset of {tasks.ASR_SETTINGS}")
    names = tuple(registry())
    check("tasks", lambda v: len(v) > 0 and set(v) <= set(names), f"must be a non-empty subset of {names}")
    for key in ("steps", "search_width", "topk", "n_replace", "chunk"):
        check(f"gcg.{key}", lambda v: v >= 1, "must be >= 1")
    check("gcg.limit", lambda v: v >= 0, "must be >= 0 (0 = all)")
    check("gcg.search_width", lambda v: v % runs.get(config, prefix + "gcg.chunk") == 0,
          "must be a multiple of gcg.chunk (the candidates a forward)")
    runs.check_parses(config, prefix + "gcg.dataset", parse_mixture)
    check("batch_size", lambda v: v >= 1, "must be >= 1")
    check("max_new_tokens", lambda v: v >= 1, "must be >= 1")
    check("judge", lambda v: v in judges.JUDGES, f"must be one of {judges.JUDGES}")
    judge = runs.get(config, prefix + "judge")
    if judge in ("keyword", "keyword_v1"):
        check("judge_model", lambda v: not v, "must be empty: the keyword judge takes no model")
    else:
        check("judge_model", bool, f"must name the {judge} judge's model, an HF directory or hub id "
                                   f"(e.g. {judges.HUB_MODELS[judge]})")
    for task in ("harmful", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity"):
        check(f"{task}.limit", lambda v: v >= 0, "must be >= 0 (0 = all)")
    check("prefill.tokens", lambda v: isinstance(v, tuple | list) and len(v) > 0 and all(k >= 1 for k in v),
          'must be a non-empty list of k >= 1, e.g. "(5,)"')
    check("gsm8k.max_new_tokens", lambda v: v >= 1, "must be >= 1")
    check("perplexity.max_length", lambda v: v >= 16, "must be >= 16")
    check("sweep.temperatures", lambda v: len(v) > 0 and all(t > 0 for t in v),
          "must be a non-empty list of temperatures > 0 (the sweep samples)")
    check("sweep.top_ps", lambda v: len(v) > 0 and all(0 < p <= 1 for p in v), "values in (0, 1]")
    check("sweep.top_ks", lambda v: len(v) > 0 and all(k >= 0 for k in v), "values >= 0")
    runs.check_parses(config, prefix + "harmful.dataset", parse_mixture)
    runs.check_parses(config, prefix + "harmful.exclude", parse_mixture, optional=True)
    runs.check_parses(config, prefix + "overrefusal.dataset", parse_mixture)
    runs.check_parses(config, prefix + "sweep.dataset", parse_mixture)
    for task in ("prefill", "perplexity"):
        runs.check_parses(config, f"{prefix}{task}.dataset", check_kit_dataset)
    section = config
    for part in filter(None, prefix.split(".")):
        section = section[part]
    if "signal" in section:  # (finetune's evaluation has no file: it deploys the signal it trained)
        if section.signal.get("file"):
            check("signal.file", lambda v: (Path(v) / signals.FILE).exists() or Path(v).name == signals.FILE,
                  f"must be a directory holding {signals.FILE} (or the file itself)")
        check("signal.threshold", lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
        check("signal.schedule", lambda v: v in signals.SCHEDULES, f"must be one of {signals.SCHEDULES}")
        for key in ("period", "tau"):
            check(f"signal.{key}", lambda v: v >= 1, "must be >= 1")
        for key in ("r1", "r2", "r3"):
            check(f"signal.{key}", lambda v: v >= 0, "must be >= 0")


def evaluation_spec(config: ConfigDict, data_dir: str | None = None) -> tasks.EvalSpec:
    """The typed settings of a (validated) evaluate config or evaluation section; ``data_dir``
    replaces its own (a section whose data kit is its parent's)."""
    s = tasks.spec
    h, p, w, o, g, x = config.harmful, config.prefill, config.sweep, config.overrefusal, config.gsm8k, config.perplexity
    return tasks.EvalSpec(
        tasks=tuple(config.tasks), batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
        seed=config.seed, system_prompt=config.system_prompt, judge=config.judge, judge_model=config.judge_model,
        data_dir=(data_dir if data_dir is not None else config.data_dir) or None,
        harmful=s.Harmful(h.dataset, h.exclude, h.limit, tuple(h.settings)),
        prefill=s.Prefill(p.dataset, p.limit, tuple(p.tokens)),
        sweep=s.Sweep(w.dataset, w.limit, tuple(w.temperatures), tuple(w.top_ps), tuple(w.top_ks)),
        overrefusal=s.Overrefusal(o.dataset, o.limit), mmlu=s.Limit(config.mmlu.limit),
        sst2=s.Limit(config.sst2.limit), gsm8k=s.Gsm8k(g.limit, g.max_new_tokens),
        perplexity=s.Perplexity(x.dataset, x.limit, x.max_length),
        gcg=s.Gcg(**{k: config.gcg[k] for k in ("dataset", "limit", "steps", "search_width", "topk", "n_replace",
                                                 "init", "chunk", "early_stop", "transfer")}))


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    runs.dtype(config)
    validate(config)
    check_mesh(config)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, added=ADDED, sections=ADDED_SECTIONS, overwrite=overwrite)
    with on_mesh(config) as mesh:
        model, tokenizer = load_on_mesh(config, mesh)
        return _run(config, out, model, tokenizer, load_judge(config, config, mesh))


def load_judge(section: ConfigDict, config: ConfigDict, mesh: Any, prefix: str = "") -> judges.Judge:
    """The judge of an evaluate config (``section`` is ``config``) or of ``config``'s evaluation
    section ``section`` at ``prefix`` (``"evaluation."``): a classifier's model
    (``judge_model``) is loaded in ``config.dtype`` onto ``mesh``, beside the model it judges. A
    mesh axis that does not divide its heads, kv heads, vocabulary or widths is a ConfigError
    naming ``config.mesh.<axis>``."""
    try:
        return judges.load_judge(section.judge, section.judge_model, dtype=runs.dtype(config), mesh=mesh,
                                 batch_size=section.batch_size, prefix=f"config.{prefix}")
    except MeshMismatch as e:
        raise runs.ConfigError(f"config.mesh.{e.axis}: {e} of the judge's model {section.judge_model}") from None


def _run(config: ConfigDict, out: Path, model: Any, tokenizer: Any, judge: judges.Judge) -> Path:
    description = f"Model `{config.model}` ({config.dtype})"
    if config.signal.file:
        model = with_signal(model, config.signal)
        s = config.signal
        description += (f" with its safety signal `{s.file}` (strategic decoding: schedule {s.schedule}, threshold "
                        f"{s.threshold}, r1/r2/r3 {s.r1}/{s.r2}/{s.r3}, tau {s.tau}; log-likelihood tasks score the "
                        "model without it)")
    evaluate_model(model, tokenizer, evaluation_spec(config), out, description=description, judge=judge)
    print(f"Metrics: {out / 'metrics.json'}")
    print(f"Report: {out / 'report.md'}")
    return out / "report.md"


def plan_configs(config: ConfigDict) -> list[Any]:
    """What ``ssah-jax plan`` compiles: the decoding of a batch of prompts."""
    from experiments.finetune import decode_spec  # (finetune imports this module)
    from ssah_jax.train.memory import PlanItem

    return [PlanItem("evaluate", config.model, decode_spec(config))]


def with_signal(model: Any, settings: ConfigDict) -> signals.SignalModel:
    """``model`` deployed with the safety signal of ``settings.file`` under ``settings``' decoding."""
    path = Path(settings.file)
    signal = signals.load(path.parent if path.name == signals.FILE else path, model.config)
    return signals.SignalModel(model, signal, **{k: v for k, v in settings.items() if k != "file"})


ATTACKS = {"gcg": attack_task.gcg}  # the optimisation attacks, run after the evaluation's own tasks


def registry() -> dict[str, Any]:
    """Every task by name in the order a run computes them: the evaluation's
    (``ssah_jax.evaluation.tasks.TASKS``), then the optimisation attacks above them."""
    return {**tasks.TASKS, **ATTACKS}


def chosen(names: tuple[str, ...], key: str = "config.tasks") -> dict[str, Any]:
    """The tasks called ``names`` in :func:`registry` order; an unknown name is a ConfigError
    naming ``key``."""
    every = registry()
    unknown = [n for n in names if n not in every]
    if unknown:
        raise runs.ConfigError(f"{key}: unknown evaluation task {unknown[0]!r} (tasks: {', '.join(every)})")
    return {name: task for name, task in every.items() if name in names}


def task_label(spec: tasks.EvalSpec, name: str, entry: dict) -> str:
    """A report's name of metric ``name``: the attacks' or an evaluation task family's."""
    return attack_task.label(spec, name, entry) or tasks.label(spec, name, entry)


def evaluate_model(model: Any, tokenizer: Any, spec: tasks.EvalSpec, out: Path, *, description: str,
                   judge: judges.Judge) -> dict:
    """Runs ``spec.tasks`` on ``model`` into ``out`` (``metrics.json``, ``rows/``,
    ``report.md``, resuming what is there) and returns the metrics; ``judge`` (``spec.judge``,
    loaded: :func:`load_judge`) judges the attacks. Tasks run in the registry's
    order (``ssah_jax.evaluation.tasks.TASKS``); a metric already in ``metrics.json`` is kept,
    each new one is written as soon as it is computed, with the seconds it took."""
    store = tasks.RowStore(out / "rows")
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    hosts.sync("metrics read")  # by every process, before process 0 rewrites them
    for task in chosen(spec.tasks).values():
        for name, compute in task(model, tokenizer, spec, store=store, judge=judge).items():
            if name in metrics:
                print(f"{name}: done in an earlier run, kept")
                continue
            start = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - start, 1)
            metrics[name] = result
            if hosts.is_main():
                metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    if hosts.is_main():
        (out / "report.md").write_text(render_report(spec, metrics, description))
    hosts.sync("evaluation written")
    return metrics


def render_report(spec: tasks.EvalSpec, metrics: dict, description: str) -> str:
    lines = [
        "# evaluate", "",
        f"{description}; greedy decoding, {spec.max_new_tokens} new tokens unless noted. "
        + asr_judged({"evaluation": spec}), "",
        "| metric | value | n | seconds |", "|---|---|---|---|",
    ]
    for key, m in metrics.items():
        label = task_label(spec, key, m)
        value = (f"{m['perplexity']:.2f}" if "perplexity" in m else f"{m['auroc']:.3f} (AUROC)" if "auroc" in m
                 else percent(tasks.headline(m)[0]))
        lines.append(f"| {label} | {value} | {m['n']} | {m['seconds']} |")
    if "sweep" in metrics:
        lines += ["", "Decoding sweep, ASR per setting:", "", "| setting | ASR |", "|---|---|"]
        lines += [f"| {k} | {percent(v)} |" for k, v in metrics["sweep"]["per_setting"].items()]
    for key in ("asr_no_system", "asr_system"):
        if "by_category" in metrics.get(key, {}):
            lines += ["", f"{tasks.label(spec, key, metrics[key])}, per category:", "", "| category | ASR | n |",
                      "|---|---|---|"]
            lines += [f"| {c} | {percent(v['asr'])} | {v['n']} |" for c, v in metrics[key]["by_category"].items()]
    lines += ["", "Every generation and scored question is in `rows/<task>.jsonl`.", ""]
    return "\n".join(lines)
