"""Weights in and out: HF safetensors, GGUF, the demo model.

Public entry: ``load_model(ref, dtype=...) -> (model, tokenizer)`` where ``ref`` is
``"smollm2-135m-instruct"`` (the demo model), a local HF directory, a hub repo id, or a
``.gguf`` path. Tokenizers and chat templates come from transformers;
``trust_remote_code`` is never enabled and pickled weights are never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ssah_jax.checkpoints.demo import DEMO_NAME, demo_gguf_path
from ssah_jax.checkpoints.gguf import gguf_hf_dir, load_gguf_model, read_gguf
from ssah_jax.checkpoints.hf import load_hf_model, resolve_hf_dir, save_hf
from ssah_jax.checkpoints.params import CheckpointError
from ssah_jax.models import CausalLM
from ssah_jax.sharding import DEFAULT_RULES, logical_to_spec

__all__ = [
    "CheckpointError",
    "DEMO_NAME",
    "demo_gguf_path",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "save_hf",
]


def _placer(mesh, rules):
    if mesh is None:
        return None

    def place(var, arr):
        spec = logical_to_spec(var.get_metadata().get("out_sharding") or (), rules)
        return jax.device_put(arr, NamedSharding(mesh, spec))

    return place


def load_tokenizer(ref: str | os.PathLike) -> Any:
    """The transformers tokenizer (with chat template) for any ``ref`` that load_model takes."""
    from transformers import AutoTokenizer

    path = _resolve(ref)
    if path.suffix == ".gguf":
        path = gguf_hf_dir(path)
    return AutoTokenizer.from_pretrained(str(path))


def _resolve(ref: str | os.PathLike) -> Path:
    if str(ref) == DEMO_NAME:
        return demo_gguf_path()
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return path
    return resolve_hf_dir(ref)


def load_weights(
    ref: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
) -> CausalLM:
    """Loads a Llama-family model (no tokenizer); arguments as in :func:`load_model`."""
    from transformers import AutoConfig

    path = _resolve(ref)
    kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, place=_placer(mesh, rules))
    if path.suffix == ".gguf":
        reader = read_gguf(path)  # fails early, naming the file, if it is damaged
        hf_config = AutoConfig.from_pretrained(str(gguf_hf_dir(path)))
        return load_gguf_model(path, hf_config, reader=reader, **kw)
    return load_hf_model(path, AutoConfig.from_pretrained(str(path)), **kw)


def load_model(
    ref: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[CausalLM, Any]:
    """Loads a Llama-family model and its tokenizer.

    Args:
      ref: ``"smollm2-135m-instruct"``, a local HF directory, a hub repo id, or a ``.gguf`` file.
      dtype: compute dtype (float32 or bfloat16).
      param_dtype: storage dtype of the parameters; defaults to ``dtype``.
      mesh: if given, each parameter is placed on it by its logical axis names and ``rules``.

    Returns:
      ``(model, tokenizer)``; ``model(input_ids, attention_mask=None)`` gives
      ``[batch, seq, vocab]`` float32 logits.
    """
    model = load_weights(ref, dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    return model, load_tokenizer(ref)
