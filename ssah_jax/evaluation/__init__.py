"""Evaluation: refusal judge, the judges of an attack's success (``judges``: keyword, HarmBench's
classifier, Llama Guard 3), ASR with attacks, over-refusal and utility metrics.

Row functions (``*_rows``) take a batch of records and return one JSON-able dict per record,
so experiments can stream them to disk and resume; ``summarise_*`` turn rows into metrics.
``tasks`` is the registry of evaluation tasks by name (``tasks.TASKS``, ``tasks.get``): each
chooses its records (``harmful_records``, ``perplexity_records``), writes their rows resumably
and returns its metrics.
"""

from ssah_jax.evaluation.judge import REFUSAL_PHRASES, is_refusal, judgement
from ssah_jax.evaluation.judges import JUDGES, Judge, load_judge
from ssah_jax.evaluation.likelihood import choice_logprobs, encoded_choice_logprobs, token_logprobs
from ssah_jax.evaluation.safety import (
    LLAMA2_SYSTEM_PROMPT,
    answer_rows,
    attacked,
    prefill_prefix,
    setting_name,
    summarise_asr,
    summarise_refusal_rate,
    summarise_sweep,
    sweep_settings,
)
from ssah_jax.evaluation.tasks import harmful_records, perplexity_records
from ssah_jax.evaluation.utility import (
    final_number,
    gsm8k_rows,
    mmlu_prompt,
    multiple_choice_rows,
    perplexity_rows,
    sst2_prompt,
    summarise_accuracy,
    summarise_perplexity,
)

__all__ = [
    "JUDGES",
    "LLAMA2_SYSTEM_PROMPT",
    "REFUSAL_PHRASES",
    "Judge",
    "answer_rows",
    "attacked",
    "choice_logprobs",
    "encoded_choice_logprobs",
    "final_number",
    "gsm8k_rows",
    "harmful_records",
    "is_refusal",
    "judgement",
    "load_judge",
    "mmlu_prompt",
    "multiple_choice_rows",
    "perplexity_records",
    "perplexity_rows",
    "prefill_prefix",
    "setting_name",
    "sst2_prompt",
    "summarise_accuracy",
    "summarise_asr",
    "summarise_perplexity",
    "summarise_refusal_rate",
    "summarise_sweep",
    "sweep_settings",
    "token_logprobs",
]
