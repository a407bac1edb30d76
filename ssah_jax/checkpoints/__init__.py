"""Weights in and out: HF safetensors, GGUF, registered models.

Public entry: ``load_model(ref, dtype=...) -> (model, tokenizer)`` where ``ref`` is a registered
model name (``MODELS``: the demo model ``"smollm2-135m-instruct"``, ``"qwen2.5-coder-0.5b-instruct"``,
...; ``TINY_MODELS``: ``"tiny-random"``, made on the fly), a local HF directory, a hub repo id,
or a ``.gguf`` path. Nothing here imports torch: GGUF configs and tokenizers are built from the
file's metadata (``checkpoints.gguf``), HF ones by transformers' torch-free config and tokenizer
classes. ``trust_remote_code`` is never enabled and pickled weights are never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ssah_jax.checkpoints.gguf import gguf_config, gguf_tokenizer, load_gguf_model, open_gguf
from ssah_jax.checkpoints.hf import hub_unreachable, load_hf_model, resolve_hf_dir, save_hf
from ssah_jax.checkpoints.params import CheckpointError
from ssah_jax.checkpoints.registry import DEMO_NAME, MODELS, TINY_MODELS, demo_gguf_path, model_path
from ssah_jax.models import CausalLM, ModelConfig
from ssah_jax.sharding import DEFAULT_RULES, check_divides, logical_to_spec

__all__ = [
    "CheckpointError",
    "DEMO_NAME",
    "HUB_ARCHITECTURES",
    "MODELS",
    "TINY_MODELS",
    "demo_gguf_path",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "model_config",
    "model_path",
    "resolve",
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
    path = resolve(ref)
    if path.suffix == ".gguf":
        return gguf_tokenizer(open_gguf(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({' '.join(str(e).split())[:300]})") from e


def _path_like(ref: str) -> bool:
    """A reference that can only mean a local path: not ``namespace/name`` (a hub repo id)."""
    return (ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "/" not in ref
            or Path(ref).suffix in (".gguf", ".safetensors", ".json"))


def resolve(ref: str | os.PathLike) -> Path:
    """The local file or directory ``ref`` names: a registered model's GGUF (fetched if need
    be), a ``.gguf`` file, an HF directory, or a hub repo id's download."""
    name = str(ref)
    if name in MODELS or name in TINY_MODELS:
        return model_path(name)
    path = Path(name).expanduser()
    if path.exists():
        return path if path.suffix == ".gguf" else resolve_hf_dir(path)
    if _path_like(name):
        known = f" (registered models: {', '.join([*MODELS, *TINY_MODELS])})" if "/" not in name else ""
        raise FileNotFoundError(f"{name}: no such file or directory{known}")
    return resolve_hf_dir(name)


# The architectures (transformers config values) of the papers' models: facts of each
# repository's config.json, so a memory plan of them needs no hub request (nor a login: the
# repositories are gated).
HUB_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-chat-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "meta-llama/Llama-2-70b-chat-hf": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
}


def model_config(ref: str | os.PathLike) -> ModelConfig:
    """The architecture of the model ``ref`` names, without reading its weights: a ``.gguf``
    file's metadata (a registered model's GGUF is fetched if it is not at hand), an HF
    directory's ``config.json``, one of the papers' models (:data:`HUB_ARCHITECTURES`, no hub
    request), or another hub repo's ``config.json`` (fetched alone)."""
    from transformers import AutoConfig

    name = str(ref)
    path = Path(name).expanduser()
    if name in MODELS or path.suffix == ".gguf":
        return ModelConfig.from_hf(gguf_config(open_gguf(resolve(name))))
    if name in HUB_ARCHITECTURES and not path.exists():
        values = dict(HUB_ARCHITECTURES[name])
        return ModelConfig.from_hf(AutoConfig.for_model(values.pop("model_type"), **values))
    if name in TINY_MODELS or path.exists() or _path_like(name):
        source, offline = str(resolve(name)), None
    else:  # a hub repo: its config.json alone, from the local cache when the hub is out of reach
        source, offline = name, hub_unreachable()
    try:
        return ModelConfig.from_hf(AutoConfig.from_pretrained(source, local_files_only=offline is not None))
    except (ValueError, OSError) as e:
        if offline:
            raise CheckpointError(f"{source}: not in the local hub cache, and the hub is out of reach ({offline})"
                                  ) from None
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{source}: no transformers config to read ({reason})") from e


def load_weights(
    ref: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
) -> CausalLM:
    """Loads a Llama-family model (no tokenizer); arguments as in :func:`load_model`."""
    path = resolve(ref)
    if mesh is not None:  # before any weight is read
        check_divides(mesh.shape, model_config(path).logical_sizes, rules)
    kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, place=_placer(mesh, rules))
    if path.suffix == ".gguf":
        file = open_gguf(path)
        return load_gguf_model(path, gguf_config(file), file=file, **kw)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}/config.json: not a transformers config ({reason})") from e
    return load_hf_model(path, hf_config, **kw)


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
      ref: a registered model name (``MODELS``, ``TINY_MODELS``), a local HF directory, a hub repo id
        (``namespace/name``), or a ``.gguf`` file. A path-like ref that does not exist is a
        FileNotFoundError ("no such file or directory"), never a hub lookup.
      dtype: compute dtype (float32 or bfloat16).
      param_dtype: storage dtype of the parameters; defaults to ``dtype``.
      mesh: if given, each parameter is placed on it by its logical axis names and ``rules``
        as it is read (never whole on one device first); a mesh axis that does not divide a
        dimension sharded over it is a :class:`ssah_jax.sharding.MeshMismatch`.

    Returns:
      ``(model, tokenizer)``; ``model(input_ids, attention_mask=None)`` gives
      ``[batch, seq, vocab]`` float32 logits.
    """
    path = resolve(ref)
    if mesh is not None:  # before any weight is read
        check_divides(mesh.shape, model_config(path).logical_sizes, rules)
    kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, place=_placer(mesh, rules))
    if path.suffix == ".gguf":
        file = open_gguf(path)  # read once for the config, the weights and the tokenizer
        return load_gguf_model(path, gguf_config(file), file=file, **kw), gguf_tokenizer(file)
    return load_weights(path, dtype, param_dtype=param_dtype, mesh=mesh, rules=rules), load_tokenizer(path)
