"""The demo model (SmolLM2-135M-Instruct Q4_1 GGUF): ours vs transformers on the same file."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.generation import generate_ids, left_pad, render_prompts

torch = pytest.importorskip("torch")

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


def _encode(tokenizer, prompts):
    texts = render_prompts(tokenizer, prompts)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_logits_match_transformers(demo):
    model, tokenizer, reference = demo
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


def test_greedy_generation_matches_transformers(demo):
    model, tokenizer, reference = demo
    ours = generate_ids(model, tokenizer, GREEDY_PROMPTS, max_new_tokens=48, batch_size=5)
    for prompt, row in zip(GREEDY_PROMPTS, ours):
        (ids,) = _encode(tokenizer, [prompt])
        with torch.no_grad():
            out = reference.generate(torch.as_tensor([ids]), max_new_tokens=48, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        if theirs and theirs[-1] == tokenizer.eos_token_id:
            theirs = theirs[:-1]
        assert row == theirs, (prompt, tokenizer.decode(row), tokenizer.decode(theirs))


def test_demo_model_config(demo):
    model, tokenizer, _ = demo
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (30, 576, 9, 3, 1536)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rope.theta == 100000.0
    assert "<|im_start|>assistant" in render_prompts(tokenizer, ["hi"])[0]
