"""Strategic attention and strategic decoding of the explicit safety signal, inside the compiled
decode loop (a :class:`~ssah_jax.generation.DecodePolicy`; no host round trip per token).

The prompt is prefilled with ``[CLS]`` at slot 0 of the cache under the ``"sft"`` mask (the
answer attends to it). At step 0 the first check is the prefill's own ``[CLS]`` state (what
:func:`~ssah_jax.signals.classify` computes). Later checks, at the steps the schedule picks, run
``[CLS]`` as a second query of the step's own forward (one pass over the weights for both; its
keys / values go to a slot no token uses yet, overwritten by the next token, so the cache's real
slots and the answer are untouched) with a mask of what it may see (Li & Kim, ICML 2025: strategic decoding):

- rule 1: the first check was malicious: the query and the first ``r1`` answer tokens;
- rule 2: otherwise, the latest ``r2`` answer tokens;
- rule 3: after a benign-to-malicious transition at answer length ``S``: answer tokens
  ``S - r2 .. S + r3``; a benign check rolls back to rule 2;
- rule 4: padding, BOS and template tokens are never seen (answer tokens are the prompt's
  answer prefix, role ``RESPONSE``, and the generated tokens).

Decoding: a malicious first check forces the refusal prefix from step 0; after ``tau``
consecutive malicious checks, from that step. A row gets the prefix at most once. The prefix
(``REFUSAL_PREFIX``, the authors' wording) starts with a newline, as theirs does, so that a
refusal inserted after answer tokens starts a line of its own instead of being glued to the
previous token.

Schedules (which steps check): ``each`` (every step), ``first`` (step 0 only), ``periodic``
(every ``period`` steps), ``annealing`` (ours, as the paper publishes none: after a check at
step ``s`` the next is at ``s + s // period + 1``, so every step for the first ``period`` steps,
then every 2nd step, then every 3rd, ...). A finished row is not checked; a check whose p is
NaN counts as malicious. The filler rows of a partial last batch start finished (never
checked, never holding the loop up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.data import Chat, Role, encode_prompt, left_pad, padded_length
from ssah_jax.generation import DecodeState, check_sampling, generate_tokens, real_rows, stop_token_ids
from ssah_jax.generation import feed as default_feed
from ssah_jax.models import CausalLM, default_mask
from ssah_jax.sharding import padded_rows, put_rows
from ssah_jax.signals.signal import SafetySignal, check_query, head_logit, mask

SCHEDULES = ("each", "first", "periodic", "annealing")
REFUSAL_PREFIX = "\nSorry, I can't fulfill your request because"


class Rules(NamedTuple):
    """The numbers of the decoding: a check is malicious when p > ``threshold``; ``period`` of
    the periodic and annealing schedules; ``r1``, ``r2``, ``r3`` of rules 1-3; the refusal after
    ``tau`` consecutive malicious checks. They travel in :class:`SignalState` as traced scalars
    (:meth:`arrays`), so other values reuse the compiled decode loop; only the schedule and the
    head's kind are part of the policy."""

    threshold: float = 0.5
    period: int = 10
    r1: int = 10
    r2: int = 10
    r3: int = 10
    tau: int = 3

    def check(self) -> Rules:
        """Raises ValueError unless ``period``, ``tau >= 1`` and ``r1``, ``r2``, ``r3 >= 0`` are
        whole numbers and the threshold is a number; returns itself."""
        whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in self[1:])
        if (not whole or self.period < 1 or self.tau < 1 or min(self.r1, self.r2, self.r3) < 0
                or np.isnan(self.threshold)):
            raise ValueError(f"invalid decoding rules {self._asdict()} (need whole numbers period, tau >= 1 and "
                             "r1, r2, r3 >= 0, and a threshold that is a number)")
        return self

    def arrays(self) -> Rules:
        """The rules as the decode loop carries them (float32 threshold, int32 others)."""
        return Rules(jnp.float32(self.threshold), *(jnp.int32(v) for v in self[1:]))


class SignalState(NamedTuple):
    """The policy's arrays: the signal's parameters, the decoding's :class:`Rules` (traced
    scalars), the prompt's roles ``[B, prompt_len]`` (slot 0, ``[CLS]``, as ``PADDING``), each
    check's p ``[B, T]`` (NaN where none), the first check's verdict, the answer length at the
    last transition (-1: none), the count of consecutive malicious checks, the step the prefix
    was inserted (-1: never), the prefix's tokens ``[K]``, the next check's step and the p
    computed by the latest forward."""

    params: Any
    rules: Rules
    roles: jax.Array
    checks: jax.Array
    first_malicious: jax.Array
    transition: jax.Array
    consecutive: jax.Array
    inserted: jax.Array
    prefix: jax.Array
    next_check: jax.Array  # the step of the next scheduled check (scalar)
    pending: jax.Array  # [B] p of the check the prefill / this step's feed ran, NaN once __call__ used it


@dataclasses.dataclass(frozen=True)
class StrategicDecoding:
    """The decode policy: the head's kind and the schedule (hashable, so part of the compiled
    loop's identity; the numbers, :class:`Rules`, and the arrays live in a :class:`SignalState`)."""

    head: str
    schedule: str = "each"

    def interval(self, step: jax.Array, period: jax.Array) -> jax.Array:
        """Steps from a check at ``step`` to the next one."""
        if self.schedule == "each":
            return jnp.ones((), jnp.int32)
        if self.schedule == "first":
            return jnp.asarray(2**30, jnp.int32)
        if self.schedule == "periodic":
            return period
        return step // period + 1  # annealing: the interval grows by one every `period` steps

    def prefill(self, model: CausalLM, input_ids, kv_mask, cache, state: SignalState):
        b, s = input_ids.shape
        full = mask(kv_mask[:, :s], state.roles, "sft")
        full = jnp.concatenate([full, jnp.zeros((b, s, kv_mask.shape[1] - s), bool)], axis=2)
        embeddings = model.embed(input_ids).at[:, 0].set(state.params["cls"].astype(model.dtype))
        out = model.forward(input_ids, kv_mask, cache=cache, mask=full, embeddings=embeddings)
        return out, state._replace(pending=self._p(state, out.hidden[:, 0]))

    def feed(self, model: CausalLM, decode: DecodeState, last: jax.Array):
        """Feeds the last tokens; at a scheduled check, ``[CLS]`` rides along as a second query
        of the same forward (one pass over the weights), seeing what rules 1-4 allow and
        itself. Its keys / values land in the slot after the token's, which is not yet a real
        slot and which the next token overwrites: the cache's real slots, and so the answer,
        are untouched."""
        state: SignalState = decode.policy

        def plain(_):
            return default_feed(model, decode, last)[0], jnp.full(last.shape[:1], jnp.nan, jnp.float32)

        def with_check(_):
            b, kv_len = decode.kv_mask.shape
            slot = decode.cache.index  # the token's slot; [CLS] goes in the next
            sees = self._sees(state, decode) | (jnp.arange(kv_len) == slot + 1)[None]
            rows = jnp.stack([default_mask(decode.kv_mask, 1, slot)[:, 0], sees], axis=1)
            positions = jnp.stack([jnp.sum(decode.kv_mask, axis=1, dtype=jnp.int32) - 1,
                                   jnp.zeros((b,), jnp.int32)], axis=1)  # [CLS] sits at position 0
            cls = jnp.broadcast_to(state.params["cls"].astype(model.dtype), (b, 1, model.config.hidden_size))
            embeddings = jnp.concatenate([model.embed(last), cls], axis=1)
            out = model.forward(jnp.concatenate([last, jnp.zeros_like(last)], axis=1), decode.kv_mask,
                                cache=decode.cache, positions=positions, mask=rows, embeddings=embeddings)
            cache = out.cache._replace(index=slot + 1)
            return out._replace(hidden=out.hidden[:, :1], cache=cache), self._p(state, out.hidden[:, 1])

        out, p = jax.lax.cond(decode.step == state.next_check, with_check, plain, None)
        return out, state._replace(pending=p)

    def _p(self, state: SignalState, hidden: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(head_logit(SafetySignal(state.params, self.head), hidden))

    def _sees(self, state: SignalState, decode: DecodeState) -> jax.Array:
        """What ``[CLS]`` sees at a check of step ``decode.step`` (rules 1-4), ``[B, kv_len]``:
        the answer slots so far are the prompt's answer prefix and the tokens generated before
        the step."""
        b, kv_len = decode.kv_mask.shape
        prompt_len, rules = state.roles.shape[1], state.rules
        future = jnp.zeros((b, kv_len - prompt_len), bool)
        query = jnp.concatenate([(state.roles == Role.USER) | (state.roles == Role.SYSTEM), future], axis=1)
        prefilled = jnp.concatenate([state.roles == Role.RESPONSE, future], axis=1)
        slot = jnp.arange(kv_len)[None]
        answer = prefilled | ((slot >= prompt_len) & (slot < prompt_len + decode.step))
        rank = jnp.cumsum(answer, axis=1)
        total = rank[:, -1:]
        rule2 = answer & (rank > total - rules.r2)
        rule1 = query | (answer & (rank <= rules.r1))
        t = state.transition[:, None]
        rule3 = answer & (rank >= t - rules.r2) & (rank <= t + rules.r3)
        return jnp.where(state.first_malicious[:, None], rule1, jnp.where(t >= 0, rule3, rule2))

    def __call__(self, model: CausalLM, decode: DecodeState, chosen: jax.Array):
        state: SignalState = decode.policy
        s = decode.step
        answer_len = jnp.sum(state.roles == Role.RESPONSE, axis=1) + s  # the prompt's answer prefix, then s tokens
        scheduled = s == state.next_check
        p = state.pending  # computed by this step's feed (or the prefill) under the same schedule
        check = scheduled & ~decode.done  # a finished row is not checked
        p = jnp.where(check, p, jnp.nan)
        malicious = check & ~(p <= state.rules.threshold)  # a NaN verdict fails closed
        benign = check & (p <= state.rules.threshold)
        first_malicious = jnp.where(s == 0, malicious, state.first_malicious)
        transition = jnp.where(malicious & (state.consecutive == 0) & (s > 0) & (state.transition < 0),
                               answer_len, jnp.where(benign, -1, state.transition))
        consecutive = jnp.where(malicious, state.consecutive + 1, jnp.where(benign, 0, state.consecutive))
        trigger = (state.inserted < 0) & ~decode.done & ((malicious & (s == 0)) | (consecutive >= state.rules.tau))
        inserted = jnp.where(trigger, s, state.inserted)
        j = s - inserted
        k = state.prefix.shape[0]
        forcing = (inserted >= 0) & (j < k)
        token = jnp.where(forcing, state.prefix[jnp.clip(j, 0, k - 1)], chosen)
        checks = jax.lax.dynamic_update_slice_in_dim(state.checks, p[:, None], s, axis=1)
        next_check = jnp.where(scheduled, s + self.interval(s, state.rules.period), state.next_check)
        return token, state._replace(checks=checks, first_malicious=first_malicious, transition=transition,
                                     consecutive=consecutive, inserted=inserted, next_check=next_check,
                                     pending=jnp.full_like(p, jnp.nan))  # used: a stale read would fail closed


def decode_inputs(signal: SafetySignal, chunk: Sequence[Chat], *, batch_size: int, bucket: int, pad_id: int,
                  max_new_tokens: int, refusal_ids: jax.Array, rules: Rules = Rules()
                  ) -> tuple[jax.Array, jax.Array, SignalState]:
    """``(input_ids, prompt_mask, initial SignalState)`` of a batch of encoded prompts under
    ``rules`` (checked): each row ``[CLS]`` (slot 0), left padding, the prompt; rows beyond
    ``chunk`` are filler (empty but for ``[CLS]``: pass ``active=real_rows(len(chunk),
    batch_size)`` to ``generate_tokens`` so that they start finished)."""
    rows = [c.ids.tolist() for c in chunk] + [[]] * (batch_size - len(chunk))
    length = padded_length(1 + max(len(r) for r in rows), bucket)
    body, body_mask = left_pad(rows, length - 1, pad_id)
    body_roles, _ = left_pad([c.roles.tolist() for c in chunk] + [[]] * (batch_size - len(chunk)), length - 1,
                             int(Role.PADDING))
    column = np.zeros((batch_size, 1), np.int32)
    ids, attn = np.concatenate([column, body], 1), np.concatenate([column + 1, body_mask], 1)
    b = batch_size
    state = SignalState(
        signal.params, rules.check().arrays(), jnp.asarray(np.concatenate([column, body_roles], 1)),
        jnp.full((b, max_new_tokens), jnp.nan, jnp.float32), jnp.zeros((b,), bool), jnp.full((b,), -1, jnp.int32),
        jnp.zeros((b,), jnp.int32), jnp.full((b,), -1, jnp.int32), jnp.asarray(refusal_ids, jnp.int32),
        jnp.zeros((), jnp.int32), jnp.full((b,), jnp.nan, jnp.float32))
    return *put_rows((ids, attn)), state


def generate(
    model: CausalLM,
    signal: SafetySignal,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    threshold: float = 0.5,
    schedule: str = "each",
    period: int = 10,
    r1: int = 10,
    r2: int = 10,
    r3: int = 10,
    tau: int = 3,
    refusal_prefix: str = REFUSAL_PREFIX,
    system_prompt: str | None = None,
    answer_prefix: str | Sequence[str] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    bucket: int = 64,
) -> list[dict[str, Any]]:
    """Answers with the safety signal deciding, as the answer grows, whether to refuse.

    Returns per prompt ``{"text", "checks": [(step, p), ...], "inserted": step or None}``
    (``text`` includes the answer prefix, as :func:`ssah_jax.generation.generate`'s does;
    ``checks`` are those of the answer's steps, including the step that emitted the stop token)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rules = Rules(threshold, period, r1, r2, r3, tau).check()
    check_sampling(temperature, top_k, top_p)
    refusal_ids = tokenizer(refusal_prefix, add_special_tokens=False)["input_ids"]
    if not refusal_ids:
        raise ValueError(f"the refusal prefix must tokenize to at least one token, got {refusal_prefix!r}")
    prefixes = ([answer_prefix or ""] * len(prompts) if answer_prefix is None or isinstance(answer_prefix, str)
                else list(answer_prefix))
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} answer prefixes for {len(prompts)} prompts")
    encoded = [encode_prompt(tokenizer, p, system_prompt=system_prompt, answer_prefix=a)
               for p, a in zip(prompts, prefixes)]
    check_query(encoded, prompts)
    prefix_ids = jnp.asarray(refusal_ids, jnp.int32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(seed)
    results: list[dict[str, Any]] = []
    rows = padded_rows(batch_size)  # filler rows up to a multiple of the mesh's data-parallel size
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, attn, policy_state = decode_inputs(signal, chunk, batch_size=rows, bucket=bucket, pad_id=pad_id,
                                                max_new_tokens=max_new_tokens, refusal_ids=prefix_ids, rules=rules)
        policy = StrategicDecoding(signal.head, schedule)
        rng, sub = jax.random.split(rng)
        tokens, final = generate_tokens(
            graphdef, state, ids, attn, sub, jnp.float32(max(temperature, 1e-6)),
            jnp.int32(top_k), jnp.float32(top_p), jnp.asarray(stops, jnp.int32), jnp.int32(pad_id), policy_state,
            put_rows(real_rows(len(chunk), rows)), max_new_tokens=max_new_tokens, sample=temperature > 0, policy=policy,
            return_policy_state=True)
        tokens, checks, inserted = np.asarray(tokens), np.asarray(final.checks), np.asarray(final.inserted)
        for i, prefix in enumerate(prefixes[start : start + len(chunk)]):
            row = tokens[i]
            hits = np.flatnonzero(np.isin(row, stops))
            row = row[: hits[0]] if hits.size else row
            ran = len(row) + 1 if hits.size else len(row)  # the steps run: the answer's, and its stop token's
            steps = np.flatnonzero(~np.isnan(checks[i][:ran]))
            results.append({"text": prefix + tokenizer.decode(row, skip_special_tokens=True),
                            "checks": [(int(t), float(checks[i, t])) for t in steps],
                            "inserted": None if not 0 <= inserted[i] < ran else int(inserted[i])})
    return results


@dataclasses.dataclass(frozen=True)
class SignalModel:
    """A model deployed with its safety signal: answers come from :func:`generate` under these
    settings (a :class:`~ssah_jax.generation.Responder`, so every evaluation task takes it in
    place of a model; log-likelihood tasks score ``model`` itself). Each answer records its
    checks and the step a refusal was inserted."""

    model: CausalLM
    signal: SafetySignal
    threshold: float = 0.5
    schedule: str = "each"
    period: int = 10
    r1: int = 10
    r2: int = 10
    r3: int = 10
    tau: int = 3
    refusal_prefix: str = REFUSAL_PREFIX

    def respond(self, tokenizer: Any, prompts: Sequence[str], *, chat: bool = True, progress: bool = False,
                **kwargs: Any) -> list[dict[str, Any]]:
        if not chat:
            raise ValueError("a safety signal answers chat prompts only (its [CLS] reads the user's turn)")
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("model", "signal")}
        return generate(self.model, self.signal, tokenizer, prompts, **settings, **kwargs)
