"""Reasoning-direction probing (SSAH, Figs 2-4).

For a harmful query ``Q``, compare the hidden state at the end of ``Q`` (after the chat
template's assistant header, where the answer starts) with the hidden state after ``Q``
plus the first ``k`` tokens of a continuation: a refusal ("I'm sorry, but I cannot ...") or a
compliance ("Sure, here is how ..."). An aligned model's query state already leans toward the
refusal: the distance to the refusal continuation is the smaller one.

One forward pass per (query, continuation) gives every ``k`` at once: the model is causal, so
the hidden state at position ``len(Q) - 1 + k`` is the state after ``Q + c[:k]``. Several
phrasings of each kind are averaged, each over its appended positions
(:func:`summarise_directions`), so neither one phrasing nor one token decides the measure.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.data import encode_prompt, padded_length
from ssah_jax.models import CausalLM
from ssah_jax.sharding import padded_rows, put_rows


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens"))
def _distances(graphdef, state, ids, mask, query_end, *, max_tokens: int):
    """Cosine distances ``[B, layers, max_tokens]`` between the state at ``query_end`` and
    the states at ``query_end + 1 .. query_end + max_tokens``, for every layer's output."""
    model = nnx.merge(graphdef, state)
    hidden = model.forward(ids, mask, output_hidden_states=True).hidden_states[1:]  # [L, B, S, H]
    positions = query_end[:, None] + jnp.arange(max_tokens + 1)[None]  # [B, K + 1]
    picked = jnp.take_along_axis(hidden, positions[None, :, :, None], axis=2).astype(jnp.float32)
    unit = picked / jnp.linalg.norm(picked, axis=-1, keepdims=True)
    cosine = jnp.sum(unit[:, :, :1] * unit[:, :, 1:], axis=-1)  # [L, B, K]
    return jnp.transpose(1.0 - cosine, (1, 0, 2))


def direction_distances(
    model: CausalLM,
    tokenizer: Any,
    queries: Sequence[str],
    continuations: Mapping[str, str],
    *,
    max_tokens: int = 10,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> dict[str, np.ndarray]:
    """Per continuation name, float32 ``[queries, layers, max_tokens]``: entry ``[q, l, k-1]``
    is the cosine distance between layer ``l``'s output at the end of query ``q`` (chat
    rendered, up to the assistant header) and after ``k`` tokens of the continuation."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    prompts = [encode_prompt(tokenizer, q, system_prompt=system_prompt).ids.tolist() for q in queries]
    graphdef, state = nnx.split(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for name, text in continuations.items():
        tail = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(tail) < max_tokens:
            raise ValueError(f"continuation {name!r} has {len(tail)} tokens, fewer than max_tokens={max_tokens}")
        rows, size = [], padded_rows(batch_size)  # filler rows up to a multiple of the mesh's data-parallel size
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seqs = [p + tail for p in chunk] + [chunk[0] + tail] * (size - len(chunk))
            length = padded_length(max(len(s) for s in seqs), 64)
            ids = np.full((size, length), pad, np.int32)
            mask = np.zeros((size, length), np.int32)
            for i, s in enumerate(seqs):  # right padding: positions count from the first token
                ids[i, : len(s)], mask[i, : len(s)] = s, 1
            ends = np.asarray([len(s) - len(tail) - 1 for s in seqs], np.int32)
            d = _distances(graphdef, state, *put_rows((ids, mask, ends)), max_tokens=max_tokens)
            rows.append(np.asarray(d)[: len(chunk)])
        out[name] = np.concatenate(rows)
    return out


def mean_over_positions(distances: np.ndarray) -> np.ndarray:
    """``[..., K]`` distances after 1..K appended tokens -> ``[..., K]`` whose entry ``k - 1`` is
    their mean over the first ``k`` positions: no single appended token (whose identity alone
    can move the state) dominates the measure at any length."""
    d = np.asarray(distances, np.float64)
    return np.cumsum(d, axis=-1) / np.arange(1, d.shape[-1] + 1)


def summarise_directions(distances: Mapping[str, np.ndarray], kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
    """``distances`` of :func:`direction_distances` (continuation name -> ``[Q, layers, K]``)
    summarised per kind of continuation (``kinds``: name -> ``"refusal"`` or ``"compliance"``):
    ``<kind>`` is the mean over its phrasings of :func:`mean_over_positions` (``[Q, layers, K]``),
    and ``gap`` the per-query d(compliance) - d(refusal) at K, averaged over layers (``[Q]``;
    positive: the query state is closer to the refusal)."""
    out = {}
    for kind in ("refusal", "compliance"):
        names = [n for n, k in kinds.items() if k == kind]
        if not names:
            raise ValueError(f"no {kind} continuation among {sorted(kinds)}")
        out[kind] = np.mean([mean_over_positions(distances[n]) for n in names], axis=0)
    out["gap"] = (out["compliance"][..., -1] - out["refusal"][..., -1]).mean(axis=-1)
    return out


def reasoning_direction(model: CausalLM, tokenizer: Any, queries: Sequence[str], refusals: Sequence[str],
                        compliances: Sequence[str], *, max_tokens: int = 10, batch_size: int = 8) -> dict[str, list]:
    """One model's probing result (SSAH Figs 2-4) from refusal and compliance phrasings:
    ``refusal`` and ``compliance`` (each kind's distances of :func:`summarise_directions`, mean
    over the queries, ``[layers, max_tokens]``) and ``gaps`` (the per-query gap), as lists."""
    continuations = {f"refusal_{i}": text for i, text in enumerate(refusals)}
    continuations |= {f"compliance_{i}": text for i, text in enumerate(compliances)}
    kinds = {name: name.rsplit("_", 1)[0] for name in continuations}
    d = summarise_directions(direction_distances(model, tokenizer, queries, continuations, max_tokens=max_tokens,
                                                 batch_size=batch_size), kinds)
    return {"refusal": d["refusal"].mean(axis=0).tolist(), "compliance": d["compliance"].mean(axis=0).tolist(),
            "gaps": d["gap"].tolist()}

