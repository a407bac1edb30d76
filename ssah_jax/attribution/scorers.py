"""Unit scores: WIFV (SSAH), Wanda and SNIP, streamed over calibration batches.

Every scorer is two pure pieces: a jitted *statistics step* ``(params, accumulator, batch) ->
accumulator`` that sees one batch at a time (the activations of the whole calibration set are
never held), and a *finaliser* that turns the statistics and the ``B`` weights into scores.
Scores are ``{"attn": [layers, num_heads * head_dim], "mlp": [layers, intermediate_size]}``
float32, unit ``j`` being input channel ``j`` of ``o_proj`` / ``down_proj`` (the SSAH units):

    wifv   Var_t(x_j) * ||W_B[:, j]||^2              (Li & Kim, SSAH; FLAP's fluctuation metric)
    wanda  ||x_j||_2 * sum_i |W_B[i, j]|             (Wanda's |W| * ||X||, summed over the column)
    snip   sum_i |W_B[i, j] * dL/dW_B[i, j]|         (L: mean NLL of the counted target tokens)

``x_j`` runs over the counted tokens (``tokens``): the response (default; the tokens the loss
mask marks), the prompt (real tokens before the response), or all real tokens. For SNIP they
are the predicted tokens. SNIP's gradient is of the loss over the *whole* calibration set (the
sum of the batches' gradients), so the scores do not depend on the batching; Wei et al. (2024)
take the absolute value per batch instead, which does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssah_jax.attribution.stats import Moments, batch_moments, merge
from ssah_jax.models import B_MATRIX, MODULES, CausalLM, Layout, next_token_logprobs, unit_shapes, with_layout
from ssah_jax.sharding import put_rows

SCORERS = ("wifv", "wanda", "snip")
TOKENS = ("response", "prompt", "all")

Scores = dict[str, jax.Array]


def token_mask(batch: Mapping[str, jax.Array], tokens: str) -> jax.Array:
    """``[B, S]`` bool: the tokens that count. ``batch`` has ``attention_mask`` and, for
    ``response`` / ``prompt``, ``loss_mask`` (as :func:`ssah_jax.data.batching.pad_batch` makes)."""
    real = batch["attention_mask"] > 0
    if tokens == "all":
        return real
    response = batch["loss_mask"] > 0
    if tokens == "response":
        return real & response
    return real & (jnp.cumsum(response, axis=1) == 0)  # prompt: before the first response token


def _check(batch: Mapping[str, Any], tokens: str) -> None:
    need = {"input_ids", "attention_mask"} | ({"loss_mask"} if tokens != "all" else set())
    missing = need - set(batch)
    if missing:
        raise ValueError(
            f"a calibration batch lacks {sorted(missing)} (tokens={tokens!r}); batches from "
            "ssah_jax.data.batching.batch_dataset have input_ids, attention_mask and loss_mask"
        )


# ---------------------------------------------------------------------------------------------
# Activation moments (WIFV, Wanda)


def _stack(per_layer: list[Moments]) -> Moments:
    return Moments(per_layer[0].count, jnp.stack([m.mean for m in per_layer]), jnp.stack([m.m2 for m in per_layer]))


@functools.partial(jax.jit, static_argnames=("graphdef", "tokens"), donate_argnums=(2,))
def moments_step(graphdef: nnx.GraphDef, state: nnx.State, acc: dict[str, Moments], batch: dict, tokens: str):
    """Merges one batch's per-unit activation moments into ``acc`` (``{module: Moments}``,
    stacked over layers)."""
    model = nnx.merge(graphdef, state)
    out = model.forward(batch["input_ids"], batch["attention_mask"], output_unit_inputs=True)
    mask = token_mask(batch, tokens)
    new = {m: _stack([batch_moments(getattr(u, m), mask) for u in out.unit_inputs]) for m in MODULES}
    return {m: merge(acc[m], new[m]) for m in MODULES}


def activation_moments(model: CausalLM, batches: Iterable[Mapping[str, Any]], tokens: str = "response"):
    """``{"attn": Moments, "mlp": Moments}`` of the activations entering each ``B`` matrix."""
    graphdef, state = nnx.split(model)
    acc = {m: Moments.zeros(shape) for m, shape in unit_shapes(model.config).items()}
    for batch in batches:
        _check(batch, tokens)
        acc = moments_step(graphdef, state, acc, put_rows(dict(batch)), tokens)
    return acc


# ---------------------------------------------------------------------------------------------
# Gradients of the B matrices (SNIP)


def is_b_kernel(path: tuple, _value: Any) -> bool:
    """The filter of the ``B`` kernels (o_proj, down_proj) of an unrolled model's state."""
    return len(path) == 5 and path[0] == "layers" and path[3] in B_MATRIX.values() and path[4] == "kernel"


def _nll_sum(model: CausalLM, batch: Mapping[str, jax.Array], tokens: str) -> tuple[jax.Array, jax.Array]:
    picked = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    targets = token_mask(batch, tokens)[:, 1:]
    return -jnp.sum(jnp.where(targets, picked, 0.0)), jnp.sum(targets.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "tokens"), donate_argnums=(3,))
def gradient_step(graphdef, b_state: nnx.State, rest: nnx.State, acc: tuple[nnx.State, jax.Array], batch, tokens):
    """Adds one batch's gradient of the summed target NLL w.r.t. the ``B`` kernels to ``acc``
    (``(gradient sums, target count)``)."""
    grads, count = jax.grad(lambda b: _nll_sum(nnx.merge(graphdef, b, rest), batch, tokens), has_aux=True)(b_state)
    sums, total = acc
    return jax.tree.map(lambda s, g: s + g.astype(jnp.float32), sums, grads), total + count


def gradient_sums(model: CausalLM, batches: Iterable[Mapping[str, Any]], tokens: str = "response"):
    """``(sums, count)``: the summed NLL gradient of every ``B`` kernel (an ``nnx.State`` of
    float32 arrays) and the number of target tokens; ``sums / count`` is the mean-loss gradient."""
    model = _unrolled(model)
    graphdef, b_state, rest = nnx.split(model, is_b_kernel, ...)
    # float32 sums laid out like the kernels they belong to (sharded on a mesh, never whole on one device)
    zeros = jax.jit(lambda s: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), s),
                    out_shardings=jax.tree.map(lambda x: x.sharding, b_state))
    acc = (zeros(b_state), jnp.zeros((), jnp.int32))
    for batch in batches:
        _check(batch, tokens)
        acc = gradient_step(graphdef, b_state, rest, acc, put_rows(dict(batch)), tokens)
    return acc


@functools.partial(jax.jit, static_argnames=("graphdef", "tokens"), donate_argnums=(4,))
def layer_gradient_step(graphdef, b_state: nnx.State, rest: nnx.State, layer: jax.Array, acc, batch, tokens):
    """Adds one batch's gradient of the summed target NLL w.r.t. the ``B`` kernels of layer
    ``layer`` (a traced index: one program serves every layer) to ``acc`` (``({module: sums
    [units, hidden]}, target count)``): the gradient w.r.t. a zero added to that layer's kernels."""

    def loss(deltas):
        def shifted(path, kernel):  # path: layers / <layer> / <module> / <proj> / kernel
            j, module = path[1].key, path[2].key
            return kernel + jnp.where(layer == j, deltas[module], 0.0).astype(kernel.dtype)

        b = jax.tree_util.tree_map_with_path(shifted, b_state)
        return _nll_sum(nnx.merge(graphdef, b, rest), batch, tokens)

    sums, total = acc
    grads, count = jax.grad(loss, has_aux=True)(jax.tree.map(jnp.zeros_like, sums))
    return jax.tree.map(lambda s, g: s + g, sums, grads), total + count


# ---------------------------------------------------------------------------------------------
# Finalisers and the entry point


def _unrolled(model: CausalLM) -> CausalLM:
    """Attribution reads layer by layer: a scanned model is unrolled first (same parameters)."""
    return with_layout(model, Layout(remat=model.layout.remat)) if model.layout.scan else model


def b_kernels(model: CausalLM, module: str) -> list[jax.Array]:
    """Each layer's ``B`` kernel for ``module``, ``[units, hidden]`` (unit = row), either layout."""
    if model.layout.scan:
        stacked = getattr(getattr(model.layers, module), B_MATRIX[module]).kernel[...]
        return [stacked[i] for i in range(model.config.num_layers)]
    return [getattr(getattr(layer, module), B_MATRIX[module]).kernel[...] for layer in model.layers]


@jax.jit
def _row_reductions(kernels: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    k = jnp.stack(kernels).astype(jnp.float32)
    return jnp.sum(k * k, axis=-1), jnp.sum(jnp.abs(k), axis=-1)


def wifv(model: CausalLM, moments: dict[str, Moments]) -> Scores:
    """SSAH score: activation variance times the squared norm of the unit's ``B`` column."""
    return {m: moments[m].variance * _row_reductions(b_kernels(model, m))[0] for m in MODULES}


def wanda(model: CausalLM, moments: dict[str, Moments]) -> Scores:
    """Wanda's ``|W| * ||X||_2`` summed over the unit's ``B`` column."""
    return {m: jnp.sqrt(moments[m].sum_squares) * _row_reductions(b_kernels(model, m))[1] for m in MODULES}


def snip(model: CausalLM, sums: nnx.State, count: jax.Array) -> Scores:
    """SNIP ``|W * dL/dW|`` summed over the unit's ``B`` column (L: mean target NLL)."""
    n = jnp.maximum(count, 1).astype(jnp.float32)
    out = {}
    for m in MODULES:
        proj = B_MATRIX[m]
        grads = [sums["layers"][i][m][proj]["kernel"][...] for i in range(model.config.num_layers)]
        out[m] = jnp.stack([
            jnp.sum(jnp.abs(w.astype(jnp.float32) * g), axis=-1) for w, g in zip(b_kernels(model, m), grads)
        ]) / n
    return out


def snip_by_layer(model: CausalLM, batches: Iterable[Mapping[str, Any]], tokens: str = "response"
                  ) -> tuple[Scores, jax.Array]:
    """SNIP scores one layer at a time (Wei et al. 2024's way of scoring 7B-70B models): a pass
    over the calibration set per layer (:func:`layer_gradient_step`, compiled once), so only one
    layer's gradient sums exist at a time. The same scores as :func:`snip` of
    :func:`gradient_sums`, at ``layers`` times the passes. Returns ``(scores, target count)``."""
    batches = [put_rows(dict(batch)) for batch in batches]  # read once per layer
    for batch in batches:
        _check(batch, tokens)
    model = _unrolled(model)
    graphdef, b_state, rest = nnx.split(model, is_b_kernel, ...)
    first = {m: b_state["layers"][0][m][B_MATRIX[m]]["kernel"][...] for m in MODULES}
    # float32 sums laid out like one layer's kernels
    zeros = jax.jit(lambda k: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), k),
                    out_shardings=jax.tree.map(lambda x: x.sharding, first))
    parts, count = [], jnp.zeros((), jnp.int32)
    for i in range(model.config.num_layers):
        acc = (zeros(first), jnp.zeros((), jnp.int32))
        for batch in batches:
            acc = layer_gradient_step(graphdef, b_state, rest, jnp.int32(i), acc, batch, tokens)
        sums, count = acc
        n = jnp.maximum(count, 1).astype(jnp.float32)
        parts.append({m: jnp.sum(jnp.abs(b_kernels(model, m)[i].astype(jnp.float32) * sums[m]), axis=-1) / n
                      for m in MODULES})
    return {m: jnp.stack([p[m] for p in parts]) for m in MODULES}, count


def unit_scores(
    model: CausalLM, batches: Iterable[Mapping[str, Any]], scorer: str = "wifv", tokens: str = "response",
    *, by_layer: bool = False,
) -> Scores:
    """Scores of every unit on a calibration set, streamed one batch at a time.

    Args:
      model: the model to attribute (placed on a mesh for sharded scoring: enter it with
        ``jax.set_mesh`` and ``ssah_jax.sharding.use_rules`` around the call).
      batches: iterable of dicts with ``input_ids``, ``attention_mask`` and ``loss_mask``
        ``[B, S]`` (this host's rows, e.g. from :func:`ssah_jax.data.batching.batch_dataset`).
      scorer: ``wifv`` | ``wanda`` | ``snip``.
      tokens: which tokens count: ``response`` | ``prompt`` | ``all``.
      by_layer: SNIP one layer at a time (:func:`snip_by_layer`): the same scores, for a
        model whose sharded gradient sums do not fit beside it.

    Returns:
      ``{"attn": [layers, heads * head_dim], "mlp": [layers, intermediate]}`` float32.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r}: must be one of {SCORERS}")
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens!r}: must be one of {TOKENS}")
    if scorer == "snip" and by_layer:
        scores, count = snip_by_layer(model, batches, tokens)
    elif scorer == "snip":
        sums, count = gradient_sums(model, batches, tokens)
    else:
        moments = activation_moments(model, batches, tokens)
        count = moments["mlp"].count
    if int(count) == 0:
        raise ValueError(f"the calibration batches hold no {tokens} tokens to score on")
    if scorer == "snip":
        return scores if by_layer else snip(model, sums, count)
    return (wifv if scorer == "wifv" else wanda)(model, moments)
