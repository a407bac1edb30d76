"""The explicit safety signal (Li & Kim, ICML 2025): a ``[CLS]`` position at index 0 of every
row, with its own learned embedding, and a head on its final hidden state giving p(malicious).

Pure functions over a :class:`SafetySignal` pytree and a :class:`~ssah_jax.models.CausalLM`.
The model's vocabulary and LM head are unchanged: ``[CLS]`` enters as an embedding row
(``CausalLM.forward(embeddings=...)``), so it can never be sampled, tied embeddings or not.

Who sees whom (``mask``), for a row ``[CLS] t_1 ... t_n`` (index 0 is ``[CLS]``):

- ``"pretrain"`` (signal pre-training on labelled text): ``[CLS]`` attends to every real token;
  no token attends to ``[CLS]``.
- ``"sft"`` (alignment, classification, generation): ``[CLS]`` attends to itself and the query
  (the system prompt and the user's prompt, :class:`~ssah_jax.data.Role` ``SYSTEM`` / ``USER``);
  the prompt's tokens do not attend to it; the answer side (the assistant header and what
  follows) does.

Every other pair follows the causal + padding mask. Because the prompt never sees ``[CLS]``,
the prompt's own computation is that of the model without the signal (rotary positions are
relative, so the shift by one slot changes nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax import hosts
from ssah_jax.data import Chat, Role, encode_prompt, left_pad, padded_length
from ssah_jax.models import CausalLM, ModelConfig, default_mask
from ssah_jax.sharding import padded_rows, put_rows

HEADS = ("linear", "mlp")
PHASES = ("pretrain", "sft")
FILE = "signal.safetensors"  # beside the model's own files


@flax.struct.dataclass
class SafetySignal:
    """``params``: ``{"cls": [hidden], "head": {...}}`` (float32); ``head``: ``"linear"``
    (``w [hidden]``, ``b``) or ``"mlp"`` (``w1 [hidden, hidden]``, ``b1``, then ``w``, ``b``)."""

    params: dict[str, Any]
    head: str = flax.struct.field(pytree_node=False, default="linear")

    @classmethod
    def init(cls, config: ModelConfig, head: str = "linear", *, rng: jax.Array) -> SafetySignal:
        """A fresh signal for a model of ``config``: the ``[CLS]`` embedding drawn like the
        model's token embeddings (normal, std 0.02), the head's output layer small and its bias 0."""
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        h = config.hidden_size
        k_cls, k1, k2 = jax.random.split(rng, 3)
        params = {"cls": 0.02 * jax.random.normal(k_cls, (h,), jnp.float32)}
        if head == "linear":
            params["head"] = {"w": 0.02 * jax.random.normal(k1, (h,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        else:
            params["head"] = {"w1": jax.random.normal(k1, (h, h), jnp.float32) / np.sqrt(h),
                              "b1": jnp.zeros((h,), jnp.float32),
                              "w": 0.02 * jax.random.normal(k2, (h,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        return cls(params, head)


def head_logit(signal: SafetySignal, hidden: jax.Array) -> jax.Array:
    """The classifier's logit (log-odds of malicious), float32 ``[...]``, from ``[CLS]``'s final
    (normed) hidden state ``[..., hidden]``."""
    p = signal.params["head"]
    x = hidden.astype(jnp.float32)
    if signal.head == "mlp":
        x = jax.nn.gelu(x @ p["w1"] + p["b1"])
    return x @ p["w"] + p["b"]


def prepend_cls(input_ids: jax.Array, attention_mask: jax.Array, roles: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows with a ``[CLS]`` slot at index 0 (id 0, a real slot, role ``PADDING`` — roles only
    describe tokens; the slot is recognised by its index)."""
    b = input_ids.shape[0]
    zeros = jnp.zeros((b, 1), input_ids.dtype)
    return (jnp.concatenate([zeros, input_ids], 1), jnp.concatenate([jnp.ones((b, 1), attention_mask.dtype),
                                                                      attention_mask], 1),
            jnp.concatenate([jnp.zeros((b, 1), roles.dtype), roles], 1))


def mask(attention_mask: jax.Array, roles: jax.Array, phase: str = "sft") -> jax.Array:
    """The boolean attention mask ``[B, L, L]`` of rows with ``[CLS]`` at index 0 (see the
    module docstring); ``attention_mask`` and ``roles`` ``[B, L]`` include the ``[CLS]`` slot."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    length = attention_mask.shape[1]
    real = attention_mask.astype(bool)
    base = default_mask(attention_mask, length, 0)  # causal + padding
    is_cls = jnp.arange(length) == 0
    if phase == "pretrain":
        cls_row = real
        sees_cls = jnp.zeros_like(real)
    else:
        query = (roles == Role.SYSTEM) | (roles == Role.USER)
        cls_row = (query | is_cls[None]) & real
        answer_side = jnp.cumsum((roles == Role.HEADER) | (roles == Role.RESPONSE), axis=1) > 0
        sees_cls = answer_side & real
    base = jnp.where(is_cls[None, :, None], cls_row[:, None, :], base)  # row 0: what [CLS] sees
    return jnp.where(is_cls[None, None, :] & ~is_cls[None, :, None], sees_cls[:, :, None], base)  # column 0


def forward(model: CausalLM, signal: SafetySignal, input_ids: jax.Array, attention_mask: jax.Array,
            roles: jax.Array, phase: str = "sft"):
    """The decoder over rows with ``[CLS]`` prepended: ``(decoder output over [B, 1 + L],
    logits of malicious [B])``. ``input_ids``, ``attention_mask``, ``roles`` ``[B, L]`` are
    without the slot (as :mod:`ssah_jax.data` batches them)."""
    ids, attn, roles = prepend_cls(input_ids, attention_mask, roles)
    embeddings = model.embed(ids)
    embeddings = embeddings.at[:, 0].set(signal.params["cls"].astype(embeddings.dtype))
    out = model.forward(ids, attn, mask=mask(attn, roles, phase), embeddings=embeddings)
    return out, head_logit(signal, out.hidden[:, 0])


@dataclasses.dataclass(frozen=True)
class Rechecks:
    """The views of the decoding's later checks (:mod:`ssah_jax.signals.decoding`), trained into
    ``[CLS]`` beside the first check, which sees the query alone. Per row, over its ``n`` answer
    tokens (role ``RESPONSE``):

    - one rule-1 view: the query and the first ``r1`` answer tokens, labelled as the row
      (``label``: the decoding reads it after a malicious first check);
    - ``windows`` rule-2 views: the ``r2`` answer tokens up to answer token ``ceil(k n /
      windows)``, ``k = 1 .. windows`` (so the last ends with the answer), labelled by what the
      answer shows (``answer_label``: 1 a harmful compliance, 0 a benign answer or a refusal);
      a view that would repeat the previous one (``n < windows``) is not used.

    Each view is one more ``[CLS]`` query slot after the row's tokens (rotary position 0, as at a
    check), seeing its window and itself; no token sees it, so the row computes as without it
    and every view shares the row's one forward pass (``1 + windows`` extra positions per row,
    instead of a forward per view)."""

    r1: int = 10
    r2: int = 10
    windows: int = 3

    def __post_init__(self):
        if min(self.r1, self.r2, self.windows) < 1:
            raise ValueError(f"Rechecks: r1, r2 and windows must be >= 1, got {self}")

    @property
    def count(self) -> int:
        return 1 + self.windows


def views(attention_mask: jax.Array, roles: jax.Array, rechecks: Rechecks) -> tuple[jax.Array, jax.Array]:
    """``(sees [B, V, L], used [B, V])``: what each of the :class:`Rechecks` views of rows with
    ``[CLS]`` at index 0 sees (``attention_mask``, ``roles`` ``[B, L]`` include the slot), and
    whether the view is used (the row has answer tokens, and the window is new). View 0 is rule
    1's, views ``1 ..`` rule 2's."""
    real = attention_mask.astype(bool)
    answer = (roles == Role.RESPONSE) & real
    rank = jnp.cumsum(answer, axis=1)  # [B, L]: answer tokens up to and including each slot
    n = rank[:, -1]  # [B]
    query = ((roles == Role.SYSTEM) | (roles == Role.USER)) & real
    rule1 = query | (answer & (rank <= rechecks.r1))
    k = jnp.arange(1, rechecks.windows + 1)
    ends = -((-k[None] * n[:, None]) // rechecks.windows)  # ceil(k n / windows), [B, W]
    starts = ends - rechecks.r2
    r = rank[:, None, :]
    rule2 = answer[:, None] & (r > starts[..., None]) & (r <= ends[..., None])  # [B, W, L]
    earlier = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    used = jnp.concatenate([(n > 0)[:, None], ends > earlier], axis=1)
    return jnp.concatenate([rule1[:, None], rule2], axis=1), used


def forward_views(model: CausalLM, signal: SafetySignal, input_ids: jax.Array, attention_mask: jax.Array,
                  roles: jax.Array, rechecks: Rechecks, phase: str = "sft"):
    """:func:`forward` with the :class:`Rechecks` views riding along as extra ``[CLS]`` query
    slots after each row: ``(decoder output over [B, 1 + L], logits [B], the views' logits
    [B, V], which views are used [B, V])``. The rows and their first ``[CLS]`` compute exactly as
    :func:`forward` computes them."""
    ids, attn, roles = prepend_cls(input_ids, attention_mask, roles)
    b, length = ids.shape
    v = rechecks.count
    sees, used = views(attn, roles, rechecks)
    rows = mask(attn, roles, phase)
    top = jnp.concatenate([rows, jnp.zeros((b, length, v), bool)], axis=2)
    bottom = jnp.concatenate([sees, jnp.broadcast_to(jnp.eye(v, dtype=bool), (b, v, v))], axis=2)
    full = jnp.concatenate([top, bottom], axis=1)
    positions = jnp.concatenate([jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0),
                                 jnp.zeros((b, v), attn.dtype)], axis=1).astype(jnp.int32)
    all_ids = jnp.concatenate([ids, jnp.zeros((b, v), ids.dtype)], axis=1)
    embeddings = model.embed(all_ids)
    cls = signal.params["cls"].astype(embeddings.dtype)
    embeddings = embeddings.at[:, 0].set(cls).at[:, length:].set(cls)
    out = model.forward(all_ids, jnp.concatenate([attn, jnp.ones((b, v), attn.dtype)], axis=1), positions=positions,
                        mask=full, embeddings=embeddings)
    logits = head_logit(signal, out.hidden[:, np.r_[0, length:length + v]])
    return out._replace(hidden=out.hidden[:, :length]), logits[:, 0], logits[:, 1:], used


def sees_query(roles: np.ndarray) -> bool:
    """Whether an encoded prompt's ``roles`` hold a query token (user or system) for ``[CLS]``
    to see; not when the prompt is empty or its chat template hid it from the encoder."""
    return bool(np.isin(roles, (Role.USER, Role.SYSTEM)).any())


def check_query(encoded: Sequence[Chat], prompts: Sequence[str]) -> None:
    """Refuses a prompt with no query token for ``[CLS]`` to see (:func:`sees_query`): its
    signal would be blind."""
    for chat, prompt in zip(encoded, prompts):
        if not sees_query(chat.roles):
            raise ValueError(f"prompt {prompt[:40]!r}: no query token the [CLS] signal can see (empty, or the chat "
                             "template hides it from the encoder)")


@nnx.jit
def _cls_hidden(model, signal, ids, attention_mask, roles):
    return forward(model, signal, ids, attention_mask, roles)[0].hidden[:, 0].astype(jnp.float32)


def cls_states(model: CausalLM, signal: SafetySignal, chats: Sequence[Chat], *, pad_id: int, batch_size: int = 8,
               bucket: int = 64) -> np.ndarray:
    """``[CLS]``'s final (normed) hidden state over each encoded prompt (float32 ``[n, hidden]``):
    the head's input, one full forward under the ``"sft"`` mask per batch of left-padded rows."""
    out = []
    rows = padded_rows(batch_size)  # filler rows up to a multiple of the mesh's data-parallel size
    for start in range(0, len(chats), batch_size):
        chunk = chats[start : start + batch_size]
        length = padded_length(max(len(c.ids) for c in chunk), bucket)
        fill = [[]] * (rows - len(chunk))
        ids, attn = left_pad([c.ids.tolist() for c in chunk] + fill, length, pad_id)
        roles, _ = left_pad([c.roles.tolist() for c in chunk] + fill, length, int(Role.PADDING))
        h = _cls_hidden(model, signal, *put_rows((ids, attn, roles)))
        out.append(hosts.fetch(h)[: len(chunk)])  # (on training's mesh the rows span every host)
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def classify(model: CausalLM, signal: SafetySignal, tokenizer: Any, prompts: Sequence[str], *,
             system_prompt: str | None = None, batch_size: int = 8, bucket: int = 64) -> np.ndarray:
    """p(malicious) of each prompt (float32 ``[n]``): the chat-rendered prompt (as generation
    sees it) with ``[CLS]`` in front, one full forward under the ``"sft"`` mask."""
    encoded = [encode_prompt(tokenizer, p, system_prompt=system_prompt) for p in prompts]
    check_query(encoded, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hidden = cls_states(model, signal, encoded, pad_id=pad, batch_size=batch_size, bucket=bucket)
    return np.asarray(jax.nn.sigmoid(head_logit(signal, jnp.asarray(hidden))), np.float32)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float32)
    return out


def save(signal: SafetySignal, directory: str | Path) -> Path:
    """Writes ``directory/signal.safetensors`` (no pickles; the head kind in its metadata),
    beside a model's own files."""
    from safetensors.numpy import save_file

    path = Path(directory) / FILE
    if not hosts.is_main():  # in a multi-host run process 0 writes it
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_flat(jax.device_get(signal.params)), str(path), metadata={"head": signal.head, "format": "ssah_jax"})
    return path


def load(directory: str | Path, config: ModelConfig | None = None) -> SafetySignal:
    """The signal saved by :func:`save` in ``directory``; with ``config``, checked against the
    model's hidden size."""
    from safetensors import safe_open

    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no safety signal here (ssah_jax.signals.save writes it)")
    with safe_open(str(path), "np") as f:
        head = (f.metadata() or {}).get("head", "")
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if head not in HEADS:
        raise ValueError(f"{path}: unknown head {head!r} in the metadata (expected one of {HEADS})")
    params: dict[str, Any] = {"head": {}}
    for key, value in flat.items():
        *parents, name = key.split(".")
        (params["head"] if parents == ["head"] else params)[name] = jnp.asarray(value)
    if np.ndim(params.get("cls")) != 1:
        raise ValueError(f"{path}: no [CLS] row ('cls', one dimension) in the file")
    hidden = params["cls"].shape[0]
    if config is not None and hidden != config.hidden_size:
        raise ValueError(f"{path}: a signal for hidden size {hidden}, the model has {config.hidden_size}")
    # what SafetySignal.init makes for this head and size, against what the file holds
    like = jax.eval_shape(lambda: SafetySignal.init(SimpleNamespace(hidden_size=hidden), head,
                                                    rng=jax.random.key(0)).params)
    expected, got = (jax.tree.map(lambda x: tuple(x.shape), tree) for tree in (like, params))
    if got != expected:
        raise ValueError(f"{path}: a {head} head holds {expected}, the file has {got}")
    return SafetySignal(params, head)

