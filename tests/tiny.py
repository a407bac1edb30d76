"""Tiny random transformers models (2 layers, hidden 64), saved with save_pretrained."""

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
