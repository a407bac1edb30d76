"""Safety tasks: ASR on the harmful set (``asr``), the prefilling attack (``prefill``), the
decoding sweep (``sweep``), over-refusal on benign prompts that sound harmful (``overrefusal``) and
a deployed safety signal's first check as a classifier (``classifier``); and
:func:`harmful_records`, the harmful prompts the ``asr`` task answers.

Sampled answers of a chunk of records use the seed ``spec.seed + <index of its first record>``.
The rows of the attacks (``asr``, ``prefill``, ``sweep``) carry the run's judge's verdict
(``harmful``, ``judge``) beside its refusal verdict ``refused`` (the keyword judge's rules);
over-refusal's carry ``refused`` only. Each task's settings are typed
(:class:`~ssah_jax.evaluation.tasks.spec.EvalSpec`); :func:`label` names its metrics in a report.
"""

from __future__ import annotations

from typing import Any

from ssah_jax import runs
from ssah_jax.data import Record, load_mixture
from ssah_jax.evaluation.judges import Judge
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
from ssah_jax.evaluation.tasks.spec import EvalSpec
from ssah_jax.signals import SignalModel, classify, separation

ASR_SETTINGS = ("no_system", "system")  # the asr task: without / with the safety system prompt


def harmful_records(dataset: str, exclude: str, data_dir: str | None) -> list[Record]:
    """The ASR prompts: ``dataset`` (a dataset or a mixture ``"name:count,..."``) without the
    prompts of ``exclude`` (datasets a model was trained on). A dataset that does not load is a
    ConfigError naming ``config.harmful``."""
    return untrained(dataset, exclude, data_dir, "harmful.dataset")


def untrained(dataset: str, exclude: str, data_dir: str | None, key: str) -> list[Record]:
    """The records of ``dataset`` (a dataset or a mixture, the value of ``config.<key>``)
    without the prompts of ``exclude`` (``harmful.exclude``: what the model was trained on): the
    harmful prompts, and those of the prefilling attack and the decoding sweep."""
    try:
        excluded = [r.prompt for r in load_mixture(exclude, data_dir)[0]] if exclude else []
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.harmful.exclude={exclude!r}: {e}") from None
    try:
        return load_mixture(dataset, data_dir, exclude=excluded)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.{key}={dataset!r}: {e}") from None


def _answers(model: Any, tokenizer: Any, spec: EvalSpec, **kw: Any) -> RowFn:
    """Answers and their verdicts (``judge=``: an attack's), ``spec.max_new_tokens`` new tokens,
    seeded per chunk."""
    return lambda batch, start: answer_rows(model, tokenizer, batch, seed=spec.seed + start,
                                            max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, **kw)


def asr(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``asr_<setting>`` for each of ``harmful.settings``: the first ``harmful.limit`` harmful
    prompts answered without (``no_system``) or with (``system``) the safety system prompt
    (``system_prompt``, empty: Llama-2-chat's default)."""
    h = spec.harmful
    harmful = first(harmful_records(h.dataset, h.exclude, spec.data_dir), h.limit)
    system = spec.system_prompt or LLAMA2_SYSTEM_PROMPT
    entries = {}
    for setting in h.settings:
        kw = dict(system_prompt=system) if setting == "system" else {}
        fn = _answers(model, tokenizer, spec, judge=judge, **kw)
        entries[f"asr_{setting}"] = lambda name=f"asr_{setting}", fn=fn: summarise_asr(
            store.rows(name, harmful, fn, spec.batch_size))
    return entries


def prefill(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``prefill_<k>`` for each k of ``prefill.tokens``: ASR on the first ``prefill.limit``
    prompts of ``prefill.dataset`` (without those of ``harmful.exclude``) when the answer is
    forced to start with the first k tokens of the target."""
    p = spec.prefill
    targets = first(untrained(p.dataset, spec.harmful.exclude, spec.data_dir, "prefill.dataset"), p.limit)
    entries = {}
    for k in p.tokens:
        def prefilled(batch, start, k=k):
            prefixes = [prefill_prefix(tokenizer, r, k) for r in batch]
            return answer_rows(model, tokenizer, batch, answer_prefixes=prefixes, judge=judge,
                               max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size)

        entries[f"prefill_{k}"] = lambda name=f"prefill_{k}", fn=prefilled, k=k: {
            **summarise_asr(store.rows(name, targets, fn, spec.batch_size)), "tokens": k}
    return entries


def sweep(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``sweep``: the first ``sweep.limit`` prompts of ``sweep.dataset`` (without those of
    ``harmful.exclude``) answered under every
    sampling setting of the grid ``sweep.{temperatures, top_ps, top_ks}``; a prompt is broken
    if any setting breaks it (rows: ``sweep_<setting>``)."""
    w = spec.sweep
    prompts = first(untrained(w.dataset, spec.harmful.exclude, spec.data_dir, "sweep.dataset"), w.limit)
    settings = sweep_settings(w.temperatures, w.top_ps, w.top_ks)
    return {"sweep": lambda: summarise_sweep({
        setting_name(s): store.rows(f"sweep_{setting_name(s)}", prompts,
                                    _answers(model, tokenizer, spec, judge=judge, **s), spec.batch_size)
        for s in settings
    })}


def safe_records(spec: EvalSpec) -> list[Record]:
    """The over-refusal prompts: the first ``overrefusal.limit`` safe prompts of
    ``overrefusal.dataset`` (a dataset or mixture; XSTest's prompts labelled unsafe are left out)."""
    o = spec.overrefusal
    try:
        records = load_mixture(o.dataset, spec.data_dir)[0]
    except (KeyError, ValueError) as e:
        raise runs.ConfigError(f"config.overrefusal.dataset={o.dataset!r}: {e}") from None
    return first([r for r in records if r.label != "unsafe"], o.limit)


def overrefusal(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``overrefusal``: the refusal rate on :func:`safe_records` by ``judge``'s refusal verdict
    (the keyword judge's rules, whatever the judge of attacks); for a safety signal's answers
    also the share into which it inserted its refusal."""
    safe = safe_records(spec)
    return {"overrefusal": lambda: summarise_refusal_rate(
        store.rows("overrefusal", safe, _answers(model, tokenizer, spec, judge=judge, attack=False),
                   spec.batch_size))}


def classifier(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``classifier``: how well a deployed safety signal's first check tells the harmful prompts
    of the ``asr`` task (:func:`harmful_records`, no system prompt) from the safe ones of
    ``overrefusal`` (:func:`safe_records`): AUROC of its p(malicious), and the rates at the
    decoding's threshold (:func:`ssah_jax.signals.separation`). Forward passes only; needs a
    model deployed with its signal (``signal.file``, or a finetune run that trains one)."""
    if not isinstance(model, SignalModel):
        raise runs.ConfigError("config.tasks: the classifier task needs a model deployed with its safety signal "
                               "(config.signal.file)")
    h = spec.harmful
    harmful, safe = first(harmful_records(h.dataset, h.exclude, spec.data_dir), h.limit), safe_records(spec)

    def compute() -> dict:
        p = [classify(model.model, model.signal, tokenizer, [r.prompt for r in records], batch_size=spec.batch_size)
             for records in (harmful, safe)]
        return {**separation(*p, model.threshold), "n": len(harmful) + len(safe)}

    return {"classifier": compute}


def label(spec: EvalSpec, name: str, entry: dict) -> str | None:
    """A report's name of the safety metric ``name`` (its ``entry`` of metrics.json), None for
    another family's metric."""
    h = spec.harmful
    harmful = h.dataset + (f" without the prompts of {h.exclude}" if h.exclude else "")
    if name.startswith("prefill_"):
        return f"ASR, {spec.prefill.dataset}, prefilling attack ({entry['tokens']} target tokens)"
    return {
        "asr_no_system": f"ASR, {harmful}, no system prompt (template default)",
        "asr_system": f"ASR, {harmful}, safety system prompt",
        "sweep": f"ASR, {spec.sweep.dataset}, decoding sweep (any setting)",
        "overrefusal": ("over-refusal, XSTest safe prompts" if spec.overrefusal.dataset == "xstest"
                        else f"over-refusal, {spec.overrefusal.dataset}") + " (refusal rate)",
        "classifier": f"safety signal's first check, AUROC of {harmful} vs {spec.overrefusal.dataset} safe prompts",
    }.get(name)
