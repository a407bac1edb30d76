"""Bucketed, deterministically shuffled, per-host batches on grain.

``batch_dataset`` returns a ``grain.MapDataset`` of batches: ``dataset[step]`` is the batch of
a training step (random access, so resuming at step ``n`` is ``dataset[n]``), and its iterator
(``iter(dataset.to_iter_dataset())``) has ``get_state`` / ``set_state`` for checkpoints.

Every host pads its rows to the same bucket length (the longest example of the *global*
batch), so the per-host arrays assemble into one global ``jax.Array``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import grain
import jax
import numpy as np

from ssah_jax.data.tokenize import Example


def bucket_lengths(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    lengths = []
    n = smallest
    while n < max_length:
        lengths.append(n)
        n *= 2
    return (*lengths, max_length)


def padded_length(longest: int, buckets: Sequence[int] | int) -> int:
    """The one padding policy: the length a batch whose longest row has ``longest`` tokens is
    padded to, so few shapes are compiled. ``buckets``: the smallest of these lengths that holds
    it (:func:`bucket_lengths`; training and scoring batches), or an int ``m``: the next multiple
    of ``m`` (prompts of generation and probing, continuations of log-likelihood scoring)."""
    if isinstance(buckets, numbers.Integral):
        return int(buckets) * math.ceil(longest / int(buckets))
    fitting = [b for b in buckets if b >= longest]
    if not fitting:
        raise ValueError(f"an example of {longest} tokens exceeds the largest bucket {max(buckets)}")
    return fitting[0]


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, length]`` int32 ids and mask, sequences aligned to the right."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit in {length}")
        if seq:
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    return ids, mask


def pad_batch(examples: Sequence[Example], rows: int, buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` and ``roles`` (int32
    ``[rows, L]``; ``Role.PADDING`` = 0 past the end), ``label`` and ``answer_label`` (int32
    ``[rows]``); ``L`` is the smallest bucket that holds the longest example, and rows beyond the
    examples are empty (all-zero masks, labels 0)."""
    length = padded_length(max(len(e.ids) for e in examples), buckets)
    ids = np.full((rows, length), pad_id, np.int32)
    attention = np.zeros((rows, length), np.int32)
    loss = np.zeros((rows, length), np.int32)
    roles = np.zeros((rows, length), np.int32)
    label = np.zeros((rows,), np.int32)
    answer_label = np.zeros((rows,), np.int32)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], attention[i, :n], loss[i, :n], roles[i, :n] = e.ids, 1, e.loss_mask, e.roles
        label[i], answer_label[i] = e.label, e.answer_label
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "roles": roles, "label": label,
            "answer_label": answer_label}


def _host_rows(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    per_host = len(batch["input_ids"]) // count
    return {k: v[index * per_host : (index + 1) * per_host] for k, v in batch.items()}


def balance_classes(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """``examples`` with each smaller class (by ``label``) filled up to the largest one's count by
    drawing its examples again with replacement (the safety signal's malicious oversampling);
    the originals keep their order and the drawn ones follow."""
    labels = np.asarray([e.label for e in examples])
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    out = list(examples)
    for label, count in zip(classes, counts):
        members = np.flatnonzero(labels == label)
        out += [examples[i] for i in rng.choice(members, counts.max() - count, replace=True)]
    return out


def batch_dataset(
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Batches of ``examples``: ``batch_size`` is the global batch; each host gets its
    ``batch_size / process_count`` rows. Shuffled from ``seed`` (a new order each epoch);
    ``epochs=None`` repeats forever. The last batch of a finite dataset is filled with
    empty rows."""
    if not examples:
        raise ValueError("no examples to batch")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
    ds = grain.MapDataset.source(list(examples))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if epochs != 1:
        ds = ds.repeat(epochs)
    pad = functools.partial(pad_batch, rows=batch_size, buckets=tuple(buckets), pad_id=pad_id)
    ds = ds.batch(batch_size, batch_fn=pad)
    if process_count > 1:
        ds = ds.map(functools.partial(_host_rows, index=process_index, count=process_count))
    return ds
