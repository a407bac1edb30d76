"""Safety tasks: ASR on the harmful set (``asr``), the prefilling attack (``prefill``), the
decoding sweep (``sweep``) and over-refusal on benign prompts that sound harmful (``overrefusal``); and
:func:`harmful_records`, the harmful prompts the ``asr`` task answers.

Sampled answers of a chunk of records use the seed ``config.seed + <index of its first record>``.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from ssah_jax import runs
from ssah_jax.data import Record, load_mixture
from ssah_jax.evaluation.safety import (
    LLAMA2_SYSTEM_PROMPT,
    answer_rows,
    prefill_prefix,
    setting_name,
    summarise_asr,
    summarise_refusal_rate,
    summarise_sweep,
    sweep_settings,
)
from ssah_jax.evaluation.tasks.base import Entries, RowFn, RowStore, first

ASR_SETTINGS = ("no_system", "system")  # the asr task: without / with the safety system prompt


def harmful_records(config: ConfigDict, data_dir: str | None) -> list[Record]:
    """The ASR prompts: ``harmful.dataset`` (a dataset or a mixture ``"name:count,..."``)
    without the prompts of ``harmful.exclude`` (datasets a model was trained on). A dataset
    that does not load is a ConfigError naming ``config.harmful``."""
    return untrained(config, data_dir, config.harmful.dataset, "harmful.dataset")


def untrained(config: ConfigDict, data_dir: str | None, dataset: str, key: str) -> list[Record]:
    """The records of ``dataset`` (a dataset or a mixture, the value of ``config.<key>``)
    without the prompts of ``harmful.exclude`` (what the model was trained on): the harmful
    prompts, and those of the prefilling attack and the decoding sweep."""
    exclude = config.harmful.exclude
    try:
        excluded = [r.prompt for r in load_mixture(exclude, data_dir)[0]] if exclude else []
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.harmful.exclude={exclude!r}: {e}") from None
    try:
        return load_mixture(dataset, data_dir, exclude=excluded)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.{key}={dataset!r}: {e}") from None


def _answers(model: Any, tokenizer: Any, config: ConfigDict, **kw: Any) -> RowFn:
    """Answers and refusal verdicts, ``config.max_new_tokens`` new tokens, seeded per chunk."""
    return lambda batch, start: answer_rows(model, tokenizer, batch, seed=config.seed + start,
                                            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, **kw)


def asr(model: Any, tokenizer: Any, config: ConfigDict, *, data_dir: str | None, store: RowStore) -> Entries:
    """``asr_<setting>`` for each of ``harmful.settings``: the first ``harmful.limit`` harmful
    prompts answered without (``no_system``) or with (``system``) the safety system prompt
    (``config.system_prompt``, empty: Llama-2-chat's default)."""
    harmful = first(harmful_records(config, data_dir), config.harmful.limit)
    system = config.system_prompt or LLAMA2_SYSTEM_PROMPT
    entries = {}
    for setting in config.harmful.settings:
        kw = dict(system_prompt=system) if setting == "system" else {}
        fn = _answers(model, tokenizer, config, **kw)
        entries[f"asr_{setting}"] = lambda name=f"asr_{setting}", fn=fn: summarise_asr(
            store.rows(name, harmful, fn, config.batch_size))
    return entries


def prefill(model: Any, tokenizer: Any, config: ConfigDict, *, data_dir: str | None, store: RowStore) -> Entries:
    """``prefill_<k>`` for each k of ``prefill.tokens``: ASR on the first ``prefill.limit``
    prompts of ``prefill.dataset`` (without those of ``harmful.exclude``) when the answer is
    forced to start with the first k tokens of the target."""
    targets = first(untrained(config, data_dir, config.prefill.dataset, "prefill.dataset"), config.prefill.limit)
    entries = {}
    for k in config.prefill.tokens:
        def prefilled(batch, start, k=k):
            prefixes = [prefill_prefix(tokenizer, r, k) for r in batch]
            return answer_rows(model, tokenizer, batch, answer_prefixes=prefixes,
                               max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)

        entries[f"prefill_{k}"] = lambda name=f"prefill_{k}", fn=prefilled, k=k: {
            **summarise_asr(store.rows(name, targets, fn, config.batch_size)), "tokens": k}
    return entries


def sweep(model: Any, tokenizer: Any, config: ConfigDict, *, data_dir: str | None, store: RowStore) -> Entries:
    """``sweep``: the first ``sweep.limit`` prompts of ``sweep.dataset`` (without those of
    ``harmful.exclude``) answered under every
    sampling setting of the grid ``sweep.{temperatures, top_ps, top_ks}``; a prompt is broken
    if any setting breaks it (rows: ``sweep_<setting>``)."""
    prompts = first(untrained(config, data_dir, config.sweep.dataset, "sweep.dataset"), config.sweep.limit)
    settings = sweep_settings(config.sweep.temperatures, config.sweep.top_ps, config.sweep.top_ks)
    return {"sweep": lambda: summarise_sweep({
        setting_name(s): store.rows(f"sweep_{setting_name(s)}", prompts, _answers(model, tokenizer, config, **s),
                                    config.batch_size)
        for s in settings
    })}


def overrefusal(model: Any, tokenizer: Any, config: ConfigDict, *, data_dir: str | None, store: RowStore) -> Entries:
    """``overrefusal``: the refusal rate on the first ``overrefusal.limit`` safe prompts of
    ``overrefusal.dataset`` (a dataset or mixture; XSTest's prompts labelled unsafe are left out)."""
    try:
        records = load_mixture(config.overrefusal.dataset, data_dir)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.overrefusal.dataset={config.overrefusal.dataset!r}: {e}") from None
    safe = first([r for r in records if r.label != "unsafe"], config.overrefusal.limit)
    return {"overrefusal": lambda: summarise_refusal_rate(
        store.rows("overrefusal", safe, _answers(model, tokenizer, config), config.batch_size))}
