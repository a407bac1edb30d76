"""Which contiguous block of layers carries a model's refusals: remove each block in turn (every
unit of its layers pruned, :func:`ssah_jax.masking.prune_units`: the layers become the identity)
and measure the refusal rate on harmful prompts and the perplexity of benign responses. A
block whose removal breaks the model (its perplexity far above the dense model's) does not
count: a broken model does not refuse either."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from ssah_jax.data import Record
from ssah_jax.evaluation.safety import answer_rows
from ssah_jax.evaluation.utility import perplexity_rows, summarise_perplexity
from ssah_jax.masking import prune_units
from ssah_jax.models import CausalLM, unit_shapes


def layer_blocks(model: CausalLM, tokenizer: Any, prompts: Sequence[Record], benign: Sequence[Record], *, size: int,
                 max_new_tokens: int, max_length: int, batch_size: int) -> tuple[dict[str, float], list[dict]]:
    """``(dense, blocks)``: the ``refusal_rate`` of greedy answers (``max_new_tokens``) to
    ``prompts`` and the ``perplexity`` of the responses of ``benign`` (``max_length`` tokens) of
    the dense model, and of the model without each block of ``size`` layers (``layers``:
    ``"i-j"``), in order."""

    def measure(m: CausalLM) -> dict[str, float]:
        refused = [row["refused"] for row in answer_rows(m, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                         batch_size=batch_size)]
        ppl = summarise_perplexity(perplexity_rows(m, tokenizer, benign, max_length=max_length,
                                                   batch_size=batch_size))["perplexity"]
        return {"refusal_rate": float(np.mean(refused)), "perplexity": ppl}

    graphdef, state = nnx.split(model)
    dense = measure(model)
    blocks = []
    for start in range(model.config.num_layers - size + 1):
        units = {m: np.zeros(shape, bool) for m, shape in unit_shapes(model.config).items()}
        for m in units:
            units[m][start : start + size] = True
        blocks.append({"layers": f"{start}-{start + size - 1}",
                       **measure(nnx.merge(graphdef, prune_units(state, units, model.config)))})
        b = blocks[-1]
        print(f"layers {b['layers']} removed: refusal rate {b['refusal_rate']:.3f} "
              f"(dense {dense['refusal_rate']:.3f}), perplexity {b['perplexity']:.2f} "
              f"(dense {dense['perplexity']:.2f})", flush=True)
    return dense, blocks


def choose_block(blocks: Sequence[dict], dense_perplexity: float, max_ratio: float) -> dict:
    """The block with the lowest ``refusal_rate`` (the first of ties) among those whose
    ``perplexity`` is within ``max_ratio`` times ``dense_perplexity``; a ValueError when every
    block's removal raises the perplexity above that."""
    limit = max_ratio * dense_perplexity
    intact = [b for b in blocks if b["perplexity"] <= limit]
    if not intact:
        raise ValueError(f"removing any block of layers raises the perplexity above {limit:.2f}")
    return min(intact, key=lambda b: b["refusal_rate"])
