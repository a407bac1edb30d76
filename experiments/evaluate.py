"""Evaluate a model's safety (ASR, attacks, over-refusal) and utility (MMLU, SST-2, GSM8K, perplexity).

Writes ``metrics.json``, ``report.md`` and per-task rows (``rows/<task>.jsonl``: every
generation and every scored question) into the workdir.

Tasks (``config.tasks``, in this order):
  asr          ASR on the harmful set, without and / or with the safety system prompt
  prefill      ASR when the answer is forced to start with k tokens of the harmful target
  sweep        ASR under a grid of sampling settings; a prompt is broken if any setting breaks it
  overrefusal  refusal rate on XSTest's safe prompts
  mmlu, sst2   zero-shot multiple-choice accuracy by log-likelihood
  gsm8k        exact match of the final number, greedy
  perplexity   perplexity of held-out benign responses (response tokens only)

Resumes: rows already written are kept, and a task whose rows are complete is not rerun; a
workdir of another config is refused (``runs.prepare_workdir``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict
from tqdm.auto import tqdm

from ssah_jax import evaluation as ev
from ssah_jax import runs
from ssah_jax.checkpoints import load_model
from ssah_jax.data import Record, check_kit_dataset, load_local, load_mixture, parse_mixture, with_responses

ASR_SETTINGS = ("no_system", "system")  # the asr task: without / with the safety system prompt
TASKS = ("asr", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity")
# Keys that only affect speed or logging: none. ``batch_size`` determines the answers of the
# sampled tasks (a batch is sampled with the seed ``seed + its first index``, its rows share it).
EXCLUDED: tuple[str, ...] = ()


def validate(config: ConfigDict, prefix: str = "") -> None:
    """Checks the evaluation keys; ``prefix`` locates them in a larger config (``"evaluation."``)."""

    def check(key, ok, requirement):
        runs.check(config, prefix + key, ok, requirement)

    check("harmful.settings", lambda v: len(v) > 0 and set(v) <= set(ASR_SETTINGS),
          f"must be a non-empty subset of {ASR_SETTINGS}")
    check("tasks", lambda v: len(v) > 0 and set(v) <= set(TASKS), f"must be a non-empty subset of {TASKS}")
    check("batch_size", lambda v: v >= 1, "must be >= 1")
    check("max_new_tokens", lambda v: v >= 1, "must be >= 1")
    for task in ("harmful", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity"):
        check(f"{task}.limit", lambda v: v >= 0, "must be >= 0 (0 = all)")
    check("prefill.tokens", lambda v: v >= 1, "must be >= 1")
    check("gsm8k.max_new_tokens", lambda v: v >= 1, "must be >= 1")
    check("perplexity.max_length", lambda v: v >= 16, "must be >= 16")
    check("sweep.temperatures", lambda v: len(v) > 0 and all(t > 0 for t in v),
          "must be a non-empty list of temperatures > 0 (the sweep samples)")
    check("sweep.top_ps", lambda v: len(v) > 0 and all(0 < p <= 1 for p in v), "values in (0, 1]")
    check("sweep.top_ks", lambda v: len(v) > 0 and all(k >= 0 for k in v), "values >= 0")
    runs.check_parses(config, prefix + "harmful.dataset", parse_mixture)
    runs.check_parses(config, prefix + "harmful.exclude", parse_mixture, optional=True)
    for task in ("prefill", "sweep", "perplexity"):
        runs.check_parses(config, f"{prefix}{task}.dataset", check_kit_dataset)


def _first(records: list[Record], limit: int) -> list[Record]:
    return records[:limit] if limit else records


def _spread(records: list[Record], limit: int) -> list[Record]:
    """``limit`` records evenly spaced over the set (MMLU: every subject is represented)."""
    if not limit or limit >= len(records):
        return records
    step = len(records) / limit
    return [records[int(i * step)] for i in range(limit)]


def _load(data_dir: str | None, name: str, split: str | None = None, on_error: str = "raise") -> list[Record]:
    return load_local(name, split, data_dir or None, on_error)[0]  # logs skipped rows


def _rows(path: Path, records: Sequence[Record], chunk: int, fn: Callable[[Sequence[Record], int], list[dict]],
          desc: str) -> list[dict]:
    """Rows for ``records``, computed ``chunk`` at a time by ``fn(records, offset)`` and
    appended to ``path``; rows already there are reused."""
    done = runs.read_jsonl(path)
    if [r["prompt"] for r in done] != [r.prompt for r in records[: len(done)]] or len(done) > len(records):
        raise runs.WorkdirError(f"{path} holds rows of other prompts (the data changed?); rerun with --overwrite to "
                                "start afresh, or use a new --workdir")
    path.write_text("".join(json.dumps(r) + "\n" for r in done))  # drops a torn last line
    with open(path, "a") as f, tqdm(total=len(records), initial=len(done), desc=desc, unit="ex") as bar:
        for start in range(len(done), len(records), chunk):
            new = fn(records[start : start + chunk], start)
            for row in new:
                f.write(json.dumps(row) + "\n")
            f.flush()
            done.extend(new)
            bar.update(len(new))
    return done


def harmful_records(config: ConfigDict, data_dir: str | None) -> list[Record]:
    """The ASR prompts: ``harmful.dataset`` (a dataset or a mixture ``"name:count,..."``)
    without the prompts of ``harmful.exclude`` (datasets a model was trained on)."""
    h = config.harmful
    try:
        exclude = load_mixture(h.exclude, data_dir)[0] if h.exclude else []
        return load_mixture(h.dataset, data_dir, exclude=[r.prompt for r in exclude])[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.harmful (dataset={h.dataset!r}, exclude={h.exclude!r}): {e}") from None


def perplexity_records(config: ConfigDict, data_dir: str | None, limit: int | None = None) -> list[Record]:
    """The held-out benign responses of the perplexity task: the *last* ``limit`` records
    (``perplexity.limit`` by default; 0 = all) of ``perplexity.dataset`` (training recipes take
    theirs from the front)."""
    ok = with_responses(_load(data_dir, config.perplexity.dataset, on_error="skip"))
    limit = config.perplexity.limit if limit is None else limit
    return ok[-limit:] if limit else ok


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    runs.dtype(config)
    validate(config)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, overwrite=overwrite)
    model, tokenizer = load_model(config.model, runs.dtype(config))
    evaluate_model(model, tokenizer, config, out, data_dir=config.data_dir,
                   description=f"Model `{config.model}` ({config.dtype})")
    print(f"Metrics: {out / 'metrics.json'}")
    print(f"Report: {out / 'report.md'}")
    return out / "report.md"


def evaluate_model(model: Any, tokenizer: Any, config: ConfigDict, out: Path, *, data_dir: str | None,
                   description: str) -> dict:
    """Runs ``config.tasks`` on ``model`` into ``out`` (``metrics.json``, ``rows/``,
    ``report.md``, resuming what is there) and returns the metrics."""
    (out / "rows").mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    bs = config.batch_size
    greedy = dict(max_new_tokens=config.max_new_tokens, batch_size=bs)
    system = config.system_prompt or ev.LLAMA2_SYSTEM_PROMPT

    def answers(**kw):
        return lambda batch, start: ev.answer_rows(model, tokenizer, batch, seed=config.seed + start, **kw)

    def task(name: str, produce: Callable[[], dict]) -> None:
        if name in metrics:
            print(f"{name}: done in an earlier run, kept")
            return
        start = time.perf_counter()
        result = produce()
        result["seconds"] = round(time.perf_counter() - start, 1)
        metrics[name] = result
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")

    def rows(name, records, fn, chunk=bs):
        return _rows(out / "rows" / f"{name}.jsonl", records, chunk, fn, name)

    if "asr" in config.tasks:
        harmful = _first(harmful_records(config, data_dir), config.harmful.limit)
        for setting in config.harmful.settings:
            kw = dict(system_prompt=system) if setting == "system" else {}
            task(f"asr_{setting}", lambda setting=setting, kw=kw: ev.summarise_asr(
                rows(f"asr_{setting}", harmful, answers(**kw, **greedy))))
    if "prefill" in config.tasks:
        targets = _first(_load(data_dir, config.prefill.dataset), config.prefill.limit)
        k = config.prefill.tokens

        def prefilled(batch, start):
            prefixes = [ev.prefill_prefix(tokenizer, r, k) for r in batch]
            return ev.answer_rows(model, tokenizer, batch, answer_prefixes=prefixes, **greedy)

        task(f"prefill_{k}", lambda: {**ev.summarise_asr(rows(f"prefill_{k}", targets, prefilled)), "tokens": k})
    if "sweep" in config.tasks:
        prompts = _first(_load(data_dir, config.sweep.dataset), config.sweep.limit)
        settings = ev.sweep_settings(config.sweep.temperatures, config.sweep.top_ps, config.sweep.top_ks)
        task("sweep", lambda: ev.summarise_sweep({
            ev.setting_name(s): rows(f"sweep_{ev.setting_name(s)}", prompts, answers(**s, **greedy))
            for s in settings
        }))
    if "overrefusal" in config.tasks:
        safe = _first([r for r in _load(data_dir, "xstest") if r.label == "safe"], config.overrefusal.limit)
        task("overrefusal", lambda: ev.summarise_refusal_rate(rows("overrefusal", safe, answers(**greedy))))
    for name, split in (("mmlu", "test"), ("sst2", "dev")):
        if name in config.tasks:
            records = _spread(_load(data_dir, name, split), config[name].limit)

            def scored(batch, start, name=name):
                return ev.multiple_choice_rows(model, tokenizer, batch, name, batch_size=bs)

            task(name, lambda name=name, records=records, scored=scored: ev.summarise_accuracy(
                rows(name, records, scored, chunk=8 * bs)))
    if "gsm8k" in config.tasks:
        problems = _first(_load(data_dir, "gsm8k", "test"), config.gsm8k.limit)
        task("gsm8k", lambda: ev.summarise_accuracy(rows("gsm8k", problems, lambda b, s: ev.gsm8k_rows(
            model, tokenizer, b, max_new_tokens=config.gsm8k.max_new_tokens, batch_size=bs))))
    if "perplexity" in config.tasks:
        heldout = perplexity_records(config, data_dir)
        task("perplexity", lambda: ev.summarise_perplexity(rows("perplexity", heldout, lambda b, s: ev.perplexity_rows(
            model, tokenizer, b, max_length=config.perplexity.max_length, batch_size=bs), chunk=4 * bs)))

    (out / "report.md").write_text(render_report(config, metrics, description))
    return metrics


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_report(config: ConfigDict, metrics: dict, description: str) -> str:
    lines = [
        "# evaluate", "",
        f"{description}; greedy decoding, {config.max_new_tokens} new tokens unless "
        "noted; refusals judged by keywords (`ssah_jax.evaluation.is_refusal`). ASR = share of harmful "
        "prompts not refused.", "",
        "| metric | value | n | seconds |", "|---|---|---|---|",
    ]
    h = config.harmful
    harmful = h.dataset + (f" without the prompts of {h.exclude}" if h.exclude else "")
    names = {
        "asr_no_system": f"ASR, {harmful}, no system prompt (template default)",
        "asr_system": f"ASR, {harmful}, safety system prompt",
        "sweep": f"ASR, {config.sweep.dataset}, decoding sweep (any setting)",
        "overrefusal": "over-refusal, XSTest safe prompts (refusal rate)",
        "mmlu": "MMLU accuracy (zero-shot, log-likelihood)",
        "sst2": "SST-2 dev accuracy (zero-shot, log-likelihood)",
        "gsm8k": f"GSM8K exact match ({config.gsm8k.max_new_tokens} new tokens)",
        "perplexity": f"perplexity, held-out {config.perplexity.dataset} responses",
    }
    for key, m in metrics.items():
        if key.startswith("prefill_"):
            label = f"ASR, {config.prefill.dataset}, prefilling attack ({m['tokens']} target tokens)"
        else:
            label = names[key]
        if "asr" in m:
            value = _pct(m["asr"])
        elif "asr_any_setting" in m:
            value = _pct(m["asr_any_setting"])
        elif "refusal_rate" in m:
            value = _pct(m["refusal_rate"])
        elif "accuracy" in m:
            value = _pct(m["accuracy"])
        else:
            value = f"{m['perplexity']:.2f}"
        lines.append(f"| {label} | {value} | {m['n']} | {m['seconds']} |")
    if "sweep" in metrics:
        lines += ["", "Decoding sweep, ASR per setting:", "", "| setting | ASR |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in metrics["sweep"]["per_setting"].items()]
    for key in ("asr_no_system", "asr_system"):
        if "by_category" in metrics.get(key, {}):
            lines += ["", f"{names[key]}, per category:", "", "| category | ASR | n |", "|---|---|---|"]
            lines += [f"| {c} | {_pct(v['asr'])} | {v['n']} |" for c, v in metrics[key]["by_category"].items()]
    lines += ["", "Every generation and scored question is in `rows/<task>.jsonl`.", ""]
    return "\n".join(lines)
