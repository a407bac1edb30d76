"""KV-cached generation against transformers and against our own full forward pass."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax import generation
from ssah_jax.checkpoints import load_weights
from ssah_jax.data import left_pad
from ssah_jax.generation import Forced, ForceTokens, filter_logits, generate, generate_tokens
from ssah_jax.models import KVCache
from tests import tiny

torch = pytest.importorskip("torch")


def _run(model, ids, mask, max_new_tokens, stop_ids=(2,), temperature=0.0, seed=0, top_k=0, top_p=1.0, forced=None):
    graphdef, state = nnx.split(model)
    policy = {} if forced is None else {"policy": ForceTokens()}
    return np.asarray(generate_tokens(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
        jnp.asarray(stop_ids, jnp.int32), jnp.int32(0), forced,
        max_new_tokens=max_new_tokens, sample=temperature > 0, **policy,
    ))


@pytest.mark.parity
def test_greedy_matches_transformers_with_left_padding(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = load_weights(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids, mask = tiny.random_batch(128, batch=3, seq=10, left_pad=(0, 4, 7))
    ours = _run(model, ids, mask, 16, stop_ids=(-1,))  # no stop: compare all 16 tokens
    with torch.no_grad():
        out = reference.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                 max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, out[:, ids.shape[1]:].numpy())


@pytest.mark.slow
def test_cached_decoding_equals_full_forward(tiny_llama):
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=8, left_pad=(0, 3))
    new = _run(model, ids, mask, 6, stop_ids=(-1,))
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))
    # Each generated token is the argmax of the full forward at the position before it.
    np.testing.assert_array_equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), new)


@pytest.mark.slow
def test_forward_with_cache_matches_forward_without(tiny_llama):
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=9, left_pad=(0, 2))
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = KVCache.init(model.config, 2, 12, jnp.float32)
    kv_mask = np.zeros((2, 12), np.int32)
    kv_mask[:, :9] = mask
    out = model.forward(jnp.asarray(ids[:, :5]), jnp.asarray(kv_mask), cache=cache)
    out = model.forward(jnp.asarray(ids[:, 5:]), jnp.asarray(kv_mask), cache=out.cache)
    assert int(out.cache.index) == 9
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden)), full[:, 5:], atol=1e-5)


def test_rows_stop_at_their_stop_token(tiny_llama):
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=6, left_pad=(0, 2))
    free = _run(model, ids, mask, 8, stop_ids=(-1,))
    stop = int(free[0, 2])  # make row 0's third token a stop token
    stopped = _run(model, ids, mask, 8, stop_ids=(stop,))
    first = int(np.flatnonzero(free[0] == stop)[0])
    np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1 :] == 0).all()  # padded after the stop


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k(tiny_llama):
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=6, left_pad=(0, 2))
    a = _run(model, ids, mask, 12, stop_ids=(-1,), temperature=1.0, seed=1)
    b = _run(model, ids, mask, 12, stop_ids=(-1,), temperature=1.0, seed=1)
    c = _run(model, ids, mask, 12, stop_ids=(-1,), temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = _run(model, ids, mask, 12, stop_ids=(-1,))
    top1 = _run(model, ids, mask, 12, stop_ids=(-1,), temperature=1.0, seed=3, top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()  # noqa: E731
    assert kept(temperature=1.0, top_k=0, top_p=1.0) == [True] * 5
    assert kept(temperature=1.0, top_k=2, top_p=1.0) == [True, True, False, False, False]
    # top_p=0.6: 0.5 < 0.6, so 0.2 is needed too; 0.5 + 0.2 >= 0.6 stops there.
    assert kept(temperature=1.0, top_k=0, top_p=0.6) == [True, True, False, False, False]
    assert kept(temperature=1.0, top_k=0, top_p=0.3) == [True, False, False, False, False]
    assert kept(temperature=1.0, top_k=4, top_p=0.9) == [True, True, True, True, False]


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The definition, by sorting in float64: which tokens filter_logits keeps."""
    z = logits.astype(np.float64) / np.float32(temperature)
    kept = np.isfinite(z)  # a masked token stays masked
    if top_k:
        kept = z >= np.sort(z, axis=-1)[:, ::-1][:, top_k - 1 : top_k]
    p = np.where(kept, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    p /= p.sum(-1, keepdims=True)
    above = np.array([[p[r][z[r] > v].sum() for v in z[r]] for r in range(len(z))])
    return kept & ((above < top_p) | (top_p >= 1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 40, 1.0), (1.0, 40, 0.8),
                                                      (0.5, 0, 1.0), (1.0, 1, 0.9), (2.0, 300, 0.95)])
def test_filter_logits_keeps_what_sorting_keeps(temperature, top_k, top_p):
    # A vocabulary of 512 with repeated values (ties are kept together) and a masked token.
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(4, 512)) * 3, 1).astype(np.float32)
    logits[:, 7] = -np.inf
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                                   jnp.float32(top_p)))
    np.testing.assert_array_equal(np.isfinite(out), _reference_filter(logits, temperature, top_k, top_p))
    np.testing.assert_array_equal(out[np.isfinite(out)], (logits / np.float32(temperature))[np.isfinite(out)])


def test_filter_logits_top_k_alone_keeps_k_whatever_the_float_mass():
    # top_p = 1.0 is off: top-k alone keeps k tokens per row, even where the kept
    # probabilities sum to a float32 a hair below 1 (a cumulative-sum cut once kept every token).
    logits = jax.random.normal(jax.random.key(0), (32, 4096)) * 3
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.float32(1.0), jnp.int32(50), jnp.float32(1.0))))
    assert kept.sum(axis=-1).tolist() == [50] * 32
    everything = filter_logits(logits, jnp.float32(0.5), jnp.int32(0), jnp.float32(1.0))
    assert np.isfinite(np.asarray(everything)).all()


def test_filter_logits_edges_by_hand():
    def kept(logits, top_k=0, top_p=1.0):
        out = filter_logits(jnp.asarray([logits], jnp.float32), jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p))
        return np.isfinite(np.asarray(out))[0].tolist()

    assert kept([0.0, -0.0, -1.0], top_k=1) == [True, True, False]  # -0.0 ties with 0.0
    assert kept([2.0, 1.0, 0.5], top_k=8) == [True, True, True]  # k beyond the vocabulary: all
    assert kept([1.0, 1.0, 1.0, 1.0], top_k=2, top_p=0.1) == [True] * 4  # one tie: all or none
    assert kept([-np.inf, 3.0, -np.inf], top_k=2, top_p=0.5) == [False, True, False]


def test_left_pad():
    ids, mask = left_pad([[5, 6], [7]], 4, pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


@pytest.mark.slow
@pytest.mark.real_model
def test_generate_text_with_prefix_and_system_prompt(demo):
    model, tokenizer, _ = demo
    prompts = ["What is 2 + 2?", "Name a colour."]
    plain = generate(model, tokenizer, prompts, max_new_tokens=12)
    forced = generate(model, tokenizer, prompts, max_new_tokens=12, answer_prefix="Sure, here is")
    assert all(a.startswith("Sure, here is") for a in forced)
    assert forced != plain
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    assert batched == plain  # batch composition and padding do not change greedy answers
    system = generate(model, tokenizer, prompts[:1], max_new_tokens=12, system_prompt="Answer in French.")
    assert system[0] != plain[0]


@pytest.mark.slow
def test_forced_tokens_per_row_from_a_step_on(tiny_llama):
    """The decode policy forces a row's tokens from a step on (an inserted refusal); other rows
    and earlier steps are untouched, and the model continues from what was forced."""
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=6, left_pad=(0, 2))
    free = _run(model, ids, mask, 10, stop_ids=(-1,))
    inserted = np.asarray([[7, 8, 9], [0, 0, 0]], np.int32)
    forced = Forced(jnp.asarray(inserted), jnp.asarray([3, 0], jnp.int32), jnp.asarray([4, -1], jnp.int32))
    got = _run(model, ids, mask, 10, stop_ids=(-1,), forced=forced)
    np.testing.assert_array_equal(got[1], free[1])  # never forced
    np.testing.assert_array_equal(got[0, :4], free[0, :4])  # before the insertion
    np.testing.assert_array_equal(got[0, 4:7], [7, 8, 9])
    # After the insertion, greedy decoding continues from the answer as it now reads.
    context = np.concatenate([ids[:1], got[:1, :7]], axis=1)
    again = _run(model, context, np.concatenate([mask[:1], np.ones((1, 7), np.int32)], axis=1), 3, stop_ids=(-1,))
    np.testing.assert_array_equal(got[0, 7:], again[0])


def test_forcing_from_the_first_step_is_prefilling(tiny_llama):
    """A prefix forced from step 0 gives the continuation of the prompt + prefix prefilled."""
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=1, seq=6, left_pad=(0,))
    prefix = np.asarray([[11, 12, 13, 14]], np.int32)
    forced = Forced(jnp.asarray(prefix), jnp.asarray([4], jnp.int32), jnp.asarray([0], jnp.int32))
    got = _run(model, ids, mask, 9, stop_ids=(-1,), forced=forced)
    prefilled = _run(model, np.concatenate([ids, prefix], 1), np.ones((1, 10), np.int32), 5, stop_ids=(-1,))
    np.testing.assert_array_equal(got[0, :4], prefix[0])
    np.testing.assert_array_equal(got[0, 4:], prefilled[0])


@pytest.mark.slow
def test_a_policy_feeds_each_step_through_its_own_hook(tiny_llama):
    """A policy's ``feed`` runs every step's forward after the first (here: the default feed,
    counted in the policy state), and what it returns is what decoding continues from."""
    import dataclasses

    from ssah_jax.generation import Sample, feed

    @dataclasses.dataclass(frozen=True)
    class Counting(Sample):
        def __call__(self, model, state, chosen):
            return chosen, state.policy

        def feed(self, model, state, last):
            out, count = feed(model, state, last)
            return out, count + 1

    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=6, left_pad=(0, 2))
    graphdef, state = nnx.split(model)
    args = (graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), jnp.float32(1e-6), jnp.int32(0),
            jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0))
    tokens, count = generate_tokens(*args, jnp.int32(0), max_new_tokens=7, sample=False, policy=Counting(),
                                    return_policy_state=True)
    np.testing.assert_array_equal(tokens, _run(model, ids, mask, 7, stop_ids=(-1,)))
    assert int(count) == 6  # the first token comes from the prefill


@pytest.mark.slow
def test_filler_rows_start_finished_and_the_loop_ends_with_the_real_rows(tiny_llama):
    """The filler rows of a partial batch (``active`` False) start finished: a batch whose one
    real row stops at step 0 runs one step, not ``max_new_tokens`` (the fillers, which never emit
    a stop token here, would hold the loop up); the real rows' tokens are the same, greedy and
    sampled (the random draws do not change)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class StopRowZero:
        """Row 0 emits the stop token 2 at once, the others token 5; the state counts the steps."""

        def __call__(self, model, state, chosen):
            token = jnp.where(jnp.arange(chosen.shape[0]) == 0, 2, 5).astype(jnp.int32)
            return token, state.policy + 1

    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=3, seq=6, left_pad=(0, 6, 6))  # rows 1, 2: filler (all padding)
    graphdef, state = nnx.split(model)
    args = (graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), jnp.float32(1e-6), jnp.int32(0),
            jnp.float32(1.0), jnp.asarray([2], jnp.int32), jnp.int32(0), jnp.int32(0))
    kw = dict(max_new_tokens=8, sample=False, policy=StopRowZero(), return_policy_state=True)
    tokens, steps = generate_tokens(*args, **kw)
    assert int(steps) == 8  # every row active: the fillers run to the end
    tokens, steps = generate_tokens(*args, jnp.asarray([True, False, False]), **kw)
    assert int(steps) == 1
    assert np.asarray(tokens).tolist() == [[2] + [0] * 7, [0] * 8, [0] * 8]

    # Real rows unchanged, greedy and sampled, with filler rows marked.
    ids, mask = tiny.random_batch(128, batch=4, seq=6, left_pad=(0, 2, 6, 6))
    graphdef, state = nnx.split(model)
    for temperature in (0.0, 1.0):
        common = (graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(4),
                  jnp.float32(max(temperature, 1e-6)), jnp.int32(0), jnp.float32(1.0), jnp.asarray([-1], jnp.int32),
                  jnp.int32(0), None)
        kw = dict(max_new_tokens=10, sample=temperature > 0)
        every = np.asarray(generate_tokens(*common, **kw))
        real = np.asarray(generate_tokens(*common, generation.real_rows(2, 4), **kw))
        np.testing.assert_array_equal(real[:2], every[:2])
        assert (real[2:] == 0).all()


@pytest.mark.slow
def test_generate_ids_marks_the_filler_rows_of_a_partial_batch(tiny_chat_model, monkeypatch):
    """A partial last batch is decoded with its filler rows inactive; the answers are those of
    batches without filler."""
    from ssah_jax.checkpoints import load_model

    model, tokenizer = load_model(str(tiny_chat_model))
    prompts = ["Hi", "What is 2 + 2?", "Name a colour."]
    alone = generation.generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    seen = []
    real = generation.generate_tokens

    def recording(*args, **kwargs):
        seen.append(np.asarray(inspect.signature(real).bind(*args, **kwargs).arguments.get("active")).tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_tokens", recording)
    together = generation.generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert seen == [[True, True], [True, False]]
    assert together == alone


def test_invalid_sampling_is_refused_up_front(tiny_chat_model):
    from ssah_jax.checkpoints import load_model

    model, tokenizer = load_model(str(tiny_chat_model))
    for bad in (dict(temperature=-0.5), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="invalid sampling"):
            generation.generate_ids(model, tokenizer, ["Hi"], max_new_tokens=2, **bad)
