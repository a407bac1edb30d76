"""Layer layouts: the scanned (stacked) model against the unrolled one it converts from, remat
policies, masks and freezing across the conversion, and an abstract 7B-shaped scanned build."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax.checkpoints import load_weights
from ssah_jax.checkpoints.params import model_to_hf_tensors
from ssah_jax.masking import freeze_masks, prune_units
from ssah_jax.models import (
    REMAT_POLICIES,
    CausalLM,
    KVCache,
    Layout,
    ModelConfig,
    default_mask,
    next_token_logprobs,
    stack_layers,
    unstack_layers,
    with_layout,
)
from ssah_jax.sharding import make_mesh, param_specs, shard_batch, use_rules
from ssah_jax.train import Freeze, LoraConfig, OptimizerConfig, setup_training
from tests import tiny

SCANNED = Layout(scan=True)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def fresh(model, layout):
    """``model`` in ``layout`` with arrays of its own (a train step donates its state)."""
    graphdef, state = nnx.split(with_layout(model, layout))
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tiny_config(**overrides):
    return ModelConfig.from_hf(tiny.llama_config(**overrides))


def random_units(config, fraction=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return {"attn": rng.random((config.num_layers, config.num_heads * config.head_dim)) < fraction,
            "mlp": rng.random((config.num_layers, config.intermediate_size)) < fraction}


def test_stack_and_unstack_are_exact_inverses_and_scanned_init_is_the_stacked_unrolled_init():
    config = tiny_config(num_hidden_layers=3)
    unrolled = CausalLM(config, rngs=nnx.Rngs(0))
    scanned = CausalLM(config, layout=SCANNED, rngs=nnx.Rngs(0))
    assert scanned.layers.mlp.down_proj.kernel.shape == (3, config.intermediate_size, config.hidden_size)
    assert_trees_equal(params_of(scanned), stack_layers(params_of(unrolled)))
    assert_trees_equal(unstack_layers(stack_layers(params_of(unrolled))), params_of(unrolled))
    assert_trees_equal(params_of(with_layout(with_layout(unrolled, SCANNED), Layout())), params_of(unrolled))
    # nnx.State: logical axis names gain / lose "layers" in front.
    state = stack_layers(nnx.state(unrolled, nnx.Param))
    assert state["layers"]["attn"]["o_proj"]["kernel"].get_metadata()["out_sharding"] == ("layers", "heads", "embed")
    back = unstack_layers(state)
    assert back["layers"][2]["attn"]["o_proj"]["kernel"].get_metadata()["out_sharding"] == ("heads", "embed")
    # The stacked axis has a sharding rule (replicated): every parameter gets a spec.
    specs = jax.tree.leaves(param_specs(nnx.state(scanned, nnx.Param)))
    assert len(specs) == len(jax.tree.leaves(params_of(scanned)))
    # The HF export reads the same tensors from either layout once unrolled.
    exported = model_to_hf_tensors(with_layout(scanned, Layout()))
    assert_trees_equal(exported, model_to_hf_tensors(unrolled))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tiny.save(tiny.llama_config(), tmp_path_factory.mktemp("layout"))
    unrolled = load_weights(directory)
    return unrolled, with_layout(unrolled, SCANNED)


@pytest.mark.slow
def test_scanned_forward_keeps_the_whole_api_and_matches_unrolled(pair):
    unrolled, scanned = pair
    ids, mask = tiny.random_batch(128, batch=3, seq=10, left_pad=(0, 3, 5))
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    np.testing.assert_allclose(np.asarray(scanned(ids, mask)), np.asarray(unrolled(ids, mask)), atol=1e-5)

    explicit = default_mask(mask, 10, 0).at[:, 7, :4].set(False)
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32) * 2, (3, 10))
    embeddings = unrolled.embed(ids) * 1.5
    kw = dict(mask=explicit, positions=positions, embeddings=embeddings, output_hidden_states=True,
              output_unit_inputs=True)
    a, b = unrolled.forward(ids, mask, **kw), scanned.forward(ids, mask, **kw)
    np.testing.assert_allclose(np.asarray(b.hidden), np.asarray(a.hidden), atol=1e-5)
    assert b.hidden_states.shape == a.hidden_states.shape == (3, 3, 10, 64)
    np.testing.assert_allclose(np.asarray(b.hidden_states), np.asarray(a.hidden_states), atol=1e-5)
    assert len(b.unit_inputs) == len(a.unit_inputs) == 2
    for x, y in zip(b.unit_inputs, a.unit_inputs):
        np.testing.assert_allclose(np.asarray(x.attn), np.asarray(y.attn), atol=1e-5)
        np.testing.assert_allclose(np.asarray(x.mlp), np.asarray(y.mlp), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True])
def test_scanned_model_prefills_decodes_and_reads_the_cache_like_unrolled(pair, stacked):
    unrolled, scanned = pair
    ids, mask = tiny.random_batch(128, batch=2, seq=9, left_pad=(0, 3))
    kv_mask = np.zeros((2, 12), np.int32)
    kv_mask[:, :9] = mask
    kv_mask = jnp.asarray(kv_mask)
    outs = []
    for model, cache in ((unrolled, KVCache.init(unrolled.config, 2, 12, jnp.float32)),
                         (scanned, KVCache.init(scanned.config, 2, 12, jnp.float32, stacked=stacked))):
        prefill = model.forward(jnp.asarray(ids[:, :6]), kv_mask, cache=cache)
        extra = model.forward(jnp.asarray(ids[:, 6:]), kv_mask, cache=prefill.cache, write_cache=False)
        assert extra.cache is prefill.cache
        step = model.forward(jnp.asarray(ids[:, 6:7]), kv_mask, cache=prefill.cache)
        assert step.cache.stacked == cache.stacked and int(step.cache.index) == 7
        outs.append((prefill.hidden, extra.hidden, step.hidden, step.cache))
    for x, y in zip(jax.tree.leaves(outs[0][:3]), jax.tree.leaves(outs[1][:3])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    layers = outs[1][3].layers
    for i, layer in enumerate(outs[0][3].layers):
        k = layers.k[i] if stacked else layers[i].k
        np.testing.assert_allclose(np.asarray(k), np.asarray(layer.k), atol=1e-5)


def _nll(model, ids, mask):
    return -jnp.sum(next_token_logprobs(model, ids, mask) * mask[:, 1:])


def _gradients(model, ids, mask):
    graphdef, state = nnx.split(model)
    grads = jax.jit(jax.grad(lambda s: _nll(nnx.merge(graphdef, s), ids, mask)))(state)
    grads = nnx.to_pure_dict(grads)
    return unstack_layers(grads) if model.layout.scan else grads


def _assert_relative(got, expected, tol=1e-5):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        g, e = np.asarray(g), np.asarray(e)
        assert np.linalg.norm(g - e) <= tol * max(np.linalg.norm(e), 1e-12), (np.linalg.norm(g - e), np.linalg.norm(e))


def _assert_updates_close(got, expected, learning_rate):
    """Adam's first step moves each element by about ``learning_rate`` times the sign of its
    gradient, so gradients equal to float tolerance give updates equal to a small part of it
    (a near-zero gradient's sign aside)."""
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-2 * learning_rate)


@pytest.mark.slow
@pytest.mark.parametrize("remat", sorted(REMAT_POLICIES))
def test_every_remat_policy_in_either_layout_gives_the_unrolled_gradients(pair, remat):
    unrolled, _ = pair
    ids, mask = (jnp.asarray(x) for x in tiny.random_batch(128, batch=3, seq=10, left_pad=(0, 3, 5)))
    expected = _gradients(unrolled, ids, mask)
    for scan in (True, False):
        model = with_layout(unrolled, Layout(scan=scan, remat=remat))
        _assert_relative(_gradients(model, ids, mask), expected)


@pytest.mark.slow
def test_masks_pruning_and_a_masked_optimizer_step_mean_the_same_in_both_layouts(pair):
    unrolled, scanned = pair
    config = unrolled.config
    units = random_units(config)
    # Compact masks stack into masks that broadcast against the stacked parameters.
    params = params_of(unrolled)
    masks = freeze_masks(params, config, frozen_units=units, frozen_layers=[1], frozen_groups=("norms",))
    stacked = stack_layers(masks, like=params)
    for m, p in zip(jax.tree.leaves(stacked["layers"]), jax.tree.leaves(params_of(scanned)["layers"])):
        assert m.ndim == p.ndim and np.broadcast_shapes(m.shape, p.shape) == p.shape
    full = lambda tree, like: [np.broadcast_to(np.asarray(m), p.shape) for m, p in  # noqa: E731
                               zip(jax.tree.leaves(tree), jax.tree.leaves(like))]
    for a, b in zip(full(unstack_layers(stacked), params), full(masks, params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unrolled layout"):
        freeze_masks(params_of(scanned), config, frozen_units=units)
    pruned = stack_layers(prune_units(params, units, config))
    assert_trees_equal(unstack_layers(pruned), prune_units(params, units, config))

    # One AdamW step (weight decay on) with frozen units: the same elements change, by the same.
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=1, weight_decay=0.1)
    batch = tiny.random_batch(128, batch=8, seq=12, left_pad=(0, 2, 0, 0, 4, 0, 1, 0))
    batch = {"input_ids": batch[0], "attention_mask": batch[1], "loss_mask": batch[1]}
    changed, finals = [], []
    for layout in (Layout(), SCANNED):
        with jax.set_mesh(mesh), use_rules():
            training = setup_training(fresh(unrolled, layout), mesh, Freeze(frozen_units=units, groups=("norms",)), opt)
            before = training.final_params(training.state)
            before = jax.tree.map(np.array, before)
            state, _ = training.step(training.state, shard_batch(batch))
            after = jax.tree.map(np.array, training.final_params(state))
        changed.append(jax.tree.map(lambda a, b: a != b, after, before))
        finals.append(after)
    assert_trees_equal(changed[0], changed[1])
    assert any(bool(np.any(c)) for c in jax.tree.leaves(changed[0]))
    _assert_updates_close(finals[1], finals[0], opt.learning_rate)


@pytest.mark.slow
def test_lora_adapters_train_alike_in_both_layouts(pair):
    unrolled, _ = pair
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=1)
    batch = tiny.random_batch(128, batch=8, seq=12, left_pad=(0,) * 8)
    batch = {"input_ids": batch[0], "attention_mask": batch[1], "loss_mask": batch[1]}
    finals = []
    for layout in (Layout(), SCANNED):
        with jax.set_mesh(mesh), use_rules():
            adapters = Freeze(lora=LoraConfig(2, 4.0, ("q_proj", "down_proj")))
            training = setup_training(fresh(unrolled, layout), mesh, adapters, opt)
            state, _ = training.step(training.state, shard_batch(batch))
            finals.append(jax.tree.map(np.array, training.final_params(state)))
    _assert_updates_close(finals[1], finals[0], opt.learning_rate)
    assert any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(params_of(unrolled))))


def test_a_llama2_7b_shaped_scanned_model_builds_abstractly():
    config = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                         num_kv_heads=32, head_dim=128)
    start = time.perf_counter()
    model = nnx.eval_shape(lambda: CausalLM(config, layout=Layout(scan=True, remat="dots"), rngs=nnx.Rngs(0)))
    print(f"abstract Llama-2-7B-shaped scanned build: {time.perf_counter() - start:.2f} s")
    params = params_of(model)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (32, 11008, 4096)
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (32, 4096, 4096)
    assert params["layers"]["input_norm"]["scale"].shape == (32, 4096)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert count == 6_738_415_616  # Llama-2-7B


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["wifv", "wanda", "snip"])
def test_unit_scores_of_a_scanned_model_are_the_unrolled_scores(pair, scorer):
    from ssah_jax.attribution import unit_scores

    unrolled, scanned = pair
    ids, mask = tiny.random_batch(128, batch=3, seq=10, left_pad=(0, 3, 5))
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    expected, got = unit_scores(unrolled, [batch], scorer), unit_scores(scanned, [batch], scorer)
    for module in expected:
        np.testing.assert_allclose(np.asarray(got[module]), np.asarray(expected[module]), rtol=1e-5,
                                   atol=1e-6 * float(np.abs(np.asarray(expected[module])).max()))
