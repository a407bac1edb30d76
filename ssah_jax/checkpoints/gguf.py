"""GGUF import (llama.cpp files) through the ``gguf`` package: dequantize, rename, un-permute.

The config and tokenizer come from transformers' GGUF support; the weights are read here so
they land directly in our layout (no torch involved).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ssah_jax.checkpoints.demo import cache_dir
from ssah_jax.checkpoints.params import CheckpointError, model_from_hf_tensors
from ssah_jax.models import CausalLM, ModelConfig

# Quantisation types we test; `gguf.dequantize` handles these with numpy.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

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


def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_hf_dir(path: Path) -> Path:
    """A directory with the GGUF's transformers config and tokenizer (no weights).

    transformers rebuilds both from the GGUF metadata, which is slow (the reader parses the
    whole vocabulary in Python); the result is cached per file (path, size, mtime).
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    read_gguf(path)  # a damaged file gets our error, naming it, before transformers' own
    tmp = target.with_name(target.name + ".part")
    AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
    if not target.exists():  # another process may have finished first
        tmp.replace(target)
    return target


def load_gguf_model(
    path: Path, hf_config: Any, *, dtype=jnp.float32, param_dtype=None, place=None, reader=None
) -> CausalLM:
    """Loads a Llama-architecture GGUF into our model, dequantized to ``param_dtype``."""
    import gguf

    config = ModelConfig.from_hf(hf_config)
    reader = reader or read_gguf(path)
    tensors = {}
    for t in reader.tensors:
        try:
            tensors[hf_name(t.name)] = t
        except KeyError:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in a Llama model") from None

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}")
        try:
            w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize {t.name!r} ({e})") from e
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rows(w, config.num_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_rows(w, config.num_kv_heads)
        return w

    return model_from_hf_tensors(
        config, get, tensors, dtype=dtype, param_dtype=param_dtype or dtype,
        source=str(path), place=place,
    )
