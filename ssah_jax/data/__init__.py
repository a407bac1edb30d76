"""Data: named datasets (local kit, TFDS, HF hub), the chat encoder (ids, a role per token,
response-only loss masks), the padding policy, and bucketed, shuffled, per-host batches with a
resumable position."""

from ssah_jax.data.batching import left_pad, padded_length
from ssah_jax.data.sources import (
    DATA_DIR_ENV,
    DATASETS,
    DataError,
    LoadReport,
    Record,
    check_kit_dataset,
    load_dataset,
    load_jsonl,
    load_local,
    load_mixture,
    parse_mixture,
    prompt_key,
    resolve_data_dir,
    substitute_component,
    with_responses,
)
from ssah_jax.data.tokenize import Chat, Example, Role, encode_prompt, encode_record, encode_records, encode_recovery

__all__ = [
    "Chat",
    "Example",
    "Role",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "encode_recovery",
    "padded_length",
    "DATASETS",
    "DATA_DIR_ENV",
    "DataError",
    "LoadReport",
    "Record",
    "check_kit_dataset",
    "left_pad",
    "load_dataset",
    "load_jsonl",
    "load_local",
    "load_mixture",
    "parse_mixture",
    "prompt_key",
    "resolve_data_dir",
    "substitute_component",
    "with_responses",
]
