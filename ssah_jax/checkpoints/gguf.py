"""GGUF import (llama.cpp files) with no torch: metadata, config, tokenizer and weights.

The ``gguf`` package reads the file (metadata and tensors, numpy only). transformers' torch-free
tables turn the metadata into a config (``integrations.ggml.GGUF_CONFIG_MAPPING``) and a fast
tokenizer (``integrations.gguf.gguf_tokenizer_mapping``); its own GGUF readers import torch, so
they are not used here. Weights are dequantized with ``gguf.dequantize`` and land directly in our
layout; llama.cpp's rotary row permutation of q/k is undone where its converter applied it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ssah_jax.checkpoints.params import CheckpointError, model_from_hf_tensors
from ssah_jax.models import CausalLM, ModelConfig

# Quantisation types we test; `gguf.dequantize` handles these with numpy.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF architectures our model implements. llama.cpp writes Llama 2/3, Mistral and SmolLM2 as
# "llama"; its converter permutes their q/k rows (LlamaModel.modify_tensors), and writes Qwen2
# unpermuted (Qwen2Model has no such step).
ARCHITECTURES = ("llama", "qwen2")
PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# tokenizer.ggml.<key> holding a special token's id -> the tokenizer's attribute
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(gguf_name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a q/k projection (rows = heads * head_dim).

    llama.cpp's converter reorders each head's rows from the half-split rotary layout
    (transformers) to the interleaved one; this restores the half-split order.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF file: ``metadata`` maps each key to its Python value (arrays as lists)."""

    path: Path
    reader: Any  # gguf.GGUFReader
    metadata: dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.reader.tensors)


def open_gguf(path: str | Path) -> GGUFFile:
    """Reads a GGUF file's metadata and tensor table (tensor data stays memory-mapped).

    Raises CheckpointError naming the file if it is damaged or lacks an architecture."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        reader = gguf.GGUFReader(str(path))
        metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if "general.architecture" not in metadata:
        raise CheckpointError(f"{path}: GGUF metadata has no general.architecture")
    return GGUFFile(path, reader, metadata)


def read_gguf(path: str | Path):
    """The ``gguf.GGUFReader`` of a file (CheckpointError naming it if damaged)."""
    return open_gguf(path).reader


def gguf_config(file: GGUFFile):
    """The transformers config the file's metadata describes (as transformers' GGUF loader
    builds it: its key table, tied embeddings when there is no ``output.weight``)."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{file.path}: GGUF architecture {arch!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
    # llama.cpp writes Mistral as "llama"; transformers tells them apart by the name.
    model_type = "mistral" if arch == "llama" and "mistral" in str(file.metadata.get("general.name", "")).lower() \
        else arch
    values: dict[str, Any] = {}
    for key, config_key in GGUF_CONFIG_MAPPING[arch].items():
        value = file.metadata.get(f"{arch}.{key}")
        if config_key is not None and value is not None:
            values[config_key] = value
    if "vocab_size" not in values:
        values["vocab_size"] = len(file.metadata.get("tokenizer.ggml.tokens", ()))
    values["tie_word_embeddings"] = "output.weight" not in file.tensor_names
    if model_type == "mistral":  # llama.cpp writes no sliding window (and attends without one)
        values["sliding_window"] = None
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in file.metadata:
            values[name] = file.metadata[f"tokenizer.ggml.{key}"]
    try:
        return AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file.path}: its metadata makes no valid {model_type} config ({e})") from e


def gguf_tokenizer(file: GGUFFile):
    """The fast tokenizer, special tokens and chat template the file's metadata describes,
    built with transformers' GGUF tokenizer tables (no torch)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    md = file.metadata
    if "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"{file.path}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    groups = {group: {name: md[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in md}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocabulary, settings = groups["tokenizer"], groups["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        settings.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            settings[name] = vocabulary["tokens"][token_id]
    try:
        backend, extra = convert_gguf_tokenizer(file.architecture, vocabulary)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{file.path}: cannot build its tokenizer ({e})") from e
    return PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)


def load_gguf_model(
    path: str | Path, config: Any = None, *, dtype=jnp.float32, param_dtype=None, place=None, file: GGUFFile = None
) -> CausalLM:
    """Loads a Llama- or Qwen2-architecture GGUF into our model, dequantized to ``param_dtype``.

    ``config``: the transformers config; by default the one the file's metadata describes."""
    import gguf

    file = file or open_gguf(path)
    path = file.path
    model_config = ModelConfig.from_hf(config if config is not None else gguf_config(file))
    permuted = file.architecture in PERMUTED_ARCHITECTURES
    tensors = {}
    for t in file.reader.tensors:
        try:
            tensors[hf_name(t.name)] = t
        except KeyError:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in a Llama-family model") from None

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})")
        try:
            w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize {t.name!r} ({e})") from e
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, model_config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, model_config.num_kv_heads)
        return w

    return model_from_hf_tensors(
        model_config, get, tensors, dtype=dtype, param_dtype=param_dtype or dtype, source=str(path), place=place,
    )
