"""HF safetensors checkpoints: import (single file or sharded index, local or hub) and export."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ssah_jax.checkpoints.params import CheckpointError, model_from_hf_tensors, model_to_hf_tensors
from ssah_jax.models import CausalLM, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hub_unreachable() -> str | None:
    """Why the hub cannot be asked anything (``HF_HUB_OFFLINE``, or its host does not resolve),
    or None. A hub id is then read from the local cache alone: one error at once, rather than
    the hub client's retries with backoff (tens of seconds) before the same error."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve ({e.strerror or e})"
    return None


def resolve_hf_dir(ref: str | os.PathLike) -> Path:
    """A local model directory (with ``config.json``) as is; otherwise a hub repo id, downloaded
    (configs, tokenizer, weights). CheckpointError naming ``ref`` when neither works."""
    path = Path(ref)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a model directory (expected config.json and safetensors weights)")
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    offline = hub_unreachable()
    try:
        return Path(snapshot_download(str(ref), allow_patterns=patterns, local_files_only=offline is not None))
    except Exception as e:  # offline, no such repo, gated, ...: one error naming the repo
        if offline:
            raise CheckpointError(f"{ref}: not in the local hub cache, and the hub is out of reach ({offline})"
                                  ) from None
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{ref}: cannot fetch this hub repo ({type(e).__name__}: {reason})") from e


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Maps each tensor name to the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        return {name: directory / fname for name, fname in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(
            f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
            "(only safetensors weights are loaded; pickled .bin files never are)"
        )
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def load_hf_model(
    directory: Path, hf_config: Any, *, dtype=jnp.float32, param_dtype=None, place=None
) -> CausalLM:
    """Loads weights from ``directory`` into our model (``param_dtype`` defaults to ``dtype``)."""
    config = ModelConfig.from_hf(hf_config)
    files = _tensor_files(directory)
    handles: dict[Path, Any] = {}

    def get(name: str) -> np.ndarray:
        path = files[name]
        if path not in handles:
            handles[path] = _open(path).__enter__()
        try:
            return handles[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e

    return model_from_hf_tensors(
        config, get, files, dtype=dtype, param_dtype=param_dtype or dtype,
        source=str(directory), place=place,
    )


def save_hf(model: CausalLM, hf_config: Any, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer) that transformers loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = model_to_hf_tensors(model)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    hf_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
