"""The attention kernels: ``jax.nn.dot_product_attention`` (training, prefill) against the
grouped-query einsum path (decoding, extra queries) that it replaced there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax.checkpoints import load_weights
from ssah_jax.models import KVCache
from ssah_jax.models.llama import attend, sequence_attention
from tests import tiny


def _inputs(heads, kv_heads, seed=0, b=2, s=5, t=7, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, s, heads, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    mask = rng.random((b, s, t)) > 0.4
    mask[0, 1] = False  # a row that sees nothing (a padding query)
    mask[1, :, :2] = False  # left padding
    return q, k, v, jnp.asarray(mask)


def _head_major(x):
    return x.transpose(0, 2, 1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_sequence_attention_matches_grouped_query_attend_with_explicit_masks(heads, kv_heads):
    q, k, v, mask = _inputs(heads, kv_heads)
    expected = attend(q, _head_major(k), _head_major(v), mask)
    got = sequence_attention(q, k, v, mask)
    assert np.isfinite(np.asarray(got)).all()  # the fully masked row included
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # A row that sees nothing is the uniform mix of the values in both kernels.
    np.testing.assert_allclose(np.asarray(got[0, 1]), np.asarray(jnp.repeat(v[0].mean(0), heads // kv_heads, 0)),
                               atol=1e-5)


def test_sequence_attention_gradients_match_attend():
    q, k, v, mask = _inputs(6, 2, seed=1)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(fn, layout):
        return lambda q, k, v: jnp.sum(w * fn(q, layout(k), layout(v), mask))

    expected = jax.grad(loss(attend, _head_major), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(sequence_attention, lambda x: x), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))


@pytest.mark.slow
def test_prefill_through_the_cache_equals_the_cacheless_forward_and_decoding(tiny_llama):
    """Prefill (S > 1 written to the cache) and a forward without a cache use the fused kernel;
    decoding (S == 1) the grouped-query one: all three agree on the real tokens of left-padded
    rows (a padding query sees no key: its output is a mix of whatever keys the call holds)."""
    model = load_weights(tiny_llama)
    ids, mask = tiny.random_batch(128, batch=3, seq=10, left_pad=(0, 3, 5))
    real = mask[:, :, None].astype(bool)
    full = np.where(real, np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), 0.0)
    prompt, length = 6, 12
    kv_mask = np.zeros((3, length), np.int32)
    kv_mask[:, :10] = mask
    cache = KVCache.init(model.config, 3, length, jnp.float32)
    out = model.forward(jnp.asarray(ids[:, :prompt]), jnp.asarray(kv_mask), cache=cache)
    prefilled = np.where(real[:, :prompt], np.asarray(model.logits(out.hidden)), 0.0)
    np.testing.assert_allclose(prefilled, full[:, :prompt], atol=1e-5)
    cache, steps = out.cache, []
    for t in range(prompt, 10):
        out = model.forward(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(kv_mask), cache=cache)
        cache = out.cache
        steps.append(np.asarray(model.logits(out.hidden)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full[:, prompt:], atol=1e-5)
