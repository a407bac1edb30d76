"""Log-likelihoods through the jitted model: per-token log-probabilities (perplexity) and
multiple-choice scoring with one prefill per question shared by all its choices."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.data import left_pad, padded_length
from ssah_jax.models import CausalLM, KVCache, next_token_logprobs
from ssah_jax.sharding import padded_rows, put_rows


@functools.partial(jax.jit, static_argnames=("graphdef",))
def token_logprobs(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array):
    """``log p(token_t | tokens_<t)`` as float32 ``[B, L]`` (0 at ``t = 0``)."""
    picked = next_token_logprobs(nnx.merge(graphdef, state), input_ids, attention_mask)
    return jnp.pad(picked, ((0, 0), (1, 0)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _choice_logprobs(graphdef, state, context_ids, context_mask, choice_ids, choice_mask):
    """context ``[B, P]`` left-padded; choices ``[B, C, T]`` right-padded -> ``[B, C]`` sums."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = context_ids.shape
    cont_len = choice_ids.shape[2]
    cache = KVCache.init(model.config, batch, prompt_len + cont_len, model.dtype)
    kv_mask = jnp.concatenate([context_mask, jnp.zeros((batch, cont_len), context_mask.dtype)], axis=1)
    out = model.forward(context_ids, kv_mask, cache=cache)
    first = jax.nn.log_softmax(model.logits(out.hidden[:, -1]), axis=-1)  # [B, V]
    total = jnp.take_along_axis(first, choice_ids[:, :, 0], axis=-1)  # [B, C]
    if cont_len > 1:
        # Later choice tokens: run the choice (but its last token) on the shared prompt cache.
        def rest(ids_and_mask):
            ids, mask = ids_and_mask  # [B, T]
            visible = kv_mask.at[:, prompt_len:].set(mask)
            hidden = model.forward(ids[:, :-1], visible, cache=out.cache).hidden
            logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(jnp.where(mask[:, 1:] > 0, picked, 0.0), axis=-1)

        total = total + jax.lax.map(rest, (choice_ids.swapaxes(0, 1), choice_mask.swapaxes(0, 1))).T
    return total


def _continuation(tokenizer: Any, context: list[int], prompt: str, choice: str, add_special: bool) -> list[int]:
    # Tokenise prompt + choice together (merges at the boundary as the model would see them)
    # and keep what follows the prompt's own tokens; else tokenise the choice alone.
    whole = tokenizer(prompt + choice, add_special_tokens=add_special)["input_ids"]
    if whole[: len(context)] == context and len(whole) > len(context):
        return whole[len(context):]
    alone = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if not alone:
        raise ValueError(f"choice {choice!r} encodes to no tokens")
    return alone


def choice_logprobs(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> np.ndarray:
    """``[len(prompts), n_choices]`` float32: the summed log-probability of each choice's tokens
    after its prompt. Every prompt has the same number of choices. The prompt is encoded once
    and its KV cache serves all choices (:func:`encoded_choice_logprobs`)."""
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    contexts = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    conts = [
        [_continuation(tokenizer, ctx, p, c, add_special_tokens) for c in cs]
        for ctx, p, cs in zip(contexts, prompts, choices)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return encoded_choice_logprobs(model, contexts, conts, pad_id, batch_size=batch_size)


def encoded_choice_logprobs(
    model: CausalLM,
    contexts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    *,
    batch_size: int = 8,
) -> np.ndarray:
    """:func:`choice_logprobs` of prompts and choices already encoded: ``contexts[i]`` the token
    ids of prompt ``i``, ``choices[i][j]`` those of its choice ``j`` (every prompt has as many),
    ``pad_id`` the filler token. ``[len(contexts), n_choices]`` float32. Prompts are batched in
    order of length, left-padded to a power of two (at least 64), which bounds both padding and
    recompilation, and each batch is split over the active mesh's data-parallel axes."""
    n_choices = {len(c) for c in choices}
    if len(n_choices) != 1:
        raise ValueError(f"every prompt needs the same number of choices, got {sorted(n_choices)}")
    n_choices = n_choices.pop()
    graphdef, state = nnx.split(model)
    order = np.argsort([len(c) for c in contexts], kind="stable")
    scores = np.zeros((len(contexts), n_choices), np.float32)
    size = padded_rows(batch_size)  # filler rows up to a multiple of the mesh's data-parallel size
    for start in range(0, len(contexts), batch_size):
        picked = order[start : start + batch_size]
        ctx = [contexts[i] for i in picked]
        cont = [choices[i] for i in picked]
        rows = len(ctx)
        ctx = ctx + [[pad_id]] * (size - rows)
        cont = cont + [[[pad_id]] * n_choices] * (size - rows)
        prompt_len = max(64, 1 << (max(map(len, ctx)) - 1).bit_length())
        ids, mask = left_pad(ctx, prompt_len, pad_id)
        longest = max(len(t) for cs in cont for t in cs)
        cont_len = 1 if longest == 1 else padded_length(longest, 8)
        choice_ids = np.full((size, n_choices, cont_len), pad_id, np.int32)
        choice_mask = np.zeros((size, n_choices, cont_len), np.int32)
        for i, cs in enumerate(cont):
            for j, toks in enumerate(cs):
                choice_ids[i, j, : len(toks)] = toks
                choice_mask[i, j, : len(toks)] = 1
        out = _choice_logprobs(graphdef, state, *put_rows((ids, mask, choice_ids, choice_mask)))
        scores[picked] = np.asarray(out)[:rows]
    return scores
