"""A linear probe that starts the ``[CLS]`` head where it already separates the classes, before
the signal trains alongside the alignment ("linear probing, then fine-tuning": Kumar et al.,
ICLR 2022).

A fresh head on the model's final ``[CLS]`` state starts at chance, and with the alignment's
few steps and small batches whether it leaves chance hangs on the trajectory: the same code and
config trained a classifier of held-out AUROC 0.89 on one CPU and 0.69 on another. The probe
fits the head's output layer by L2-regularised logistic regression (full batch, L-BFGS) on the
frozen model's ``[CLS]`` states of the training prompts, its regularisation chosen by the
binary cross-entropy on the validation prompts: a convex fit, the same on any machine up to
rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssah_jax.data import Chat, Example, Role
from ssah_jax.models import CausalLM
from ssah_jax.signals.signal import SafetySignal, cls_states

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # the strengths tried, weakest first (ties go to the weakest)
STEPS = 200  # L-BFGS iterations per fit


def query_chat(example: Example) -> Chat:
    """The part of a training example that ``[CLS]`` sees, directly or through the prompt's
    tokens: everything before the assistant header (its state is the same as over the whole row,
    since the answer side comes after the query and the query never sees it)."""
    answer = np.flatnonzero((example.roles == Role.HEADER) | (example.roles == Role.RESPONSE))
    end = int(answer[0]) if answer.size else len(example.ids)
    return Chat("", example.ids[:end], example.roles[:end])


def _features(signal: SafetySignal, hidden: jax.Array) -> jax.Array:
    """The input of the head's output layer (``w``, ``b``)."""
    p = signal.params["head"]
    return jax.nn.gelu(hidden @ p["w1"] + p["b1"]) if signal.head == "mlp" else hidden


def _bce(w: jax.Array, b: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w + b, y))


def fit_output_layer(x: jax.Array, y: jax.Array, l2: float, steps: int = STEPS) -> tuple[jax.Array, jax.Array]:
    """``(w, b)`` minimising ``mean BCE(x @ w + b, y) + l2 / 2 * |w|^2`` (features ``x [n, d]``,
    labels ``y [n]`` in {0, 1}), by ``steps`` iterations of optax's L-BFGS from zero."""
    def objective(params):
        w, b = params
        return _bce(w, b, x, y) + 0.5 * l2 * jnp.sum(w * w)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(params, updates), state), None

    params = (jnp.zeros(x.shape[1], jnp.float32), jnp.zeros((), jnp.float32))
    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), length=steps)
    return params


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What the probe chose and how well it separates: ``l2``; per strength of :data:`L2_GRID`,
    the validation BCE; the chosen head's BCE and accuracy (at logit 0) on the training and the
    validation prompts (``n_train`` and ``n_validation`` of them)."""

    l2: float
    validation_bce: dict[float, float]
    train: dict[str, float]
    validation: dict[str, float]
    n_train: int
    n_validation: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "validation_bce": {str(k): v for k, v in self.validation_bce.items()}}

    def __str__(self) -> str:
        return (f"linear probe of the [CLS] head: L2 {self.l2:g} (chosen on {self.n_validation} validation prompts), "
                f"BCE {self.train['bce']:.3f} / accuracy {self.train['accuracy']:.3f} on the {self.n_train} training "
                f"prompts, {self.validation['bce']:.3f} / {self.validation['accuracy']:.3f} on the validation ones")


def fit_probe(model: CausalLM, signal: SafetySignal, train: Sequence[Example], validation: Sequence[Example], *,
          pad_id: int, batch_size: int = 8) -> tuple[SafetySignal, ProbeResult]:
    """``signal`` with its head's output layer fitted to the labels of ``train`` on the model's
    ``[CLS]`` states (the model and the ``[CLS]`` embedding as they are), the L2 strength of
    :data:`L2_GRID` that gives ``validation`` the lowest BCE; both sets need both classes."""
    for name, examples in (("training", train), ("validation", validation)):
        if len({e.label for e in examples}) < 2:
            raise ValueError(f"the probe's {name} examples must hold both classes (malicious and benign)")

    def data(examples):
        hidden = cls_states(model, signal, [query_chat(e) for e in examples], pad_id=pad_id, batch_size=batch_size)
        return _features(signal, jnp.asarray(hidden)), jnp.asarray([e.label for e in examples], jnp.float32)

    (x, y), (xv, yv) = data(train), data(validation)
    fits = {l2: fit_output_layer(x, y, l2) for l2 in L2_GRID}
    scores = {l2: float(_bce(*fits[l2], xv, yv)) for l2 in L2_GRID}
    best = min(L2_GRID, key=lambda l2: (scores[l2], l2))
    w, b = fits[best]

    def quality(features, labels):
        logit = features @ w + b
        return {"bce": float(_bce(w, b, features, labels)),
                "accuracy": float(jnp.mean(((logit > 0).astype(jnp.float32) == labels).astype(jnp.float32)))}

    head = {**signal.params["head"], "w": w, "b": b}
    return (SafetySignal({**signal.params, "head": head}, signal.head),
            ProbeResult(best, scores, quality(x, y), quality(xv, yv), len(train), len(validation)))
