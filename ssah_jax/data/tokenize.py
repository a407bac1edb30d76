"""The one chat encoder: the tokenizer's own chat template, with a role per token and, for
training examples, a response-only loss mask.

Every consumer of chat conversations encodes them here (training, generation, probing, the
generated and perplexity tasks of evaluation), so a prompt has the same ids everywhere (the
multiple-choice tasks score raw text). A token's :class:`Role` says which part of the rendered
conversation it comes from: the system prompt, the user's prompt, the template's own tokens
(BOS, turn markers), the assistant header (everything from the end of the user's turn to where
the answer starts), or the answer. A training example's loss mask covers the assistant's
response and the end-of-turn token that follows it (what the model must learn to emit to stop),
and nothing of the template or the prompt.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssah_jax.data.records import Record


class Role(enum.IntEnum):
    """The part of a conversation a token comes from (``PADDING`` fills batches)."""

    PADDING = 0
    TEMPLATE = 1  # BOS, turn markers and separators the template adds around the content
    SYSTEM = 2
    USER = 3
    HEADER = 4  # from the end of the user's prompt to where the answer starts
    RESPONSE = 5  # the answer (in a prompt: the answer prefix, if any)


@dataclasses.dataclass(frozen=True)
class Chat:
    """An encoded prompt: the rendered ``text``, its ``ids`` (int32 ``[n]``) and ``roles``
    (int8 ``[n]``, :class:`Role` values)."""

    text: str
    ids: np.ndarray
    roles: np.ndarray


@dataclasses.dataclass(frozen=True)
class Example:
    """``ids`` int32 ``[n]``; ``loss_mask`` bool ``[n]``: token ``t`` is a training target
    (predicted from the logits at ``t - 1``); ``roles`` int8 ``[n]`` (:class:`Role`); ``label``:
    the example's class for a classifier trained alongside (the safety signal: 1 malicious, 0
    benign; set it with ``dataclasses.replace``); ``answer_label``: the class of its response
    alone, for a classifier that reads windows of the answer (the signal's rechecks: 1 a harmful
    compliance, 0 a benign answer or a refusal)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    roles: np.ndarray
    label: int = 0
    answer_label: int = 0


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


# Stand-ins for the contents when the template is rendered to locate them (private-use characters
# no prompt or template contains).
_MARKS = {Role.SYSTEM: "\ue000system\ue001", Role.USER: "\ue000user\ue001"}


def _content_spans(tokenizer: Any, record: Record, system_prompt: str | None, head: str,
                   where: str) -> list[tuple[Role, int, int]]:
    """Character spans of the system prompt and the user's prompt in ``head`` (the rendered
    prompt with its generation prompt), from a rendering with stand-ins for them: the contents
    sit where the stand-ins do, so text of the template that looks like a prompt is never taken
    for it. A template may trim a content. If ``head`` cannot be rebuilt from the stand-in
    rendering, the contents are not located (a warning; their tokens count as template)."""
    system = record.system if record.system is not None else system_prompt
    contents = {Role.SYSTEM: system, Role.USER: record.prompt}
    marked = Record(prompt=_MARKS[Role.USER], system=None if system is None else _MARKS[Role.SYSTEM])
    template = tokenizer.apply_chat_template(messages(marked, with_response=False), add_generation_prompt=True,
                                             tokenize=False)
    pieces = re.split("(" + "|".join(map(re.escape, _MARKS.values())) + ")", template)
    roles = {mark: role for role, mark in _MARKS.items()}
    spans, pos = [], 0
    for i, piece in enumerate(pieces):
        if piece not in roles:
            if not head.startswith(piece, pos):
                break
            pos += len(piece)
            continue
        content, following = contents[roles[piece]], pieces[i + 1]
        fits = [c for c in (content, content.strip()) if head.startswith(c + following, pos)]
        if not fits:
            break
        spans.append((roles[piece], pos, pos + len(fits[0])))
        pos += len(fits[0])
    else:
        if pos == len(head):
            return spans
    warnings.warn(f"{where}: the chat template changes the prompt beyond trimming it; its tokens get the "
                  "TEMPLATE role", stacklevel=3)
    return []


def _roles(offsets: np.ndarray, spans: Sequence[tuple[Role, int, int]], answer: tuple[int, int]) -> np.ndarray:
    """Roles of the tokens at ``offsets``: the content ``spans``, the answer's character span, the
    assistant header from the end of the user's prompt to the answer, template elsewhere."""
    users = [end for role, _, end in spans if role == Role.USER]
    header = (users[-1] if users else answer[0], answer[0])
    roles = np.full(len(offsets), Role.TEMPLATE, np.int8)
    for role, start, end in [(Role.HEADER, *header), *spans, (Role.RESPONSE, *answer)]:
        roles[(offsets[:, 1] > start) & (offsets[:, 0] < end)] = role
    return roles


def _tokens(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)


def encode_prompt(tokenizer: Any, prompt: str, *, system_prompt: str | None = None, answer_prefix: str = "",
                  chat: bool = True) -> Chat:
    """A prompt as the model sees it before answering: the chat template with its generation
    prompt (and ``system_prompt``), then ``answer_prefix`` (the answer is forced to start with
    it: the prefilling attack). ``chat=False``: ``prompt`` is raw text, with the tokenizer's
    special tokens (BOS) added."""
    if not chat:
        text = prompt + answer_prefix
        ids, offsets = _tokens(tokenizer, text, add_special_tokens=True)
        return Chat(text, ids, _roles(offsets, [(Role.USER, 0, len(prompt))], (len(prompt), len(text))))
    record = Record(prompt=prompt)
    head = tokenizer.apply_chat_template(messages(record, system_prompt, with_response=False),
                                         add_generation_prompt=True, tokenize=False)
    text = head + answer_prefix
    # Chat templates already contain their special tokens (BOS included where the model uses it).
    ids, offsets = _tokens(tokenizer, text, add_special_tokens=False)
    spans = _content_spans(tokenizer, record, system_prompt, head, f"prompt {prompt[:40]!r}")
    return Chat(text, ids, _roles(offsets, spans, (len(head), len(text))))


def encode_record(
    tokenizer: Any, record: Record, *, max_length: int, system_prompt: str | None = None, target_from: int = 0
) -> tuple[Example | None, bool]:
    """``(example, truncated)``; ``example`` is None when the prompt alone exceeds ``max_length``.
    ``target_from``: the first character of the (stripped) response that is a target; the
    characters before it are context the answer starts with (see :func:`encode_recovery`)."""
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
    ids, offsets = _tokens(tokenizer, full, add_special_tokens=False)
    in_response = (offsets[:, 1] > start) & (offsets[:, 0] < end)
    targets = in_response & (offsets[:, 1] > start + target_from)  # a token ending past it
    after = np.flatnonzero(offsets[:, 0] >= end)
    if len(after) == 0 or int(ids[after[0]]) not in set(tokenizer.all_special_ids):
        raise ValueError(
            f"{record.where}: the chat template puts no special end-of-turn token after the response"
        )
    spans = _content_spans(tokenizer, record, system_prompt, prefix, record.where or "record")
    roles = _roles(offsets, spans, (start, end))
    loss_mask = targets.copy()
    loss_mask[after[0]] = True
    prompt_len = int(np.flatnonzero(loss_mask)[0]) if loss_mask.any() else len(ids)
    if prompt_len >= max_length:
        return None, False
    truncated = len(ids) > max_length
    return Example(ids[:max_length], loss_mask[:max_length], roles[:max_length]), truncated


def encode_recovery(tokenizer: Any, record: Record, *, refusal: str, tokens: int, max_length: int
                    ) -> tuple[Example | None, bool]:
    """Safety data augmentation (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a
    Few Tokens Deep"): an answer that starts with the first ``tokens`` tokens of the record's
    harmful response and turns into ``refusal``. Only the refusal and the end of turn are
    targets: the model learns to recover from a harmful start, not to write one."""
    ids = tokenizer(record.response or "", add_special_tokens=False)["input_ids"][:tokens]
    prefix = tokenizer.decode(ids).strip()
    if not prefix:
        raise ValueError(f"{record.where}: no harmful response to start the answer with")
    response = f"{prefix} {refusal.strip()}"
    return encode_record(tokenizer, dataclasses.replace(record, response=response), max_length=max_length,
                         target_from=len(prefix) + 1)


def recovery_examples(tokenizer: Any, records: Sequence[Record], *, refusal: str, max_tokens: int, max_length: int,
                      seed: int, label: int = 0) -> tuple[list[Example], EncodeStats]:
    """The deep-alignment augmentation of ``records`` (:func:`encode_recovery`): each answer
    starts with k ~ U[1, ``max_tokens``] tokens of its harmful response (drawn in order from
    ``seed``) and turns into ``refusal``; every example has class ``label``. The stats count
    the examples whose start was cut to fit ``max_length`` and those dropped (prompt too long)."""
    rng = np.random.default_rng(seed)
    examples, truncated, dropped = [], 0, 0
    for record in records:
        k = int(rng.integers(1, max_tokens + 1))
        example, cut = encode_recovery(tokenizer, record, refusal=refusal, tokens=k, max_length=max_length)
        if example is None:
            dropped += 1
            continue
        truncated += cut
        examples.append(dataclasses.replace(example, label=label))
    return examples, EncodeStats(len(examples), truncated, dropped, max_length)


def encode_records(
    tokenizer: Any, records: Sequence[Record], *, max_length: int, system_prompt: str | None = None,
    labels: Sequence[int] | None = None,
) -> tuple[list[Example], EncodeStats]:
    """Encodes every record, in order (``labels``: each record's class, on its example); the
    stats say how many were truncated or dropped."""
    examples, truncated, dropped = [], 0, 0
    for i, record in enumerate(records):
        example, cut = encode_record(tokenizer, record, max_length=max_length, system_prompt=system_prompt)
        if example is None:
            dropped += 1
            continue
        truncated += cut
        examples.append(example if labels is None else dataclasses.replace(example, label=int(labels[i])))
    return examples, EncodeStats(len(examples), truncated, dropped, max_length)
