"""Tiny random transformers models (2 layers, hidden 64), saved with save_pretrained or written
as GGUF files the way llama.cpp writes them."""

from pathlib import Path

import numpy as np


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def build(hf_config, seed=0):
    """A transformers model with random weights (biases and norms randomised too)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def save(hf_config, directory: Path, seed=0) -> Path:
    build(hf_config, seed).save_pretrained(directory)
    return Path(directory)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.as_tensor(mask)
        # Left padding: transformers needs the positions given explicitly to count real tokens.
        kw["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kw).logits.numpy()


def random_batch(vocab: int, batch=3, seq=12, seed=0, left_pad=(0, 3, 5)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    for row, pad in enumerate(left_pad[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


# Tensor rows are 256 wide so that the 256-element K-quant blocks fit.
GGUF_CONFIG = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=True)


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (half-split -> interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw bytes for a [rows, cols] tensor of a quantised type, with small finite scales."""
    import gguf

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
    import gguf

    hf_config = llama_config(**GGUF_CONFIG) if arch == "llama" else qwen2_config(**GGUF_CONFIG)
    model = build(hf_config, seed)
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
