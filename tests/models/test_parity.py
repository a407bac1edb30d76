"""Tiny transformers models -> our safetensors loader -> same logits; export -> same logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import MistralConfig

from ssah_jax.checkpoints import load_weights, save_hf
from tests import tiny

torch = pytest.importorskip("torch")

CONFIGS = {
    "llama_mha": lambda: tiny.llama_config(num_key_value_heads=4),
    "llama_gqa": lambda: tiny.llama_config(),
    "llama_gqa_tied_bias": lambda: tiny.llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3_rope": lambda: tiny.llama_config(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "linear_rope": lambda: tiny.llama_config(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "qwen2_bias": lambda: tiny.qwen2_config(),
    "mistral": lambda: MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, sliding_window=None, head_dim=24),
}


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_and_export_round_trips(name, tmp_path):
    hf_config = CONFIGS[name]()
    reference = tiny.build(hf_config)
    reference.save_pretrained(tmp_path / "hf")
    model = load_weights(tmp_path / "hf")

    ids, mask = tiny.random_batch(hf_config.vocab_size, seq=40)  # positions up to 40 > 32 (llama3)
    expected = tiny.hf_logits(reference, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)  # padded positions are meaningless in both
    assert np.abs(ours - expected)[real].max() <= 1e-4

    save_hf(model, model.config.to_hf(), tmp_path / "export")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    again = tiny.hf_logits(reloaded, ids, mask)
    assert np.abs(again - expected)[real].max() <= 1e-5



@pytest.mark.parity
def test_load_model_reads_sharded_index(tmp_path):
    hf_config = tiny.llama_config()
    reference = tiny.build(hf_config)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_weights(tmp_path / "hf")
    ids, _ = tiny.random_batch(hf_config.vocab_size, batch=1, left_pad=(0,))
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - tiny.hf_logits(reference, ids)).max() <= 1e-4


@pytest.mark.slow
def test_bf16_compute_is_close_to_fp32(tiny_llama):
    f32 = load_weights(tiny_llama)
    bf16 = load_weights(tiny_llama, dtype=jnp.bfloat16)
    assert bf16.layers[0].mlp.down_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = tiny.random_batch(128)
    a = np.asarray(f32(jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert not np.array_equal(a, b)
    assert np.abs(a - b)[real].max() < 0.1 * np.abs(a[real]).max()


@pytest.mark.parity
def test_unit_is_row_of_our_kernel_and_column_of_hf_matrix(tiny_llama):
    """The layout statement of ssah_jax.models.llama, checked against the HF model."""
    from transformers import AutoModelForCausalLM

    model = load_weights(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ours = np.asarray(model.layers[1].mlp.down_proj.kernel[...])
    theirs = hf.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(ours[5, :], theirs[:, 5])
