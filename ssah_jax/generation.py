"""Batched, jitted, KV-cached generation.

One compiled function per (batch, bucketed prompt length, max_new_tokens, greedy/sampled):
a prefill over the left-padded prompts, then a ``lax.while_loop`` that samples a token, feeds
it back through the cache and stops when every row has produced a stop token. Filler rows (the
empty rows that fill up a partial last batch) start finished, so they never hold the loop up.
No host round trip per token.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ssah_jax.data import encode_prompt, left_pad, padded_length
from ssah_jax.models import CausalLM, KVCache
from ssah_jax.sharding import constrain, padded_rows, put_rows


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


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ValueError unless ``temperature >= 0`` (0 = greedy), ``top_k >= 0`` (0 = off) and
    ``0 < top_p <= 1`` (1 = off): the sampling settings every decoding takes."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"invalid sampling: temperature={temperature}, top_k={top_k}, top_p={top_p} "
                         "(need temperature >= 0, top_k >= 0, 0 < top_p <= 1)")


def real_rows(n: int, batch_size: int) -> np.ndarray:
    """The ``active`` rows of :func:`generate_tokens` for a batch whose first ``n`` rows are
    prompts and the rest filler (a partial last batch filled up to ``batch_size``)."""
    return np.arange(batch_size) < n


_NEG_INF_KEY = -0x7F800001  # _ordered(-inf): -inf's bits 0xFF800000 with the magnitude flipped


def _ordered(x: jax.Array) -> jax.Array:
    """int32 keys in the order of float32 ``x`` (``-0.0`` as ``0.0``): the bits of a
    non-negative float already sort as integers; a negative one's magnitude bits are flipped.
    Keys start at -inf's (a NaN, which has no order, counts as -inf or above +inf)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.maximum(jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits), _NEG_INF_KEY)


def _least(holds, low: jax.Array, high: jax.Array) -> jax.Array:
    """Per row, the least int32 ``t`` in ``(low, high]`` where ``holds(t)`` (false at ``low``,
    true at ``high``, monotone), by 32 halvings of the interval."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without overflow
        ok = holds(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (low, high))[1]


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k, then top-p, on ``[B, V]`` float32 logits (the others -> -inf);
    ``temperature``, ``top_k`` and ``top_p`` are scalars.

    Top-k (0 = off) keeps the tokens whose logit is at least the k-th largest; top-p (1.0 = off)
    then keeps a token when the tokens more likely than it hold less than ``top_p`` of the
    kept probability (up to float32 rounding of that sum): the fewest most likely tokens whose
    mass reaches ``top_p``. Tied logits are kept or dropped together. Each cut is found by
    bisection over the logits' float32 order (32 masked reductions over the vocabulary) rather
    than by sorting it: a sort per row and step dominated sampled decoding on CPU
    (``scripts/benchmark.py generate``)."""
    logits = logits / temperature
    key = _ordered(logits)
    low = jnp.min(key, axis=-1, keepdims=True) - 1  # keys start at -inf's: no overflow
    high = jnp.max(key, axis=-1, keepdims=True)
    everything = low + 1
    k = jnp.minimum(top_k, logits.shape[-1])

    def kth(_):  # the k-th largest key: the least t with fewer than k keys above it
        return _least(lambda t: jnp.sum(key > t, axis=-1, keepdims=True) < k, low, high)

    kept = key >= jax.lax.cond(k > 0, kth, lambda _: everything, None)

    def nucleus(_):  # the least t with less than top_p of the (top-k) mass above it
        probs = jax.nn.softmax(jnp.where(kept, logits, -jnp.inf), axis=-1)
        return _least(lambda t: jnp.sum(jnp.where(key > t, probs, 0.0), axis=-1, keepdims=True) < top_p,
                      low, high)

    kept &= key >= jax.lax.cond(top_p < 1, nucleus, lambda _: everything, None)
    return jnp.where(kept, logits, -jnp.inf)


class DecodeState(NamedTuple):
    """What the decode loop carries from one step to the next.

    ``step``: the index of the answer token being chosen (0 = the first); ``cache`` / ``kv_mask``
    (``[B, prompt + max_new_tokens]``): the KV cache and its real slots; ``tokens``
    (``[B, max_new_tokens]``): the answer so far (``pad_id`` after a row's stop token);
    ``done`` ``[B]``: rows that emitted a stop token, and filler rows (not ``active``) from the
    start; ``rng``; ``policy``: the decode policy's own state."""

    step: jax.Array
    cache: KVCache
    kv_mask: jax.Array
    tokens: jax.Array
    done: jax.Array
    rng: jax.Array
    policy: Any


class DecodePolicy(Protocol):
    """Decides, per step and row, the token actually emitted. ``__call__(model, state, chosen)``
    gets the sampled (or greedy) tokens ``chosen`` ``[B]`` for ``state.step`` and returns
    ``(tokens [B], new policy state)``. Two optional hooks run the model for it:
    ``prefill(model, input_ids, kv_mask, cache, policy_state) -> (decoder output, policy
    state)`` runs the prompt into the cache (:func:`prefill` by default), and ``feed(model,
    state, last) -> (decoder output, policy state)`` feeds the last emitted tokens ``[B, 1]``
    (:func:`feed` by default; ``state.kv_mask`` already marks their slot). A hook may change
    the embeddings or the mask, or add query rows of its own to the same forward (the safety
    signal's ``[CLS]`` check rides along with the step's token that way), as long as it returns
    the token's hidden state ``[B, 1, hidden]`` and the cache advanced by the token's one slot.
    Policies are hashable (frozen dataclasses); their arrays live in their
    state, which ``generate_tokens`` takes as ``policy_state``."""

    def __call__(self, model: CausalLM, state: DecodeState, chosen: jax.Array) -> tuple[jax.Array, Any]: ...


def prefill(model: CausalLM, input_ids: jax.Array, kv_mask: jax.Array, cache: KVCache, policy_state: Any):
    """The default prefill of a decode policy: the prompt through the model into the cache."""
    return model.forward(input_ids, kv_mask, cache=cache), policy_state


def feed(model: CausalLM, state: DecodeState, last: jax.Array):
    """The default feed of a decode policy: the last emitted tokens through the model into the cache."""
    return model.forward(last, state.kv_mask, cache=state.cache), state.policy


@dataclasses.dataclass(frozen=True)
class Sample:
    """The identity policy: every row emits what was sampled."""

    def __call__(self, model, state, chosen):
        return chosen, state.policy


class Forced(NamedTuple):
    """State of :class:`ForceTokens`: row ``b`` emits ``tokens[b, j]`` at step ``start[b] + j``
    for ``j < length[b]`` (``start = -1``: never)."""

    tokens: jax.Array  # [B, K] int32
    length: jax.Array  # [B] int32
    start: jax.Array  # [B] int32


@dataclasses.dataclass(frozen=True)
class ForceTokens:
    """Forces per-row token sequences from a per-row step on (an inserted refusal, a prefix);
    the rest of the answer is sampled as usual. Its state is a :class:`Forced`."""

    def __call__(self, model, state, chosen):
        forced: Forced = state.policy
        if not isinstance(forced, Forced) or forced.tokens.shape[1] == 0:
            raise ValueError("ForceTokens needs policy_state=Forced(tokens [B, K >= 1], length [B], start [B])")
        j = state.step - forced.start
        active = (forced.start >= 0) & (j >= 0) & (j < forced.length)
        column = jnp.take_along_axis(forced.tokens, jnp.clip(j, 0, forced.tokens.shape[1] - 1)[:, None], axis=1)
        return jnp.where(active, column[:, 0], chosen), forced


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample", "policy", "return_policy_state"))
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
    policy_state: Any = None,
    active: jax.Array | None = None,
    *,
    max_new_tokens: int,
    sample: bool,
    policy: DecodePolicy = Sample(),
    return_policy_state: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Pure generation core: ``[B, S]`` left-padded prompts -> ``[B, max_new_tokens]`` tokens.

    One prefill (the policy's), then a compiled ``while_loop`` over a :class:`DecodeState`: each step samples
    a token per row, lets ``policy`` (with ``policy_state``) decide what is emitted, and feeds
    it back. After a row's stop token the row holds ``pad_id``. ``active`` ``[B]`` bool (None:
    every row) marks the real rows; the others (filler rows of a partial batch, see
    :func:`real_rows`) start finished: they hold ``pad_id`` and the loop ends once every real
    row has stopped (the real rows' tokens, and the random draws, are the same either way).
    With ``return_policy_state``, returns ``(tokens, the policy's final state)``.
    """
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    # One slot more than the fed tokens need (the last token is never fed): a policy's feed may
    # put a query row of its own in the slot after the token's (the safety signal's check).
    cache = KVCache.init(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    kv_mask = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32)
    kv_mask = constrain(kv_mask.at[:, :prompt_len].set(prompt_mask), ("act_batch", "act_kv_len"))

    def emit(model: CausalLM, decode: DecodeState, hidden: jax.Array) -> DecodeState:
        """Chooses, lets the policy decide, and writes the token of ``decode.step``."""
        logits = model.logits(hidden[:, -1])
        rng, sub = jax.random.split(decode.rng)
        if sample:
            chosen = jax.random.categorical(sub, filter_logits(logits, temperature, top_k, top_p))
        else:
            chosen = jnp.argmax(logits, axis=-1)
        token, policy_state = policy(model, decode, chosen.astype(jnp.int32))
        token = jnp.where(decode.done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(decode.tokens, token[:, None], decode.step, axis=1)
        return decode._replace(step=decode.step + 1, tokens=tokens, done=decode.done | jnp.isin(token, stop_ids),
                               rng=rng, policy=policy_state)

    out, policy_state = getattr(policy, "prefill", prefill)(model, input_ids, kv_mask, cache, policy_state)
    done = jnp.zeros((batch,), bool) if active is None else ~jnp.asarray(active, bool)
    tokens = constrain(jnp.full((batch, max_new_tokens), pad_id, jnp.int32), ("act_batch", "act_len"))
    start = DecodeState(jnp.zeros((), jnp.int32), out.cache, kv_mask, tokens, constrain(done, ("act_batch",)), rng,
                        policy_state)
    first = emit(model, start, out.hidden)

    def cond(decode: DecodeState):
        return (decode.step < max_new_tokens) & ~jnp.all(decode.done)

    def body(decode: DecodeState) -> DecodeState:
        kv_mask = decode.kv_mask.at[:, prompt_len + decode.step - 1].set(1)
        last = jax.lax.dynamic_slice_in_dim(decode.tokens, decode.step - 1, 1, axis=1)
        # The weights pass a barrier tied to the step: a weight sharded over fsdp is gathered
        # inside each step (a layer at a time), never hoisted out of the loop whole.
        live = nnx.merge(graphdef, jax.lax.optimization_barrier((state, decode.step))[0])
        out, policy_state = getattr(policy, "feed", feed)(live, decode._replace(kv_mask=kv_mask), last)
        return emit(live, decode._replace(cache=out.cache, kv_mask=kv_mask, policy=policy_state), out.hidden)

    last = jax.lax.while_loop(cond, body, first)
    return (last.tokens, last.policy) if return_policy_state else last.tokens


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

    Arguments as in :func:`generate`. On a mesh (``jax.set_mesh`` with the model placed on it,
    e.g. ``load_model(..., mesh=mesh)``, and ``ssah_jax.sharding.use_rules``), each batch is split
    over its data-parallel axes (filled up to a multiple of them with rows that start finished)
    and the KV cache's kv heads over its tensor axis; the tokens are the same as on one device.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    encoded = [encode_prompt(tokenizer, p, system_prompt=system_prompt, answer_prefix=prefix, chat=chat).ids.tolist()
               for p, prefix in zip(prompts, _per_prompt(answer_prefix, len(prompts)))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(seed)
    results: list[list[int]] = []
    starts = range(0, len(encoded), batch_size)
    rows = padded_rows(batch_size)  # filler rows up to a multiple of the mesh's data-parallel size
    for start in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        chunk = encoded[start : start + batch_size]
        length = padded_length(max(len(s) for s in chunk), bucket)
        ids, mask = left_pad(list(chunk) + [[]] * (rows - len(chunk)), length, pad_id)
        rng, sub = jax.random.split(rng)
        tokens = generate_tokens(
            graphdef, state, *put_rows((ids, mask)), sub,
            jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
            jnp.asarray(stops, jnp.int32), jnp.int32(pad_id), active=put_rows(real_rows(len(chunk), rows)),
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


class Responder(Protocol):
    """A language model behind a decoding of its own (e.g. :class:`ssah_jax.signals.SignalModel`:
    the safety signal deciding, as the answer grows, whether to refuse). Evaluation takes one
    wherever it takes a model: answers come from :meth:`respond`, log-likelihoods from ``model``."""

    model: CausalLM

    def respond(self, tokenizer: Any, prompts: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
        """Per prompt ``{"text": ...}`` (as :func:`generate` writes it) and whatever else the
        decoding records; keyword arguments as :func:`generate`'s."""
        ...


def respond(model: CausalLM | Responder, tokenizer: Any, prompts: Sequence[str], **kwargs: Any
            ) -> list[dict[str, Any]]:
    """Per prompt ``{"text": ...}`` (and a :class:`Responder`'s own records): :func:`generate`
    for a model, the responder's own decoding otherwise."""
    if isinstance(model, CausalLM):
        return [{"text": text} for text in generate(model, tokenizer, prompts, **kwargs)]
    return model.respond(tokenizer, prompts, **kwargs)


def language_model(model: CausalLM | Responder) -> CausalLM:
    """The language model itself (a :class:`Responder`'s ``model``)."""
    return model if isinstance(model, CausalLM) else model.model


def _until_stop(tokens: np.ndarray, stops: Sequence[int]) -> list[int]:
    hits = np.flatnonzero(np.isin(tokens, stops))
    return tokens[: hits[0]].tolist() if hits.size else tokens.tolist()
