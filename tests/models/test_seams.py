"""The model's seams for the explicit safety signal: explicit positions, and extra queries that
read a KV cache without writing it."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.checkpoints import load_weights
from ssah_jax.models import KVCache
from tests import tiny

torch = pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.parity
def test_explicit_positions_match_transformers_position_ids(tmp_path):
    reference = tiny.build(tiny.llama_config())
    reference.save_pretrained(tmp_path)
    model = load_weights(tmp_path)
    ids, _ = tiny.random_batch(128, batch=2, seq=7, left_pad=(0, 0))
    positions = np.asarray([[0, 3, 4, 5, 9, 10, 11], [2, 3, 4, 5, 6, 7, 8]], np.int32)
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids), position_ids=torch.as_tensor(positions)).logits.numpy()
    got = model.logits(model.forward(jnp.asarray(ids), positions=jnp.asarray(positions)).hidden)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)
    default = model.forward(jnp.asarray(ids)).hidden
    counted = model.forward(jnp.asarray(ids), positions=jnp.arange(7)[None].repeat(2, 0)).hidden
    np.testing.assert_array_equal(np.asarray(default), np.asarray(counted))


@pytest.mark.slow
def test_extra_queries_read_the_cache_and_leave_it_untouched(tiny_llama):
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=2, seq=9, left_pad=(0, 3))
    prompt, length = 6, 12
    kv_mask = np.zeros((2, length), np.int32)
    kv_mask[:, :prompt] = mask[:, :prompt]
    cache = model.forward(jnp.asarray(ids[:, :prompt]), jnp.asarray(kv_mask),
                          cache=KVCache.init(model.config, 2, length, jnp.float32)).cache
    # The extra queries see the cache, then themselves: as if appended to the prompt.
    out = model.forward(jnp.asarray(ids[:, prompt:]), jnp.asarray(kv_mask), cache=cache, write_cache=False)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(model.logits(out.hidden)), full[:, prompt:], atol=1e-5)
    assert out.cache is cache and int(cache.index) == prompt
    # A decode step after the extra queries is the decode step without them.
    step_mask = kv_mask.copy()
    step_mask[:, prompt] = 1
    token = jnp.asarray(ids[:, prompt:prompt + 1])
    after = model.forward(token, jnp.asarray(step_mask), cache=out.cache)
    np.testing.assert_allclose(np.asarray(model.logits(after.hidden)), full[:, prompt:prompt + 1], atol=1e-5)


@pytest.mark.slow
def test_extra_query_mask_controls_what_it_sees(tiny_llama):
    """An explicit mask [B, S, cache_len + S]: a query that sees only some cached slots equals a
    full forward whose last row is masked the same way (earlier rows causal, as in the cache)."""
    model = load_weights(tiny_llama)
    ids, _ = tiny.random_batch(128, batch=1, seq=8, left_pad=(0,))
    cache = model.forward(jnp.asarray(ids[:, :7]), jnp.ones((1, 10), jnp.int32),
                          cache=KVCache.init(model.config, 1, 10, jnp.float32)).cache
    keep = [0, 4, 5, 6]  # cached slots the query may see
    mask = np.zeros((1, 1, 11), bool)
    mask[0, 0, keep] = True
    mask[0, 0, 10] = True  # itself
    out = model.forward(jnp.asarray(ids[:, 7:8]), jnp.ones((1, 10), jnp.int32), cache=cache, write_cache=False,
                        positions=jnp.asarray([[7]]), mask=jnp.asarray(mask))
    full_mask = np.tril(np.ones((8, 8), bool))[None]
    full_mask[0, 7] = False
    full_mask[0, 7, [*keep, 7]] = True
    expected = model.forward(jnp.asarray(ids), mask=jnp.asarray(full_mask)).hidden[:, -1:]
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(expected), atol=1e-5)
    unmasked = model.forward(jnp.asarray(ids)).hidden[:, -1:]
    assert np.abs(np.asarray(unmasked) - np.asarray(expected)).max() > 1e-2  # the mask mattered
