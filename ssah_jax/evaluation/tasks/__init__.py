"""The evaluation tasks, by name (the names of ``config.tasks``), like big_vision's evaluators.

``TASKS`` holds each task in the order a run computes them and writes their metrics,
whatever the order of ``config.tasks``; :func:`chosen` picks a config's tasks in that order.
A task is ``task(model, tokenizer, config, *, data_dir, store) -> {metric name: compute}``
(see :mod:`ssah_jax.evaluation.tasks.base`); the safety family is in
:mod:`~ssah_jax.evaluation.tasks.safety`, the utility family in
:mod:`~ssah_jax.evaluation.tasks.utility`, each with the recipe that chooses its records
(:func:`harmful_records`, :func:`perplexity_records`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ssah_jax import runs
from ssah_jax.evaluation.tasks import safety, utility
from ssah_jax.evaluation.tasks.base import Entries, RowStore, Task, first, load_records, spread
from ssah_jax.evaluation.tasks.safety import ASR_SETTINGS, harmful_records
from ssah_jax.evaluation.tasks.utility import perplexity_records

TASKS: dict[str, Task] = {
    "asr": safety.asr,  # asr_no_system, asr_system: ASR on the harmful set
    "prefill": safety.prefill,  # prefill_<k>: ASR under the prefilling attack
    "sweep": safety.sweep,  # sweep: ASR under a grid of sampling settings
    "overrefusal": safety.overrefusal,  # overrefusal: refusal rate on XSTest's safe prompts
    "mmlu": utility.mmlu,  # mmlu, sst2: zero-shot multiple-choice accuracy by log-likelihood
    "sst2": utility.sst2,
    "gsm8k": utility.gsm8k,  # gsm8k: exact match of the final number, greedy
    "perplexity": utility.perplexity,  # perplexity: held-out benign responses
}


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
    "TASKS",
    "Entries",
    "RowStore",
    "Task",
    "chosen",
    "first",
    "get",
    "harmful_records",
    "load_records",
    "perplexity_records",
    "spread",
]
