"""The training objective of the explicit safety signal: ``L_lm + lambda * L_cls``.

``L_lm`` is the mean NLL of the loss-mask tokens with ``[CLS]`` in front of every row (the SFT
loss of alignment, or the LM loss of pre-training when the loss mask covers the text);
``L_cls`` the mean binary cross-entropy of the ``[CLS]`` classifier on the rows' labels (the
batch's ``label``: 1 malicious, 0 benign). Both under the mask of the phase (``"sft"`` or
``"pretrain"``, :func:`ssah_jax.signals.mask`). Plug it into training with
``setup_training(..., objective=SignalLoss(...), extra={"signal": signal.params})``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ssah_jax.models import CausalLM
from ssah_jax.signals.signal import PHASES, SafetySignal, forward


def _targets(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["loss_mask"][:, 1:].astype(jnp.float32)


def _rows(batch: dict[str, jax.Array]) -> jax.Array:
    return (jnp.sum(batch["attention_mask"], axis=1) > 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SignalLoss:
    """``nll + lam * cls`` (terms ``nll``, ``cls``; ``cls_accuracy`` is a metric). ``lam``: 0.1
    (the paper's alignment default; 0.01 the alternative and the pre-training value); ``phase``:
    ``"sft"`` or ``"pretrain"``. The head kind is read from the signal's parameters."""

    lam: float = 0.1
    phase: str = "sft"

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"SignalLoss: phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (("nll", 1.0), ("cls", float(self.lam)), ("cls_accuracy", 0.0))

    def counts(self, batch):
        rows = jnp.sum(_rows(batch))
        return {"nll": jnp.sum(_targets(batch)), "cls": rows, "cls_accuracy": rows}

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], *, signal: Any) -> dict[str, jax.Array]:
        head = "mlp" if "w1" in signal["head"] else "linear"
        out, logit = forward(model, SafetySignal(signal, head), batch["input_ids"], batch["attention_mask"],
                             batch["roles"], self.phase)
        logits = model.logits(out.hidden[:, 1:-1])  # the tokens' predictions; [CLS]'s own is not one
        ids = batch["input_ids"]
        is_target = jnp.arange(logits.shape[-1]) == ids[:, 1:, None]
        logp = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1) - jax.nn.logsumexp(logits, axis=-1)
        label = batch["label"].astype(jnp.float32)
        rows = _rows(batch)
        bce = optax.sigmoid_binary_cross_entropy(logit, label)
        correct = ((logit > 0).astype(jnp.float32) == label).astype(jnp.float32)
        return {"nll": -jnp.sum(logp * _targets(batch)), "cls": jnp.sum(bce * rows),
                "cls_accuracy": jnp.sum(correct * rows)}
