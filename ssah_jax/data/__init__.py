"""Data: named datasets (local kit, TFDS, HF hub), the chat encoder (ids, a role per token,
response-only loss masks), the padding policy, and bucketed, shuffled, per-host batches with a
resumable position.

The modules, a job each: ``records`` (``Record``, ``LoadReport``, ``DataError``), ``readers``
(a file's raw rows by format), ``registry`` (the kit's datasets, ``DATASETS``: a parser per
dataset), ``kit`` (loading a kit dataset or a JSONL file), ``mixtures`` (mixture specs and their
records), ``remote`` (TFDS and hub sources, ``load_dataset``), ``fetch`` (the kit from its public sources,
checked against ``manifest.json``: ``ssah-jax data``), ``tokenize`` (the chat encoder) and
``batching``."""

from ssah_jax.data.batching import left_pad, padded_length
from ssah_jax.data.kit import DATA_DIR_ENV, check_kit_dataset, load_jsonl, load_local, resolve_data_dir
from ssah_jax.data.mixtures import (
    load_labelled_mixture,
    load_mixture,
    parse_mixture,
    substitute_component,
    with_responses,
)
from ssah_jax.data.records import DataError, LoadReport, Record, prompt_key
from ssah_jax.data.registry import DATASETS
from ssah_jax.data.remote import load_dataset
from ssah_jax.data.tokenize import (
    Chat,
    Example,
    Role,
    encode_prompt,
    encode_record,
    encode_records,
    encode_recovery,
    recovery_examples,
)

__all__ = [
    "Chat",
    "Example",
    "Role",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "encode_recovery",
    "recovery_examples",
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
    "load_labelled_mixture",
    "load_mixture",
    "parse_mixture",
    "prompt_key",
    "resolve_data_dir",
    "substitute_component",
    "with_responses",
]
