"""GGUF import: every supported quantisation type and both architectures (llama, permuted
like llama.cpp; qwen2, not permuted), against transformers' GGUF loader on the same file."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.checkpoints import load_weights
from ssah_jax.checkpoints.gguf import unpermute_rows
from tests import tiny

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

# Tensor rows are 256 wide so that the 256-element K-quant blocks fit.
CONFIG = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=True)


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (half-split -> interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)
    np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(w, 2), 2), w)
    assert not np.array_equal(llamacpp_permute(w, 2), w)


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw bytes for a [rows, cols] tensor of a quantised type, with small finite scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    # Scales chosen so that dequantized weights are O(0.1) whatever the block format.
    high = {"Q4_K": 3e-4, "Q5_K": 3e-4, "Q6_K": 1e-5, "Q8_0": 1e-3}.get(qtype.name, 0.01)
    scale = lambda n: np.frombuffer(  # noqa: E731
        rng.uniform(high / 10, high, size=rows * (cols // block) * n).astype(np.float16).tobytes(), np.uint8
    ).reshape(rows, cols // block, 2 * n)
    if qtype.name in ("Q4_0", "Q5_0", "Q8_0"):
        raw[..., :2] = scale(1)  # d
    elif qtype.name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        raw[..., :4] = scale(2)  # d, m (or d, dmin)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[..., -2:] = scale(1)  # d is the last field
    return raw.reshape(rows, -1)


def write_tiny_gguf(directory, type_name: str, seed: int = 0, arch: str = "llama", name: str | None = None):
    """A tiny random model as a GGUF file the way llama.cpp writes ``arch``: q/k rows permuted
    for "llama", not for "qwen2" (which has q/k/v biases); 2-D weights of ``type_name``."""
    hf_config = tiny.llama_config(**CONFIG) if arch == "llama" else tiny.qwen2_config(**CONFIG)
    model = tiny.build(hf_config, seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(seed)
    path = directory / f"tiny-{arch}-{type_name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    if name:
        writer.add_name(name)
    c = hf_config
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        w = tensor.numpy()
        if name in names:
            gname = names[name]
        else:
            layer, part = name.removeprefix("model.layers.").split(".", 1)
            module, kind = part.rsplit(".", 1)
            gname = f"blk.{layer}.{parts[module]}.{kind}"
        if arch == "llama" and "q_proj" in name:
            w = llamacpp_permute(w, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            w = llamacpp_permute(w, c.num_key_value_heads)
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, w.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, _random_blocks(qtype, *w.shape, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, hf_config


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
