"""Utility tasks: zero-shot multiple choice by log-likelihood (``mmlu``, ``sst2``), GSM8K
exact match (``gsm8k``) and perplexity of held-out benign responses (``perplexity``); and
:func:`perplexity_records`, the responses the ``perplexity`` task scores.

Given a :class:`~ssah_jax.generation.Responder` (a model behind its own decoding), GSM8K
answers through that decoding and the log-likelihood tasks score its language model itself.
No utility task asks the run's judge (the tasks' ``judge``): it judges attacks."""

from __future__ import annotations

from typing import Any

from ssah_jax.data import Record, with_responses
from ssah_jax.evaluation.judges import Judge
from ssah_jax.evaluation.tasks.base import Entries, RowStore, first, load_records, spread
from ssah_jax.evaluation.tasks.spec import EvalSpec, Perplexity
from ssah_jax.evaluation.utility import (
    gsm8k_rows,
    multiple_choice_rows,
    perplexity_rows,
    summarise_accuracy,
    summarise_perplexity,
)
from ssah_jax.generation import language_model


def perplexity_records(spec: Perplexity, data_dir: str | None, limit: int | None = None) -> list[Record]:
    """The held-out benign responses of the perplexity task: the *last* ``limit`` records
    (``spec.limit`` by default; 0 = all) of ``spec.dataset`` with a usable response (training
    recipes take theirs from the front)."""
    ok = with_responses(load_records(data_dir, spec.dataset, on_error="skip"))
    limit = spec.limit if limit is None else limit
    return ok[-limit:] if limit else ok


def _multiple_choice(name: str, split: str):
    def task(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
        records = spread(load_records(spec.data_dir, name, split), getattr(spec, name).limit)

        def scored(batch, start):
            return multiple_choice_rows(language_model(model), tokenizer, batch, name, batch_size=spec.batch_size)

        return {name: lambda: summarise_accuracy(store.rows(name, records, scored, 8 * spec.batch_size))}

    task.__name__ = task.__qualname__ = name
    task.__doc__ = (f"``{name}``: zero-shot accuracy by log-likelihood on ``{name}.limit`` questions of its "
                    f"{split} split, evenly spread over it (0: all).")
    return task


mmlu = _multiple_choice("mmlu", "test")
sst2 = _multiple_choice("sst2", "dev")


def gsm8k(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``gsm8k``: exact match of the final number on the first ``gsm8k.limit`` test problems,
    greedy, ``gsm8k.max_new_tokens`` new tokens."""
    problems = first(load_records(spec.data_dir, "gsm8k", "test"), spec.gsm8k.limit)

    def solved(batch, start):
        return gsm8k_rows(model, tokenizer, batch, max_new_tokens=spec.gsm8k.max_new_tokens,
                          batch_size=spec.batch_size)

    return {"gsm8k": lambda: summarise_accuracy(store.rows("gsm8k", problems, solved, spec.batch_size))}


def perplexity(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``perplexity``: perplexity of :func:`perplexity_records` (response tokens only; each
    example encoded to at most ``perplexity.max_length`` tokens)."""
    heldout = perplexity_records(spec.perplexity, spec.data_dir)

    def scored(batch, start):
        return perplexity_rows(language_model(model), tokenizer, batch, max_length=spec.perplexity.max_length,
                               batch_size=spec.batch_size)

    return {"perplexity": lambda: summarise_perplexity(store.rows("perplexity", heldout, scored,
                                                                  4 * spec.batch_size))}


def label(spec: EvalSpec, name: str, entry: dict) -> str | None:
    """A report's name of the utility metric ``name``, None for another family's metric."""
    return {
        "mmlu": "MMLU accuracy (zero-shot, log-likelihood)",
        "sst2": "SST-2 dev accuracy (zero-shot, log-likelihood)",
        "gsm8k": f"GSM8K exact match ({spec.gsm8k.max_new_tokens} new tokens)",
        "perplexity": f"perplexity, held-out {spec.perplexity.dataset} responses",
    }.get(name)
