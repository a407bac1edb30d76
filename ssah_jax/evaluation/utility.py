"""Utility metrics: zero-shot multiple choice by log-likelihood (MMLU, SST-2), GSM8K exact
match on the final number, and perplexity on held-out responses."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from ssah_jax.data import Record
from ssah_jax.data.batching import batch_dataset, bucket_lengths
from ssah_jax.data.tokenize import encode_records
from ssah_jax.evaluation.likelihood import choice_logprobs, token_logprobs
from ssah_jax.generation import Responder, respond
from ssah_jax.models import CausalLM
from ssah_jax.sharding import put_rows

LETTERS = "ABCD"


def mmlu_prompt(record: Record) -> str:
    """Zero-shot MMLU in the format of Hendrycks et al. (2021); the answer is a letter."""
    subject = str(record.meta.get("subject", "")).replace("_", " ")
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, record.choices))
    return f"The following is a multiple choice question about {subject}.\n\n{record.prompt}\n{options}Answer:"


def sst2_prompt(record: Record) -> str:
    return f"Review: {record.prompt}\nSentiment (positive or negative):"


MULTIPLE_CHOICE = {
    # name: (prompt builder, choices of a record as continuations)
    "mmlu": (mmlu_prompt, lambda r: [f" {letter}" for letter in LETTERS[: len(r.choices)]]),
    "sst2": (sst2_prompt, lambda r: [f" {c}" for c in r.choices]),
}


def multiple_choice_rows(
    model: CausalLM, tokenizer: Any, records: Sequence[Record], task: str, *, batch_size: int = 8
) -> list[dict]:
    """One row per record: the predicted choice (highest log-likelihood) and whether it is right."""
    prompt_fn, choices_fn = MULTIPLE_CHOICE[task]
    scores = choice_logprobs(model, tokenizer, [prompt_fn(r) for r in records],
                             [choices_fn(r) for r in records], batch_size=batch_size)
    return [
        {"prompt": r.prompt, "label": r.label, "pred": int(s.argmax()), "correct": int(s.argmax()) == r.label,
         "logprobs": [round(float(x), 4) for x in s]}
        for r, s in zip(records, scores)
    ]


def summarise_accuracy(rows: Sequence[dict]) -> dict:
    if not rows:
        raise ValueError("no rows to summarise")
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows)}


GSM8K_INSTRUCTION = "\nSolve the problem step by step, then give the final answer as a number after '####'."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer's final number: the first after the last '####' if any, else the last one."""
    if "####" in text:
        after = _NUMBER.findall(text.rsplit("####", 1)[1])
        if after:
            return _clean(after[0])
    found = _NUMBER.findall(text)
    return _clean(found[-1]) if found else None


def _clean(number: str) -> str:
    number = number.replace(",", "")
    return number[: -len(".0")] if number.endswith(".0") else number


def gsm8k_rows(model: CausalLM | Responder, tokenizer: Any, records: Sequence[Record], **sampling: Any
               ) -> list[dict]:
    """One row per problem: the answer, its final number and whether it is right (and a
    :class:`~ssah_jax.generation.Responder`'s own records)."""
    outs = respond(model, tokenizer, [r.prompt + GSM8K_INSTRUCTION for r in records], **sampling)
    rows = []
    for r, out in zip(records, outs):
        pred = final_number(out["text"])
        rows.append({"prompt": r.prompt, "label": r.label, "answer": out["text"], "pred": pred,
                     "correct": pred is not None and pred == r.label, **{k: v for k, v in out.items() if k != "text"}})
    return rows


def perplexity_rows(
    model: CausalLM, tokenizer: Any, records: Sequence[Record], *, max_length: int, batch_size: int = 8
) -> list[dict]:
    """Summed negative log-likelihood and token count of each record's response (response
    tokens only, through the chat template, as in training)."""
    examples, _ = encode_records(tokenizer, records, max_length=max_length)
    if len(examples) != len(records):
        raise ValueError(f"{len(records) - len(examples)} records have prompts longer than {max_length} tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = batch_dataset(examples, batch_size=batch_size, pad_id=pad_id, buckets=bucket_lengths(max_length),
                            shuffle=False, process_index=0, process_count=1)
    graphdef, state = nnx.split(model)
    rows = []
    for b in range(len(batches)):
        batch = batches[b]
        logp = np.asarray(token_logprobs(graphdef, state, *put_rows((batch["input_ids"], batch["attention_mask"]))))
        for i in range(min(batch_size, len(examples) - b * batch_size)):
            mask = batch["loss_mask"][i] > 0
            rows.append({"nll": float(-logp[i][mask].sum()), "tokens": int(mask.sum())})
    for row, record in zip(rows, records):
        row["prompt"] = record.prompt
    return rows


def summarise_perplexity(rows: Sequence[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    if not tokens:
        raise ValueError("no response tokens to compute perplexity on")
    return {"perplexity": math.exp(sum(r["nll"] for r in rows) / tokens), "tokens": tokens, "n": len(rows)}
