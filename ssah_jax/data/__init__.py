"""Data: named datasets (local kit, TFDS, HF hub), chat tokenisation with response-only loss
masks, and bucketed, shuffled, per-host batches with a resumable position."""

from ssah_jax.data.batching import left_pad
from ssah_jax.data.sources import (
    DATA_DIR_ENV,
    DATASETS,
    DataError,
    LoadReport,
    Record,
    check_kit_dataset,
    load_dataset,
    load_local,
    load_mixture,
    parse_mixture,
    prompt_key,
    resolve_data_dir,
    with_responses,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DataError",
    "LoadReport",
    "Record",
    "check_kit_dataset",
    "left_pad",
    "load_dataset",
    "load_local",
    "load_mixture",
    "parse_mixture",
    "prompt_key",
    "resolve_data_dir",
    "with_responses",
]
