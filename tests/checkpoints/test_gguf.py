"""GGUF import: every supported quantisation type and both architectures (llama, permuted
like llama.cpp; qwen2, not permuted), against transformers' GGUF loader on the same file."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.checkpoints import load_weights
from ssah_jax.checkpoints.gguf import unpermute_rows
from tests import tiny
from tests.tiny import llamacpp_permute, write_tiny_gguf

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")  # what tiny.write_tiny_gguf writes with


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)
    np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(w, 2), 2), w)
    assert not np.array_equal(llamacpp_permute(w, 2), w)


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("arch, type_name", [
    *(("llama", t) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")),
    *(("qwen2", t) for t in ("F32", "Q8_0", "Q5_0", "Q4_K")),
])
def test_gguf_logits_match_transformers(arch, type_name, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf_config = write_tiny_gguf(tmp_path, type_name, arch=arch)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert reference.config.model_type == arch
    ours = load_weights(path)  # the config comes from the file's metadata, as transformers' does
    assert ours.config.tie_word_embeddings == hf_config.tie_word_embeddings
    # Every dequantized, un-permuted tensor equals transformers' (ours are [in, out]).
    for i, layer in enumerate(reference.model.layers):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            theirs = getattr(layer.self_attn, part).weight.detach().numpy()
            mine = np.asarray(getattr(ours.layers[i].attn, part).kernel[...])
            np.testing.assert_allclose(mine.T, theirs, rtol=0, atol=1e-6, err_msg=f"layer {i} {part}")
        for part in ("gate_proj", "up_proj", "down_proj"):
            theirs = getattr(layer.mlp, part).weight.detach().numpy()
            np.testing.assert_allclose(np.asarray(getattr(ours.layers[i].mlp, part).kernel[...]).T, theirs,
                                       rtol=0, atol=1e-6, err_msg=f"layer {i} {part}")
    ids, mask = tiny.random_batch(hf_config.vocab_size)
    expected = tiny.hf_logits(reference, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    scale = max(1.0, np.abs(expected[real]).max())
    assert np.abs(got - expected)[real].max() <= 1e-4 * scale


@pytest.mark.parity
def test_a_mistral_named_llama_file_loads_without_a_sliding_window(tmp_path):
    """llama.cpp writes Mistral as "llama"; transformers calls it mistral by its name. Its
    config must not pick up MistralConfig's default sliding window (the file has none)."""
    from transformers import AutoModelForCausalLM

    from ssah_jax.checkpoints.gguf import gguf_config, open_gguf

    path, hf_config = write_tiny_gguf(tmp_path, "F32", name="Mistral Tiny")
    config = gguf_config(open_gguf(path))
    assert config.model_type == "mistral" and config.sliding_window is None
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids, mask = tiny.random_batch(hf_config.vocab_size)
    expected = tiny.hf_logits(reference, ids, mask)
    got = np.asarray(load_weights(path)(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-4 * max(1.0, np.abs(expected[real]).max())
