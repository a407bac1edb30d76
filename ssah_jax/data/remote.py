"""Sources beyond the kit: TFDS (``tfds:``) and Hugging Face hub (``hf:``) datasets, their
columns mapped to :class:`~ssah_jax.data.Record` fields, and ``load_dataset``, the one entry for a
dataset of any source."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ssah_jax.data.kit import load_local
from ssah_jax.data.records import DataError, Record


def _from_mapping(rows: Sequence[Mapping[str, Any]] | Any, fields: Mapping[str, str], where: str) -> list[Record]:
    """Records from dict-like rows; ``fields`` maps Record fields to the source's keys."""
    if "prompt" not in fields:
        raise ValueError(f"{where}: fields must map 'prompt' to a column, got {dict(fields)}")
    unknown = set(fields) - {"prompt", "response", "system", "label", "choices"}
    if unknown:
        raise ValueError(f"{where}: unknown Record fields {sorted(unknown)} in fields")
    records = []
    for i, row in enumerate(rows):
        values = {}
        for field, key in fields.items():
            if key not in row:
                raise DataError(f"{where}[{i}]: no column {key!r} (columns: {sorted(row)})")
            value = row[key]
            value = value.decode() if isinstance(value, bytes) else value
            if field == "choices":
                value = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in value)
            elif field == "label" and hasattr(value, "item"):
                value = value.item()
            values[field] = value
        records.append(Record(where=f"{where}[{i}]", **values))
    return records


def load_tfds(spec: str, fields: Mapping[str, str], data_dir: str | None = None) -> list[Record]:
    """``name[/config][:version]:split`` or ``/path/to/prepared/builder:split`` through TFDS's
    ``as_data_source`` (random access, no TensorFlow needed at read time)."""
    import tensorflow_datasets as tfds

    name, _, split = spec.rpartition(":")
    if not name or not split:
        raise ValueError(f"tfds source {spec!r}: expected 'name:split' or 'builder_dir:split'")
    builder = tfds.builder_from_directory(name) if Path(name).is_dir() else tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    return _from_mapping((source[i] for i in range(len(source))), fields, f"tfds:{spec}")


def load_hub(spec: str, fields: Mapping[str, str]) -> list[Record]:
    """``repo_id[:config]:split`` (or a local dataset directory) through HF ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ImportError("hub sources need HF datasets: pip install 'ssah_jax[hub]'") from None

    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"hub source {spec!r}: expected 'repo:split' or 'repo:config:split'")
    path, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    from ssah_jax.checkpoints.hf import hub_unreachable

    offline = None if Path(path).exists() else hub_unreachable()
    was = datasets.config.HF_HUB_OFFLINE
    # out of reach: the local cache alone (one error at once, not the hub client's retries)
    datasets.config.HF_HUB_OFFLINE = was or offline is not None
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        if not offline:
            raise
        raise DataError(f"hf:{spec}: not in the local datasets cache, and the hub is out of reach ({offline})"
                        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE = was
    return _from_mapping(rows, fields, f"hf:{spec}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    *,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[Record]:
    """Records of a dataset.

    ``name`` is a kit dataset (see ``DATASETS``; ``split`` picks train / test / dev where it
    has several), ``"tfds:<name or builder dir>:<split>"`` or ``"hf:<repo>[:<config>]:<split>"``.
    The last two need ``fields``, which maps Record fields to the source's columns, e.g.
    ``{"prompt": "question", "response": "answer"}``.
    """
    if name.startswith(("tfds:", "hf:")):
        if not fields:
            raise ValueError(f"{name}: give fields={{'prompt': <column>, ...}} for a TFDS or hub source")
        kind, spec = name.split(":", 1)
        return load_tfds(spec, fields) if kind == "tfds" else load_hub(spec, fields)
    return load_local(name, split, data_dir, on_error)[0]
