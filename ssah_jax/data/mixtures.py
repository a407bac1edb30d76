"""Mixtures of datasets: a spec such as ``"bianchi_safety:128,alpaca_libre:256"`` parsed
(``parse_mixture``) or changed (``substitute_component``), its records loaded with a held-out
tail per component (``load_mixture``) or with a class per component (``load_labelled_mixture``),
and the records usable as training targets (``with_responses``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ssah_jax.data.kit import load_jsonl, load_local
from ssah_jax.data.records import DataError, Record, prompt_key
from ssah_jax.data.registry import DATASETS


def with_responses(records: Iterable[Record]) -> list[Record]:
    """The records usable as training / calibration / perplexity targets: a non-empty response
    whose generation succeeded (alpaca_libre keeps failed ones, ``meta["status"] != "ok"``)."""
    return [r for r in records if r.response and r.meta.get("status", "ok") == "ok"]


def parse_mixture(spec: str) -> list[tuple[str, int]]:
    """``"bianchi_safety:128,alpaca_libre:256"`` -> ``[("bianchi_safety", 128), ("alpaca_libre", 256)]``;
    a component without ``:limit`` is taken whole (limit 0); a negative limit takes the *last*
    records (``"gsm8k@train:-100"``: a tail that a mixture of the first ones never reaches, e.g.
    a validation set beside training data). A kit dataset may name its own split,
    ``"gsm8k@train:500"``, which the loader's ``split`` then does not override (so a mixture can
    take GSM8K's training questions while MMLU's dev ones, ``"mmlu@dev"``, never their test sets).
    A component may also be a JSONL file (a path ending in ``.jsonl``, e.g. the
    ``generations.jsonl`` of an ``ssah-jax generate`` run): records with a ``prompt`` and a
    ``response`` (or ``answer``) field."""
    components = []
    for part in spec.split(","):
        part = part.strip()
        if part.endswith(".jsonl"):
            name, limit = part, ""
        elif part.rpartition(":")[0].endswith(".jsonl"):
            name, _, limit = part.rpartition(":")
        else:
            name, _, limit = part.partition(":")
        base, _, own_split = name.partition("@")
        if base not in DATASETS and not name.endswith(".jsonl"):
            raise KeyError(f"unknown dataset {base!r} in {spec!r}; known: {sorted(DATASETS)} or a .jsonl file")
        if own_split and own_split not in DATASETS[base].splits:
            raise KeyError(f"{name!r} in {spec!r}: {base} has no split {own_split!r} (splits: "
                           f"{', '.join(DATASETS[base].splits)})")
        if limit and not (limit.removeprefix("-").isdigit() and int(limit) != 0):
            raise ValueError(f"{spec!r}: the limit of {name!r} must be a non-zero integer (negative: the last "
                             f"records), got {limit!r}")
        components.append((name, int(limit or 0)))
    return components


def substitute_component(spec: str, name: str, replacement: str) -> str:
    """``spec`` (a mixture, see :func:`parse_mixture`) with each component named ``name`` read
    from ``replacement`` instead (a kit dataset or a JSONL file; the component's ``:limit`` is
    kept), or dropped when ``replacement`` is empty:
    ``substitute_component("bianchi_safety:128,contrast:64", "contrast", "c.jsonl")`` ->
    ``"bianchi_safety:128,c.jsonl:64"``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(replacement + p[len(name):] if p.split(":")[0] == name else p
                    for p in parts if replacement or p.split(":")[0] != name)


def load_mixture(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    heldout: int = 0,
    exclude: Iterable[str] = (),
    responses: bool = False,
    on_error: str = "skip",
) -> tuple[list[Record], list[Record]]:
    """``(selected, held_out)`` records of a mixture spec (see :func:`parse_mixture`).

    Per component, in order: rows whose prompt is in ``exclude`` (prompts, compared by
    :func:`prompt_key`) are dropped; with ``responses`` only usable training targets are kept
    (:func:`with_responses`); the *last* ``heldout`` records are held out; the first ``limit``
    of the rest are selected. The components are concatenated in the order given."""
    excluded = {prompt_key(p) for p in exclude}
    selected, held = [], []
    for name, limit in parse_mixture(spec):
        if name.endswith(".jsonl"):
            records = load_jsonl(name, on_error)
        else:
            base, _, own_split = name.partition("@")
            records = load_local(base, own_split or split, data_dir, on_error)[0]
        records = [r for r in records if prompt_key(r.prompt) not in excluded]
        if responses:
            records = with_responses(records)
        cut = len(records) - heldout
        if cut <= 0:
            raise DataError(f"dataset {name!r}: {len(records)} usable records, none left after {heldout} held out")
        held += records[cut:] if heldout else []
        pool = records[:cut]
        if abs(limit) > len(pool):
            raise DataError(f"dataset {name!r}: {abs(limit)} records asked for in {spec!r}, {len(pool)} available")
        selected += pool[:limit] if limit > 0 else pool[limit:] if limit < 0 else pool
    return selected, held


def load_labelled_mixture(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    *,
    positive: Iterable[str],
    split: str | None = None,
    heldout: int = 0,
    responses: bool = False,
) -> tuple[tuple[list[Record], list[int]], tuple[list[Record], list[int]]]:
    """:func:`load_mixture`'s ``(selected, held_out)`` records (the same, in the same order), each
    with its class: ``((records, labels), (records, labels))``, 1 for the records of the
    components named in ``positive`` (e.g. a safety signal's malicious components), 0 for the others."""
    positive = set(positive)
    out: tuple[tuple[list[Record], list[int]], ...] = (([], []), ([], []))
    for name, limit in parse_mixture(spec):  # each component alone, as in the mixture
        part = load_mixture(f"{name}:{limit}" if limit else name, data_dir, split=split, heldout=heldout,
                            responses=responses)
        for (records, labels), found in zip(out, part):
            records += found
            labels += [int(name in positive)] * len(found)
    return out[0], out[1]
