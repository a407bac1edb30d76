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

