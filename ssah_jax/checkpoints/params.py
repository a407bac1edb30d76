"""Conversion between transformers' tensor names / layout and our stacked NNX parameters.

HF ``nn.Linear`` weights are ``[out, in]``; our kernels are ``[in, out]`` (see
``ssah_jax.models.llama``). Our ``layers/{i}/...`` is HF's ``model.layers.{i}....``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssah_jax.models import CausalLM, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete or does not match the model."""


# (our path inside one decoder layer, HF name inside `model.layers.{i}.`, transpose?)
_LAYER_TENSORS: tuple[tuple[str, str, bool], ...] = (
    ("attn/q_proj/kernel", "self_attn.q_proj.weight", True),
    ("attn/k_proj/kernel", "self_attn.k_proj.weight", True),
    ("attn/v_proj/kernel", "self_attn.v_proj.weight", True),
    ("attn/o_proj/kernel", "self_attn.o_proj.weight", True),
    ("attn/q_proj/bias", "self_attn.q_proj.bias", False),
    ("attn/k_proj/bias", "self_attn.k_proj.bias", False),
    ("attn/v_proj/bias", "self_attn.v_proj.bias", False),
    ("attn/o_proj/bias", "self_attn.o_proj.bias", False),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", True),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight", True),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight", True),
    ("mlp/gate_proj/bias", "mlp.gate_proj.bias", False),
    ("mlp/up_proj/bias", "mlp.up_proj.bias", False),
    ("mlp/down_proj/bias", "mlp.down_proj.bias", False),
    ("input_norm/scale", "input_layernorm.weight", False),
    ("post_attn_norm/scale", "post_attention_layernorm.weight", False),
)
_GLOBAL_TENSORS: tuple[tuple[str, str, bool], ...] = (
    ("embed/embedding", "model.embed_tokens.weight", False),
    ("final_norm/scale", "model.norm.weight", False),
    ("lm_head/kernel", "lm_head.weight", True),
)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


_LAYER_MAP = {ours: (hf, t) for ours, hf, t in _LAYER_TENSORS}
_GLOBAL_MAP = {ours: (hf, t) for ours, hf, t in _GLOBAL_TENSORS}


def _hf_name(key: str) -> tuple[str, bool]:
    """Our parameter path (``layers/3/attn/q_proj/kernel``) -> (HF name, transpose?); a
    parameter outside the Llama layout (e.g. a safety signal's) has none: CheckpointError."""
    if key.startswith("layers/"):
        _, index, rest = key.split("/", 2)
        if rest in _LAYER_MAP:
            hf, transpose = _LAYER_MAP[rest]
            return f"model.layers.{index}.{hf}", transpose
    elif key in _GLOBAL_MAP:
        return _GLOBAL_MAP[key]
    raise CheckpointError(f"parameter {key!r} has no place in a transformers Llama checkpoint; "
                          "save parameters outside the Llama layout in their own file")


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
    """The model with ShapeDtypeStructs in place of arrays (allocates nothing)."""
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def model_from_hf_tensors(
    config: ModelConfig,
    get: Callable[[str], np.ndarray],
    names: Iterable[str],
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    source: str = "checkpoint",
    place: Callable[[nnx.Variable, np.ndarray], jax.Array] | None = None,
) -> CausalLM:
    """Builds a CausalLM from HF-named tensors.

    Args:
      get: returns the HF tensor of a name as a numpy array ``[out, in]``.
      names: every tensor name the checkpoint holds (unused ones are an error).
      source: what to name in errors (a file or directory).
      place: optional ``(abstract variable, array) -> jax.Array``, e.g. a sharded
        ``device_put`` that reads the variable's logical axis names.
    """
    available = set(names)
    model = abstract_model(config, dtype, param_dtype)
    graphdef, state = nnx.split(model)
    used: set[str] = set()

    def read(name: str, transpose: bool, shape) -> np.ndarray:
        if name not in available:
            raise CheckpointError(f"{source}: tensor {name!r} is missing")
        used.add(name)
        arr = np.asarray(get(name))
        arr = arr.T if transpose else arr
        if arr.shape != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {arr.shape} "
                f"(after layout change), the config needs {tuple(shape)}"
            )
        return arr

    def load(path, var):
        hf, transpose = _hf_name(_path_str(path))
        arr = read(hf, transpose, var.get_value().shape)
        arr = arr.astype(var.get_value().dtype)
        return var.replace(place(var, arr) if place else jnp.asarray(arr))

    state = nnx.map_state(load, state)
    unused = available - used
    # A tied checkpoint may still carry an lm_head copy; anything else unused means a mismatch.
    if config.tie_word_embeddings:
        unused.discard("lm_head.weight")
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        raise CheckpointError(f"{source}: tensors not used by the model: {sorted(unused)[:8]}")
    return nnx.merge(graphdef, state)


def model_to_hf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy tensors in HF layout."""
    _, state = nnx.split(model)
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        hf, transpose = _hf_name(_path_str(path))
        arr = np.asarray(jax.device_get(var.get_value()))
        out[hf] = np.ascontiguousarray(arr.T if transpose else arr)
    return out

