"""Greedy coordinate gradient (GCG; Zou et al. 2023, "Universal and Transferable Adversarial
Attacks on Aligned Language Models", arXiv 2307.15043), the optimisation attack of the signal
paper's HarmBench rows, as nanoGCG runs it, compiled in JAX.

One prompt's attack optimises a suffix of ``n`` tokens after the user's request so that the
model's answer starts with a target string (AdvBench's "Sure, here is ..."). The chat-rendered
conversation is laid out once (:class:`Layout`): the tokens before the suffix (template, system
prompt, request), the suffix, the tokens after it (end of turn, assistant header) and the target.
Each step:

1. the gradient of the target's loss (mean cross-entropy of its tokens) with respect to the
   one-hot suffix, ``[n, vocab]``, in one forward / backward (:func:`token_gradients`);
2. ``search_width`` candidates, each the suffix with ``n_replace`` random positions set to one of
   the ``topk`` tokens of most negative gradient there; disallowed tokens (special, non-ASCII,
   non-printable) never (:func:`sample_candidates`);
3. candidates whose text does not encode back to the same ids are dropped (their loss is
   infinite: the batch keeps its shape, so a run compiles once) (:func:`retokenizes`);
4. every candidate's loss in one batched forward that reuses the prefix's KV cache: the tokens
   before the suffix are prefilled once and the candidates run as extra queries on it, in chunks
   of ``chunk`` (:func:`candidate_losses`);
   On a mesh the candidates are split over its batch axes (``data x fsdp``), so the search
   width grows with the devices; the model is sharded as every stage shards it.
5. the best candidate becomes the suffix; the best suffix seen is the result. With
   ``early_stop``, the attack stops once the greedy answer starts with the target (every target
   token is its position's argmax, teacher-forced: what greedy decoding then generates).

Deterministic for a seed: step ``s`` draws from ``fold_in(key(seed), s)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.data import Record
from ssah_jax.data.tokenize import messages
from ssah_jax.models import CausalLM, KVCache
from ssah_jax.sharding import batch_multiple, constrain, put_rows

MARKER = "{optim_str}"  # where the suffix goes in the rendered conversation


@dataclasses.dataclass(frozen=True)
class GCGConfig:
    """``steps`` of ``search_width`` candidates (``topk`` tokens per position, ``n_replace``
    positions changed per candidate), from the suffix ``init``; candidate losses ``chunk`` at a
    time (``search_width`` a multiple of it); ``early_stop``: stop once the greedy answer starts
    with the target. HarmBench's setting: 500 steps, width 512, a 20-token ``"! ! ... !"`` start."""

    steps: int = 250
    search_width: int = 512
    topk: int = 256
    n_replace: int = 1
    init: str = " ".join(["!"] * 20)
    chunk: int = 64
    early_stop: bool = False
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "search_width", "topk", "n_replace", "chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"GCGConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.search_width % self.chunk:
            raise ValueError(f"GCGConfig.search_width ({self.search_width}) must be a multiple of chunk ({self.chunk})")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One conversation's token ids (int32): ``before`` the suffix, the suffix's start ``suffix``,
    ``after`` it up to the answer, and the ``target`` the answer should start with."""

    before: np.ndarray
    suffix: np.ndarray
    after: np.ndarray
    target: np.ndarray


def layout(tokenizer: Any, prompt: str, target: str, init: str, system_prompt: str | None = None) -> Layout:
    """The conversation of ``prompt`` + a space + the suffix, rendered by the model's chat template
    with the generation prompt and split at the suffix, each part tokenized alone (as nanoGCG
    does: the space ends ``before``); ``target`` and the suffix's start ``init`` likewise."""
    conversation = messages(Record(f"{prompt} {MARKER}"), system_prompt, with_response=False)
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if text.count(MARKER) != 1:
        raise ValueError("the chat template does not render the user's message verbatim: no place for a suffix")
    before, after = text.split(MARKER)
    ids = lambda s: np.asarray(tokenizer(s, add_special_tokens=False)["input_ids"], np.int32)  # noqa: E731
    out = Layout(ids(before), ids(init), ids(after), ids(target))
    if not len(out.suffix) or not len(out.target):
        raise ValueError("the suffix's start and the target must each be at least one token")
    return out


@functools.lru_cache(maxsize=4)  # a decode per token of the vocabulary: once per tokenizer, not per prompt
def allowed_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """``[vocab]`` bool: the tokens a suffix may hold: printable ASCII text that is no special
    token (nanoGCG's rule; ids past the tokenizer's vocabulary never)."""
    ok = np.zeros(vocab_size, bool)
    special = set(tokenizer.all_special_ids)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        ok[i] = i not in special and bool(text) and text.isascii() and text.isprintable()
    ok.setflags(write=False)  # shared by the cache
    return ok


def _embed_one_hot(model: CausalLM, one_hot: jax.Array) -> jax.Array:
    table = model.embed.embedding[...]
    return (one_hot.astype(table.dtype) @ table).astype(model.dtype)


def target_loss(model: CausalLM, embeddings: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of ``target`` ``[B, t]`` given ``embeddings`` ``[B, L, hidden]`` whose last
    ``t`` positions are the target's, and whether every target token is its position's argmax."""
    b, length, _ = embeddings.shape
    t = target.shape[1]
    hidden = model.forward(jnp.zeros((b, length), jnp.int32), embeddings=embeddings).hidden
    logits = model.logits(hidden[:, length - t - 1 : length - 1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return jnp.mean(nll, axis=-1), jnp.all(jnp.argmax(logits, axis=-1) == target, axis=-1)


@nnx.jit
def token_gradients(model: CausalLM, before: jax.Array, suffix: jax.Array, after: jax.Array,
                    target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(grad [n, vocab] float32, loss)``: the target loss's gradient with respect to the one-hot
    suffix (ids ``[n]``; ``before``, ``after``, ``target`` ids ``[*]``), one forward / backward."""
    vocab = model.config.vocab_size

    def loss(one_hot):
        parts = [model.embed(before[None]), _embed_one_hot(model, one_hot)[None], model.embed(after[None]),
                 model.embed(target[None])]
        return target_loss(model, jnp.concatenate(parts, axis=1), target[None])[0][0]

    value, grad = jax.value_and_grad(loss)(jax.nn.one_hot(suffix, vocab, dtype=jnp.float32))
    return grad.astype(jnp.float32), value


@functools.partial(jax.jit, static_argnames=("search_width", "topk", "n_replace"))
def sample_candidates(key: jax.Array, suffix: jax.Array, grad: jax.Array, allowed: jax.Array, *, search_width: int,
                      topk: int, n_replace: int) -> jax.Array:
    """``[search_width, n]`` candidates: ``suffix`` with ``n_replace`` distinct random positions
    each set to a random one of the ``topk`` allowed tokens of most negative gradient there."""
    n = suffix.shape[0]
    top = jax.lax.top_k(jnp.where(allowed[None], -grad, -jnp.inf), topk)[1]  # [n, topk]
    k_pos, k_tok = jax.random.split(key)
    positions = jnp.argsort(jax.random.uniform(k_pos, (search_width, n)), axis=1)[:, :n_replace]
    picks = jax.random.randint(k_tok, (search_width, n_replace), 0, topk)
    tokens = top[positions, picks]
    return jnp.tile(suffix, (search_width, 1)).at[jnp.arange(search_width)[:, None], positions].set(tokens)


def retokenizes(tokenizer: Any, candidates: np.ndarray) -> np.ndarray:
    """``[W]`` bool: whether each candidate's text encodes back to the same ids (a suffix that
    does not is not what the model would read once written out)."""
    texts = tokenizer.batch_decode(candidates)
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.asarray([list(a) == list(c) for a, c in zip(again, candidates.tolist())])


@functools.partial(nnx.jit, static_argnames=("chunk",))
def candidate_losses(model: CausalLM, before: jax.Array, candidates: jax.Array, after: jax.Array,
                     target: jax.Array, *, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``(loss [W], reached [W])`` of each candidate suffix ``[W, n]``: the prefix ``before`` is
    prefilled once (as ``chunk`` equal rows) into a KV cache that the candidates' tokens (suffix,
    after, target) read as extra queries, ``chunk`` candidates a forward; on a mesh each chunk is split over its batch
    axes (``data x fsdp``: ``chunk`` a multiple of their size), the model as it is placed."""
    p, (w, n), a, t = before.shape[0], candidates.shape, after.shape[0], target.shape[0]
    s = n + a + t
    ones = jnp.ones((chunk, p), jnp.int32)
    # the prefix prefilled once a step, as a chunk of equal rows: the cache is laid out like the chunk
    cache = KVCache.init(model.config, chunk, p, model.dtype, stacked=model.layout.scan)
    wide = model.forward(constrain(jnp.broadcast_to(before, (chunk, p)), ("act_batch", None)), ones, cache=cache).cache

    def one(ids):  # [chunk, n], split over the mesh's batch axes
        ids = constrain(ids, ("act_batch", None))
        tokens = jnp.concatenate([ids, jnp.broadcast_to(after, (chunk, a)), jnp.broadcast_to(target, (chunk, t))], 1)
        hidden = model.forward(tokens, ones, cache=wide, write_cache=False).hidden
        logits = model.logits(hidden[:, s - t - 1 : s - 1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.broadcast_to(target, (chunk, t))[..., None], axis=-1)[..., 0]
        return jnp.mean(nll, axis=-1), jnp.all(jnp.argmax(logits, axis=-1) == target[None], axis=-1)

    losses, reached = jax.lax.map(one, candidates.reshape(w // chunk, chunk, n))
    return losses.reshape(w), reached.reshape(w)


@dataclasses.dataclass
class GCGState:
    """Where one prompt's attack stands after ``step`` steps: the current ``suffix`` (ids), the
    ``best`` suffix seen and its loss, each step's loss (the chosen candidate's), and the step at
    which the greedy answer first started with the target (None: not yet)."""

    step: int
    suffix: list[int]
    best: list[int]
    best_loss: float
    losses: list[float]
    reached: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def attack(model: CausalLM, tokenizer: Any, prompt: str, target: str, config: GCGConfig, *,
           system_prompt: str | None = None, state: GCGState | None = None,
           on_step: Callable[[GCGState], None] | None = None) -> GCGState:
    """Runs GCG on one prompt from ``state`` (None: the start) to ``config.steps`` (or the early
    stop), calling ``on_step`` after each step (a checkpoint: the run resumes from the state it
    was given); returns the final state."""
    if config.chunk % batch_multiple():
        raise ValueError(f"GCGConfig.chunk ({config.chunk}) must be a multiple of the mesh's {batch_multiple()} "
                         "data x fsdp devices (a chunk of candidates is split over them)")
    lay = layout(tokenizer, prompt, target, config.init, system_prompt)
    allowed = jnp.asarray(allowed_tokens(tokenizer, model.config.vocab_size))
    before, after, target_ids = (jnp.asarray(x) for x in (lay.before, lay.after, lay.target))
    if state is None:
        state = GCGState(0, lay.suffix.tolist(), lay.suffix.tolist(), float("inf"), [])
    key = jax.random.key(config.seed)
    while state.step < config.steps and not (config.early_stop and state.reached is not None):
        suffix = jnp.asarray(state.suffix, jnp.int32)
        grad, _ = token_gradients(model, before, suffix, after, target_ids)
        candidates = np.asarray(sample_candidates(jax.random.fold_in(key, state.step), suffix, grad, allowed,
                                                  search_width=config.search_width, topk=config.topk,
                                                  n_replace=config.n_replace))
        valid = retokenizes(tokenizer, candidates)
        losses, reached = candidate_losses(model, before, put_rows(candidates), after, target_ids, chunk=config.chunk)
        losses = np.where(valid, np.asarray(losses), np.inf)
        best = int(np.argmin(losses))
        if np.isfinite(losses[best]):
            state.suffix = candidates[best].tolist()
            if losses[best] < state.best_loss:
                state.best, state.best_loss = state.suffix, float(losses[best])
            if state.reached is None and bool(np.asarray(reached)[best]):
                state.reached = state.step
        state.losses.append(float(losses[best]))
        state.step += 1
        if on_step is not None:
            on_step(state)
    return state


def suffix_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The suffix as text (what a prompt + space + suffix attack sends)."""
    return tokenizer.decode(list(ids))
