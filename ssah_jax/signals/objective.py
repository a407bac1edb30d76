"""The training objective of the explicit safety signal: ``L_lm + lambda * L_cls``.

``L_lm`` is the mean NLL of the loss-mask tokens with ``[CLS]`` in front of every row (the SFT
loss of alignment, or the LM loss of pre-training when the loss mask covers the text);
``L_cls`` the mean binary cross-entropy of the ``[CLS]`` classifier on the rows' labels (the
batch's ``label``: 1 malicious, 0 benign). Both under the mask of the phase (``"sft"`` or
``"pretrain"``, :func:`ssah_jax.signals.mask`). With ``rechecks``, ``L_cls`` also covers the
views the decoding's later checks get (:class:`~ssah_jax.signals.Rechecks`: rule 1 labelled by
``label``, rule 2's answer windows by ``answer_label``), as term ``recheck`` of the same weight.
Plug it into training with ``setup_training(..., objective=SignalLoss(...), extra={"signal":
signal.params})``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssah_jax.models import CausalLM
from ssah_jax.signals.signal import PHASES, Rechecks, SafetySignal, forward, forward_views, prepend_cls, views


def _targets(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["loss_mask"][:, 1:].astype(jnp.float32)


def _rows(batch: dict[str, jax.Array]) -> jax.Array:
    return (jnp.sum(batch["attention_mask"], axis=1) > 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SignalLoss:
    """``nll + lam * cls (+ lam * recheck)`` (``cls_accuracy`` and ``recheck_accuracy`` are
    metrics). ``lam``: 0.1 (the paper's alignment default; 0.01 the alternative and the
    pre-training value); ``phase``: ``"sft"`` or ``"pretrain"``; ``rechecks``: the decoding
    checks' views trained too (None: the first check's alone); ``lm=False``: the ``[CLS]``-only
    loss, for text the model must not learn (harmful text in signal pre-training): ``nll`` is a
    metric only and no gradient reaches the model's parameters, not even through what ``[CLS]``
    reads (freeze the model too, or weight decay still moves it). The head kind is read from the
    signal's parameters."""

    lam: float = 0.1
    phase: str = "sft"
    rechecks: Rechecks | None = None
    lm: bool = True

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"SignalLoss: phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        terms = (("nll", 1.0 if self.lm else 0.0), ("cls", float(self.lam)), ("cls_accuracy", 0.0))
        return terms + ((("recheck", float(self.lam)), ("recheck_accuracy", 0.0)) if self.rechecks else ())

    def counts(self, batch):
        rows = jnp.sum(_rows(batch))
        out = {"nll": jnp.sum(_targets(batch)), "cls": rows, "cls_accuracy": rows}
        if self.rechecks:  # the views used: as forward_views decides, from the masks alone
            _, attn, roles = prepend_cls(batch["input_ids"], batch["attention_mask"], batch["roles"])
            used = jnp.sum(views(attn, roles, self.rechecks)[1] & (_rows(batch)[:, None] > 0))
            out.update(recheck=used, recheck_accuracy=used)
        return out

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], *, signal: Any) -> dict[str, jax.Array]:
        head = "mlp" if "w1" in signal["head"] else "linear"
        if not self.lm:  # the model computes as ever; only the signal's parameters learn
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        args = (model, SafetySignal(signal, head), batch["input_ids"], batch["attention_mask"], batch["roles"])
        if self.rechecks:
            out, logit, view_logits, used = forward_views(*args, self.rechecks, self.phase)
        else:
            out, logit = forward(*args, self.phase)
        logits = model.logits(out.hidden[:, 1:-1])  # the tokens' predictions; [CLS]'s own is not one
        ids = batch["input_ids"]
        is_target = jnp.arange(logits.shape[-1]) == ids[:, 1:, None]
        logp = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1) - jax.nn.logsumexp(logits, axis=-1)
        rows = _rows(batch)
        label = batch["label"].astype(jnp.float32)
        sums = {"nll": -jnp.sum(logp * _targets(batch)), **_classified(logit, label, rows, "cls")}
        if self.rechecks:  # view 0 (rule 1) reads the query: the row's label; the windows the answer's
            labels = jnp.concatenate([label[:, None], jnp.broadcast_to(
                batch["answer_label"].astype(jnp.float32)[:, None], view_logits[:, 1:].shape)], axis=1)
            sums.update(_classified(view_logits, labels, used * rows[:, None], "recheck"))
        return sums


def _classified(logit: jax.Array, label: jax.Array, weight: jax.Array, name: str) -> dict[str, jax.Array]:
    """The summed binary cross-entropy and correct count of ``logit`` against ``label`` over the
    entries of ``weight`` 1."""
    weight = weight.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logit, label)
    correct = ((logit > 0).astype(jnp.float32) == label).astype(jnp.float32)
    return {name: jnp.sum(bce * weight), f"{name}_accuracy": jnp.sum(correct * weight)}
