"""Real models: ours vs transformers on the same GGUF file. The demo model (SmolLM2-135M-Instruct,
Q4_1, llama architecture) always; Qwen2.5-Coder-0.5B-Instruct (Q4_K_M with Q5_0 rows, qwen2
architecture) when it is in the cache (fetch it as the README says)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.data import encode_prompt, left_pad
from ssah_jax.generation import generate_ids

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.real_model

LOGIT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain what a neural network is to a child.",
    "List three prime numbers greater than 50.",
]
GREEDY_PROMPTS = [
    "How do I bake bread?",
    "Give me three tips for staying focused.",
    "What is photosynthesis?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def _stop_ids(reference, tokenizer) -> set[int]:
    eos = reference.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])}


def _encode(tokenizer, prompts):
    return [encode_prompt(tokenizer, p).ids.tolist() for p in prompts]


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("which", ["demo", "qwen"])
def test_logits_match_transformers(which, request):
    model, tokenizer, reference = request.getfixturevalue(which)
    encoded = _encode(tokenizer, LOGIT_PROMPTS)
    ids, mask = left_pad(encoded, max(map(len, encoded)), tokenizer.pad_token_id)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        theirs = reference(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(positions)
        ).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() <= 1e-3


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("which, n_prompts, tokens", [("demo", 5, 48), ("qwen", 4, 32)])
def test_greedy_generation_matches_transformers(which, n_prompts, tokens, request):
    model, tokenizer, reference = request.getfixturevalue(which)
    prompts = GREEDY_PROMPTS[:n_prompts]
    ours = generate_ids(model, tokenizer, prompts, max_new_tokens=tokens, batch_size=n_prompts)
    for prompt, row in zip(prompts, ours):
        (ids,) = _encode(tokenizer, [prompt])
        with torch.no_grad():
            out = reference.generate(torch.as_tensor([ids]), max_new_tokens=tokens, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        if theirs and theirs[-1] in _stop_ids(reference, tokenizer):
            theirs = theirs[:-1]
        assert row == theirs, (prompt, tokenizer.decode(row), tokenizer.decode(theirs))


def test_qwen_model_config(qwen):
    model, tokenizer, _ = qwen
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (24, 896, 14, 2, 4864)
    assert c.qkv_bias and c.vocab_size == 151936  # this GGUF carries its own output.weight (untied)
    assert "<|im_start|>assistant" in encode_prompt(tokenizer, "hi").text


def test_demo_model_config(demo):
    model, tokenizer, _ = demo
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (30, 576, 9, 3, 1536)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rope.theta == 100000.0
    assert "<|im_start|>assistant" in encode_prompt(tokenizer, "hi").text


TOKENIZER_TEXTS = [
    "Hello, world! How are you?",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "numbers 1234567 and 3.14159, unicode: café, 日本語, emoji 🙂",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.mark.slow
@pytest.mark.parity
def test_gguf_tokenizer_and_config_match_transformers():
    """Our torch-free reading of the GGUF metadata gives transformers' tokenizer and config."""
    from transformers import AutoConfig, AutoTokenizer

    from ssah_jax.checkpoints import demo_gguf_path
    from ssah_jax.checkpoints.gguf import gguf_config, gguf_tokenizer, open_gguf

    path = demo_gguf_path(download=False)
    file = open_gguf(path)
    ours, theirs = gguf_tokenizer(file), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(ours, name) == getattr(theirs, name), name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    config, reference = gguf_config(file), AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    for name in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
                 "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(config, name) == getattr(reference, name), name
