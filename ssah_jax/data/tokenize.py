"""Chat-template tokenisation with response-only loss masks.

A training example is the whole conversation (system, user, assistant) rendered by the
tokenizer's own chat template. Its loss mask covers the assistant's response and the
end-of-turn token that follows it (what the model must learn to emit to stop), and nothing
of the template or the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssah_jax.data.sources import Record


@dataclasses.dataclass(frozen=True)
class Example:
    """``ids`` int32 ``[n]``; ``loss_mask`` bool ``[n]``: token ``t`` is a training target
    (predicted from the logits at ``t - 1``)."""

    ids: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    examples: int
    truncated: int  # response cut to fit max_length (the prompt is always kept whole)
    dropped: int  # prompt alone longer than max_length
    max_length: int

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.truncated} with the response truncated to "
                f"{self.max_length} tokens, {self.dropped} dropped (prompt longer than that)")


def messages(record: Record, system_prompt: str | None = None, *, with_response: bool = True) -> list[dict]:
    """Chat messages of a record. The record's own system prompt wins over ``system_prompt``."""
    system = record.system if record.system is not None else system_prompt
    out = [{"role": "system", "content": system}] if system is not None else []
    out.append({"role": "user", "content": record.prompt})
    if with_response:
        if record.response is None:
            raise ValueError(f"{record.where or 'record'}: has no response to train on")
        # Stripped: surrounding whitespace would merge with the template's own tokens.
        out.append({"role": "assistant", "content": record.response.strip()})
    return out


def encode_record(
    tokenizer: Any, record: Record, *, max_length: int, system_prompt: str | None = None
) -> tuple[Example | None, bool]:
    """``(example, truncated)``; ``example`` is None when the prompt alone exceeds ``max_length``."""
    prefix = tokenizer.apply_chat_template(
        messages(record, system_prompt, with_response=False), add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(messages(record, system_prompt), tokenize=False)
    if not full.startswith(prefix):
        raise ValueError(
            f"{record.where}: the chat template renders the conversation without its generation "
            "prompt as a prefix; response-only loss masks need a template that appends turns"
        )
    content = record.response.strip()
    start = full.find(content, len(prefix)) if content else len(prefix)
    if start < 0:
        raise ValueError(f"{record.where}: the chat template altered the response text")
    end = start + len(content)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    in_response = (offsets[:, 1] > start) & (offsets[:, 0] < end)
    after = np.flatnonzero(offsets[:, 0] >= end)
    if len(after) == 0 or int(ids[after[0]]) not in set(tokenizer.all_special_ids):
        raise ValueError(
            f"{record.where}: the chat template puts no special end-of-turn token after the response"
        )
    loss_mask = in_response.copy()
    loss_mask[after[0]] = True
    prompt_len = int(np.flatnonzero(loss_mask)[0]) if loss_mask.any() else len(ids)
    if prompt_len >= max_length:
        return None, False
    truncated = len(ids) > max_length
    return Example(ids[:max_length], loss_mask[:max_length]), truncated


def encode_records(
    tokenizer: Any, records: Sequence[Record], *, max_length: int, system_prompt: str | None = None
) -> tuple[list[Example], EncodeStats]:
    """Encodes every record; the stats say how many were truncated or dropped."""
    examples, truncated, dropped = [], 0, 0
    for record in records:
        example, cut = encode_record(tokenizer, record, max_length=max_length, system_prompt=system_prompt)
        if example is None:
            dropped += 1
            continue
        truncated += cut
        examples.append(example)
    return examples, EncodeStats(len(examples), truncated, dropped, max_length)
