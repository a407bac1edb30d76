"""Batched, jitted, KV-cached generation.

One compiled function per (batch, bucketed prompt length, max_new_tokens, greedy/sampled):
a prefill over the left-padded prompts, then a ``lax.while_loop`` that samples a token, feeds
it back through the cache and stops when every row has produced a stop token. No host round
trip per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ssah_jax.data import left_pad
from ssah_jax.models import CausalLM, KVCache


def render_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    answer_prefix: str | Sequence[str] | None = None,
    chat: bool = True,
) -> list[str]:
    """Applies the tokenizer's chat template (with an optional system prompt) to each prompt.

    ``answer_prefix`` (one string for all prompts, or one per prompt) is appended after the
    assistant header, so the model continues an answer that already starts with it (the
    prefilling attack).
    """
    prefixes = _per_prompt(answer_prefix, len(prompts))
    texts = []
    for prompt, prefix in zip(prompts, prefixes):
        if chat:
            messages = [{"role": "user", "content": prompt}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = prompt
        texts.append(text + prefix)
    return texts


def _per_prompt(answer_prefix: str | Sequence[str] | None, n: int) -> list[str]:
    if answer_prefix is None or isinstance(answer_prefix, str):
        return [answer_prefix or ""] * n
    if len(answer_prefix) != n:
        raise ValueError(f"{len(answer_prefix)} answer prefixes for {n} prompts")
    return list(answer_prefix)


def stop_token_ids(model: CausalLM, tokenizer: Any) -> tuple[int, ...]:
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("neither the model config nor the tokenizer defines an end-of-sequence token")
    return tuple(sorted(ids))


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k (0 = off), then top-p (1.0 = off), on ``[B, V]`` float32 logits."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    desc = jnp.where(jnp.arange(vocab) < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample"))
def generate_tokens(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
    sample: bool,
) -> jax.Array:
    """Pure generation core: ``[B, S]`` left-padded prompts -> ``[B, max_new_tokens]`` tokens.

    After a row's stop token the row holds ``pad_id``.
    """
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = KVCache.init(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    kv_mask = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32)
    kv_mask = kv_mask.at[:, :prompt_len].set(prompt_mask)

    def next_token(logits, rng):
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(rng, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

    out = model.forward(input_ids, kv_mask, cache=cache)
    rng, sub = jax.random.split(rng)
    first = next_token(model.logits(out.hidden[:, -1]), sub)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, kv_mask, tokens, done, rng = carry
        kv_mask = kv_mask.at[:, prompt_len + i - 1].set(1)
        last = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        out = model.forward(last, kv_mask, cache=cache)
        rng, sub = jax.random.split(rng)
        tok = next_token(model.logits(out.hidden[:, -1]), sub)
        tok = jnp.where(done, pad_id, tok)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
        return i + 1, out.cache, kv_mask, tokens, done | jnp.isin(tok, stop_ids), rng

    carry = (jnp.ones((), jnp.int32), out.cache, kv_mask, tokens, done, rng)
    return jax.lax.while_loop(cond, body, carry)[3]


def generate_ids(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    system_prompt: str | None = None,
    answer_prefix: str | Sequence[str] | None = None,
    chat: bool = True,
    batch_size: int = 8,
    bucket: int = 64,
    progress: bool = False,
) -> list[list[int]]:
    """Generated token ids per prompt, up to (not including) the first stop token.

    Arguments as in :func:`generate`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    texts = render_prompts(tokenizer, prompts, system_prompt=system_prompt,
                           answer_prefix=answer_prefix, chat=chat)
    # Chat templates already contain their special tokens (BOS included where the model uses it).
    encoded = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(seed)
    results: list[list[int]] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        chunk = encoded[start : start + batch_size]
        length = bucket * math.ceil(max(len(s) for s in chunk) / bucket)
        rows = list(chunk) + [[]] * (batch_size - len(chunk))
        ids, mask = left_pad(rows, length, pad_id)
        rng, sub = jax.random.split(rng)
        tokens = generate_tokens(
            graphdef, state, jnp.asarray(ids), jnp.asarray(mask), sub,
            jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
            jnp.asarray(stops, jnp.int32), jnp.int32(pad_id),
            max_new_tokens=max_new_tokens, sample=temperature > 0,
        )
        results.extend(_until_stop(row, stops) for row in np.asarray(tokens)[: len(chunk)])
    return results


def generate(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    answer_prefix: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Answers ``prompts`` with ``model``; greedy when ``temperature == 0`` (the default).

    Keyword arguments: ``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off), ``seed``,
    ``system_prompt``, ``answer_prefix`` (prefilling attack: the answer is forced to start with
    it, and the returned text includes it; one string, or one per prompt), ``chat`` (False: prompts are raw text),
    ``batch_size``, ``bucket`` (prompts are left-padded to a multiple of it, so few shapes are
    compiled), ``progress`` (a progress bar over batches).
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       answer_prefix=answer_prefix, **kwargs)
    prefixes = _per_prompt(answer_prefix, len(prompts))
    return [prefix + tokenizer.decode(row, skip_special_tokens=True) for prefix, row in zip(prefixes, ids)]


def _until_stop(tokens: np.ndarray, stops: Sequence[int]) -> list[int]:
    hits = np.flatnonzero(np.isin(tokens, stops))
    return tokens[: hits[0]].tolist() if hits.size else tokens.tolist()
