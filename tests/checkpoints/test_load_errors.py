"""Bad configs and damaged files fail with errors that name the problem."""

import numpy as np
import pytest

from ssah_jax.checkpoints import CheckpointError, load_weights
from ssah_jax.checkpoints.gguf import load_gguf_model, read_gguf
from ssah_jax.models import ModelConfig, UnsupportedConfigError
from tests import tiny


@pytest.mark.parametrize(
    "overrides, attribute",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
    ],
)
def test_unsupported_llama_attribute_is_named(overrides, attribute):
    with pytest.raises(UnsupportedConfigError, match=attribute):
        ModelConfig.from_hf(tiny.llama_config(**overrides))


def test_sliding_window_is_rejected():
    from transformers import MistralConfig

    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        ModelConfig.from_hf(MistralConfig(sliding_window=4096))
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        ModelConfig.from_hf(tiny.qwen2_config(use_sliding_window=True, sliding_window=16))


def test_unsupported_model_type_is_named():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedConfigError, match="gpt2"):
        ModelConfig.from_hf(GPT2Config())


def test_truncated_safetensors_names_the_file(tiny_llama):
    weights = tiny_llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_weights(tiny_llama)


def test_missing_tensor_is_named(tiny_llama):
    from safetensors.numpy import load_file, save_file

    weights = tiny_llama / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_weights(tiny_llama)


def test_truncated_gguf_names_the_file(tmp_path):
    from tests.tiny import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path, "F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"tiny-llama-F32\.gguf"):
        load_gguf_model(path, tiny.llama_config())


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"model\.gguf"):
        read_gguf(path)


def test_no_weights_in_directory(tmp_path):
    tiny.llama_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(tmp_path)


def test_a_hub_repo_out_of_reach_is_one_error_at_once(monkeypatch):
    """With the hub's host unresolvable (or HF_HUB_OFFLINE), a hub id is read from the local
    cache alone: one error naming why, not the hub client's retries."""
    import socket

    from huggingface_hub import constants

    from ssah_jax.checkpoints import model_config, resolve_hf_dir

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for load in (model_config, resolve_hf_dir):
        with pytest.raises(CheckpointError, match=r"someorg/some-model: not in the local hub cache, and the hub is "
                                                  r"out of reach \(huggingface.co does not resolve"):
            load("someorg/some-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"out of reach \(HF_HUB_OFFLINE is set\)"):
        model_config("someorg/some-model")
