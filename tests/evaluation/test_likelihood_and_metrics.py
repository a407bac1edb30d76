"""Log-likelihood scoring against transformers, and the metric helpers."""

import numpy as np
import pytest
import torch

from ssah_jax import evaluation as ev
from ssah_jax.checkpoints import load_weights
from ssah_jax.data import Record, load_dataset
from tests import tiny


def _reference_choice_logprobs(hf, tokenizer, prompt, choices):
    """Full forward over prompt + choice for each choice, as transformers users compute it."""
    context = tokenizer(prompt)["input_ids"]
    out = []
    for choice in choices:
        whole = tokenizer(prompt + choice)["input_ids"]
        assert whole[: len(context)] == context
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    return np.array(out)


@pytest.fixture(scope="module")
def tiny_with_demo_tokenizer(tmp_path_factory):
    """A tiny random Llama with the demo tokenizer's vocabulary."""
    from ssah_jax.checkpoints import demo_gguf_path, load_tokenizer

    tokenizer = load_tokenizer(str(demo_gguf_path(download=False)))
    path = tiny.save(tiny.llama_config(vocab_size=len(tokenizer)), tmp_path_factory.mktemp("tiny"))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_weights(path), tokenizer, hf


@pytest.mark.slow
@pytest.mark.parity
def test_multi_token_choices_match_transformers(tiny_with_demo_tokenizer):
    """Choices of different lengths (1 to 6 tokens) scored on the shared prompt cache equal a
    full forward per choice; prompts of different lengths share a batch (left padding)."""
    model, tokenizer, hf = tiny_with_demo_tokenizer
    prompts = ["The capital of France is", "Q: What colour is the sky on a clear day?\nA:", "2 + 2 ="]
    choices = [[" Paris", " the city of Lyon", " Berlin"], [" blue", " green and yellow", " red"],
               [" 4", " four", " twenty-two point five"]]
    ours = ev.choice_logprobs(model, tokenizer, prompts, choices, batch_size=2)
    ref = np.stack([_reference_choice_logprobs(hf, tokenizer, p, c) for p, c in zip(prompts, choices)])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parity
def test_token_logprobs_match_transformers(tiny_llama):
    from flax import nnx
    from transformers import AutoModelForCausalLM

    model = load_weights(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids, mask = tiny.random_batch(128, left_pad=(0, 0, 0))
    graphdef, state = nnx.split(model)
    ours = np.asarray(ev.token_logprobs(graphdef, state, ids, mask))
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor(ids)).logits, -1).numpy()
    ref = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-4)
    assert (ours[:, 0] == 0).all()


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parity
def test_mmlu_answers_match_transformers_on_50_questions(demo):
    """Zero-shot MMLU by log-likelihood on the demo model: the same pick as transformers (same
    GGUF) on at least 49 of 50 questions spread over the subjects."""
    model, tokenizer, hf = demo
    questions = load_dataset("mmlu", split="test")[::280][:50]
    prompts = [ev.mmlu_prompt(r) for r in questions]
    letters = [" A", " B", " C", " D"]
    ours = ev.choice_logprobs(model, tokenizer, prompts, [letters] * 50)
    letter_ids = [tokenizer(p + c)["input_ids"][-1] for p, c in zip(prompts[:1] * 4, letters)]
    picks = []
    for prompt in prompts:
        with torch.no_grad():
            logits = hf(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
        picks.append(int(torch.argmax(logits[letter_ids])))
    assert (ours.argmax(1) == np.array(picks)).sum() >= 49


def test_final_number():
    assert ev.final_number("Half of 48 is 24, so 48 + 24 = 72.\n#### 72") == "72"
    assert ev.final_number("She makes 9 * 2 = $18 every day. The answer is 18.") == "18"
    assert ev.final_number("It costs $1,200.00 in total") == "1200.00"
    assert ev.final_number("#### 5.0") == "5"
    assert ev.final_number("no digits here") is None


def test_summaries():
    rows = [{"refused": True, "label": "a"}, {"refused": False, "label": "a"}, {"refused": False, "label": "b"}]
    s = ev.summarise_asr(rows)
    assert s["asr"] == pytest.approx(2 / 3) and s["by_category"]["a"]["asr"] == 0.5
    assert ev.summarise_refusal_rate(rows)["refusal_rate"] == pytest.approx(1 / 3)
    assert "inserted_rate" not in ev.summarise_refusal_rate(rows)  # a plain model's answers
    signal = [{**r, "inserted": step} for r, step in zip(rows, (None, 4, None))]  # a safety signal's
    assert ev.summarise_refusal_rate(signal)["inserted_rate"] == pytest.approx(1 / 3)
    sweep = ev.summarise_sweep({"x": [{"refused": True}, {"refused": True}, {"refused": False}],
                                "y": [{"refused": False}, {"refused": True}, {"refused": False}]})
    assert sweep["asr_any_setting"] == pytest.approx(2 / 3)
    assert sweep["per_setting"] == {"x": pytest.approx(1 / 3), "y": pytest.approx(2 / 3)}
    assert len(ev.sweep_settings([0.5, 1.0], [0.9], [0, 40])) == 4


@pytest.mark.real_model
def test_prefill_prefix_is_the_first_k_target_tokens(demo):
    _, tokenizer, _ = demo
    record = Record("x", response="Sure, here is a tutorial for making a cake")
    assert ev.prefill_prefix(tokenizer, record, 3) == "Sure, here"
    with pytest.raises(ValueError, match="target response"):
        ev.prefill_prefix(tokenizer, Record("x"), 3)


def test_the_layer_block_is_the_least_refusing_one_that_leaves_a_working_model():
    from ssah_jax.evaluation.ablation import choose_block

    blocks = [{"layers": "0-1", "refusal_rate": 0.0, "perplexity": 9e4},  # broken, so it refuses nothing
              {"layers": "1-2", "refusal_rate": 0.5, "perplexity": 40.0},
              {"layers": "2-3", "refusal_rate": 0.2, "perplexity": 70.1},  # just over 10 x 7
              {"layers": "3-4", "refusal_rate": 0.9, "perplexity": 8.0}]
    assert choose_block(blocks, 7.0, 10.0)["layers"] == "1-2"
    assert choose_block(blocks, 7.0, 11.0)["layers"] == "2-3"
    with pytest.raises(ValueError, match="perplexity above 7.00"):
        choose_block(blocks, 7.0, 1.0)
