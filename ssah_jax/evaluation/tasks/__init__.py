"""The evaluation tasks, by name (the names of ``config.tasks``), like big_vision's evaluators.

``TASKS`` holds each task in the order a run computes them and writes their metrics,
whatever the order of ``config.tasks``; :func:`chosen` picks a config's tasks in that order.
A task is ``task(model, tokenizer, spec, *, store, judge) -> {metric name: compute}`` (``spec``:
the typed :class:`~ssah_jax.evaluation.tasks.spec.EvalSpec`, ``judge`` the run's judge of the
attacks; see :mod:`ssah_jax.evaluation.tasks.base`);
each family names its metrics in a report (:func:`label`) and every metric is reported by its
headline value (:func:`headline`); the safety family is in
:mod:`~ssah_jax.evaluation.tasks.safety`, the utility family in
:mod:`~ssah_jax.evaluation.tasks.utility`, each with the recipe that chooses its records
(:func:`harmful_records`, :func:`perplexity_records`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ssah_jax import runs
from ssah_jax.evaluation.intervals import Rate, shown
from ssah_jax.evaluation.tasks import safety, utility
from ssah_jax.evaluation.tasks.base import Entries, RowStore, Task, first, load_records, spread
from ssah_jax.evaluation.tasks.safety import ASR_SETTINGS, harmful_records
from ssah_jax.evaluation.tasks.spec import EvalSpec
from ssah_jax.evaluation.tasks.utility import perplexity_records

TASKS: dict[str, Task] = {
    "asr": safety.asr,  # asr_no_system, asr_system: ASR on the harmful set
    "prefill": safety.prefill,  # prefill_<k>: ASR under the prefilling attack
    "sweep": safety.sweep,  # sweep: ASR under a grid of sampling settings
    "overrefusal": safety.overrefusal,  # overrefusal: refusal rate on XSTest's safe prompts
    "classifier": safety.classifier,  # classifier: a safety signal's AUROC, harmful vs safe prompts
    "mmlu": utility.mmlu,  # mmlu, sst2: zero-shot multiple-choice accuracy by log-likelihood
    "sst2": utility.sst2,
    "gsm8k": utility.gsm8k,  # gsm8k: exact match of the final number, greedy
    "perplexity": utility.perplexity,  # perplexity: held-out benign responses
}


# The field a metric entry is reported by, one per summary (``summarise_asr``: asr,
# ``summarise_sweep``: asr_any_setting, ``summarise_refusal_rate``, ``summarise_accuracy``,
# ``summarise_perplexity``; the classifier task's ``auroc``); every entry also holds its count ``n``.
HEADLINE_FIELDS = ("asr", "asr_any_setting", "refusal_rate", "auroc", "accuracy", "perplexity")
RATE_FIELDS = ("asr", "asr_any_setting", "refusal_rate", "accuracy")  # the fractions among them (shown in percent)


def headline(entry: dict) -> tuple[float, int]:
    """``(value, n)`` of a metric entry of ``metrics.json``: the value it is reported by (a
    rate, or a perplexity) and how many records it is over."""
    field = next((f for f in HEADLINE_FIELDS if f in entry), None)
    if field is None:
        raise KeyError(f"a metric entry without any of {HEADLINE_FIELDS}: {sorted(entry)}")
    return entry[field], entry["n"]


def value_of(metrics: dict, name: str) -> float | None:
    """The headline value of metric ``name`` of a ``metrics.json`` (None: not measured)."""
    return headline(metrics[name])[0] if name in metrics else None


def rate_of(metrics: dict, name: str) -> Rate | None:
    """Metric ``name`` of a ``metrics.json`` as a :class:`~ssah_jax.evaluation.intervals.Rate`
    (its headline value over its ``n``; None: not measured)."""
    return Rate(*headline(metrics[name])) if name in metrics else None


def shown_metric(metrics: dict, name: str) -> str:
    """A report's cell of metric ``name`` of a ``metrics.json``: a perplexity to two decimals, a
    rate with its Wilson 95% interval (``13.5% [8.1, 21.8]``), or a dash when not measured."""
    if name in metrics and "perplexity" in metrics[name]:
        return f"{metrics[name]['perplexity']:.2f}"
    if name in metrics and "auroc" in metrics[name]:
        return f"{metrics[name]['auroc']:.3f}"
    return shown(rate_of(metrics, name))


def label(spec: EvalSpec, name: str, entry: dict) -> str:
    """A report's name of metric ``name`` (its ``entry`` of metrics.json), from its task family."""
    for family in (safety, utility):
        found = family.label(spec, name, entry)
        if found is not None:
            return found
    raise KeyError(f"no evaluation task writes the metric {name!r}")


def get(name: str, key: str = "config.tasks") -> Task:
    """The task called ``name``; an unknown name is a ConfigError naming ``key`` (where the
    name came from) and the known tasks."""
    if name not in TASKS:
        raise runs.ConfigError(f"{key}: unknown evaluation task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]


def chosen(names: Sequence[str], key: str = "config.tasks") -> dict[str, Task]:
    """The tasks called ``names``, in the order of ``TASKS`` (the order a run computes them);
    an unknown name is a ConfigError naming ``key``."""
    for name in names:
        get(name, key)
    return {name: task for name, task in TASKS.items() if name in names}


__all__ = [
    "ASR_SETTINGS",
    "HEADLINE_FIELDS",
    "RATE_FIELDS",
    "TASKS",
    "Entries",
    "EvalSpec",
    "RowStore",
    "Task",
    "chosen",
    "first",
    "get",
    "harmful_records",
    "headline",
    "label",
    "load_records",
    "perplexity_records",
    "rate_of",
    "shown_metric",
    "spread",
    "value_of",
]
