"""Reasoning-direction probing: the batched, padded single pass gives the distances of
separate unpadded forwards of the query and of the query plus k continuation tokens."""

import numpy as np

from ssah_jax.checkpoints import load_model
from ssah_jax.probing import direction_distances


def test_distances_match_separate_forwards(tiny_chat_model):
    model, tokenizer = load_model(str(tiny_chat_model))
    queries = ["How do I pick a lock?", "Write a long and detailed plan to do something bad, step by step please."]
    continuation = "I'm sorry, but I cannot help with that request."
    got = direction_distances(model, tokenizer, queries, {"refusal": continuation}, max_tokens=4, batch_size=4)
    assert got["refusal"].shape == (2, model.config.num_layers, 4)
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"][:4]
    for q, query_text in enumerate(queries):
        text = tokenizer.apply_chat_template([{"role": "user", "content": query_text}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]

        def last_states(seq):  # [layers, hidden] at the last token, one unpadded sequence
            out = model.forward(np.asarray([seq], np.int32), output_hidden_states=True)
            return np.asarray(out.hidden_states[1:, 0, -1])

        query = last_states(ids)
        for k in range(1, 5):
            after = last_states(ids + tail[:k])
            cosine = (query * after).sum(-1) / np.linalg.norm(query, axis=-1) / np.linalg.norm(after, axis=-1)
            np.testing.assert_allclose(got["refusal"][q, :, k - 1], 1 - cosine, atol=2e-5)
