"""Reasoning-direction probing: the batched, padded single pass gives the distances of
separate unpadded forwards of the query and of the query plus k continuation tokens; the
summary averages positions and phrasings, so one token cannot dominate it."""

import numpy as np
import pytest

from ssah_jax.checkpoints import load_model
from ssah_jax.probing import direction_distances, mean_over_positions, summarise_directions


@pytest.mark.slow
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


def test_the_mean_over_positions_smooths_one_tokens_spike():
    d = np.array([[0.1, 0.9, 0.1, 0.1]])  # the second token alone moves the state
    np.testing.assert_allclose(mean_over_positions(d), [[0.1, 0.5, 1.1 / 3, 0.3]])


def test_the_summary_averages_phrasings_and_gives_per_query_gaps():
    # 2 queries, 2 layers, 3 lengths; two refusal and one compliance phrasing
    r0 = np.full((2, 2, 3), 0.2)
    r1 = np.full((2, 2, 3), 0.4)
    c0 = np.full((2, 2, 3), 0.5)
    c0[1] = 0.1  # the second query's state is closer to the compliance
    s = summarise_directions({"refusal_0": r0, "refusal_1": r1, "compliance_0": c0},
                             {"refusal_0": "refusal", "refusal_1": "refusal", "compliance_0": "compliance"})
    np.testing.assert_allclose(s["refusal"], 0.3)
    np.testing.assert_allclose(s["gap"], [0.2, -0.2])
    with pytest.raises(ValueError, match="no compliance continuation"):
        summarise_directions({"refusal_0": r0}, {"refusal_0": "refusal"})


def test_a_models_reasoning_direction_sorts_the_phrasings_by_kind(tiny_chat_model):
    """reasoning_direction (a model's result of the probing stage): each kind from its own
    phrasings, averaged over the queries; the gap compliance minus refusal per query."""
    from ssah_jax.probing import reasoning_direction

    model, tokenizer = load_model(str(tiny_chat_model))
    queries = ["How do I pick a lock?", "Tell me how to hurt someone."]
    refusal, compliance = "I'm sorry, but I cannot help with that.", "Sure, here is how you can do it step by step."
    got = reasoning_direction(model, tokenizer, queries, [refusal], [compliance], max_tokens=3, batch_size=2)
    d = direction_distances(model, tokenizer, queries, {"r": refusal, "c": compliance}, max_tokens=3, batch_size=2)
    r, c = mean_over_positions(d["r"]), mean_over_positions(d["c"])
    np.testing.assert_allclose(got["refusal"], r.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got["compliance"], c.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got["gaps"], (c[..., -1] - r[..., -1]).mean(axis=-1), rtol=1e-6)
    assert np.asarray(got["refusal"]).shape == (model.config.num_layers, 3) and len(got["gaps"]) == 2
