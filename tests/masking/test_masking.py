"""Pruning unit j in our model == zeroing column j of the transformers B matrix (and the rows
of A); parameter masks for grouped-query v channels."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax.checkpoints import load_weights
from ssah_jax.masking import parameter_masks, prune_units, v_channels
from tests import tiny

torch = pytest.importorskip("torch")

HEADS, KV_HEADS, HEAD_DIM, MLP = 4, 2, 16, 96  # two query heads per kv head


def pruned_pair(tmp_path, units):
    hf_config = tiny.llama_config(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                  attention_bias=True, mlp_bias=True)
    reference = tiny.build(hf_config)
    reference.save_pretrained(tmp_path / "hf")
    model = load_weights(tmp_path / "hf")
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, prune_units(state, units, model.config)), reference


def no_units(layers=2):
    return {"attn": np.zeros((layers, HEADS * HEAD_DIM), bool), "mlp": np.zeros((layers, MLP), bool)}


def assert_same_logits(ours, reference):
    ids, mask = tiny.random_batch(128, seq=16)
    expected = tiny.hf_logits(reference, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parity
def test_pruning_mlp_units_matches_zeroed_hf_columns(tmp_path):
    units = no_units()
    units["mlp"][0, [3, 50]] = True
    units["mlp"][1, 95] = True
    ours, reference = pruned_pair(tmp_path, units)
    with torch.no_grad():
        for layer, cols in ((0, [3, 50]), (1, [95])):
            mlp = reference.model.layers[layer].mlp
            mlp.down_proj.weight[:, cols] = 0
            for a in (mlp.gate_proj, mlp.up_proj):
                a.weight[cols, :] = 0
                a.bias[cols] = 0
    assert_same_logits(ours, reference)
    down = np.asarray(ours.layers[0].mlp.down_proj.kernel[...])
    gate = np.asarray(ours.layers[0].mlp.gate_proj.kernel[...])
    assert (down[[3, 50]] == 0).all() and (down[4] != 0).any()  # unit = row of our kernel
    assert (gate[:, [3, 50]] == 0).all() and (np.asarray(ours.layers[0].mlp.up_proj.bias[...])[3] == 0)


@pytest.mark.parity
def test_pruning_attention_units_with_gqa_matches_zeroed_hf_columns(tmp_path):
    # Layer 1: unit (head 0, dim 5) alone: its v channel (kv 0, dim 5) also feeds head 1, so it
    # stays. Units (head 2, dim 7) and (head 3, dim 7) together: they are every reader of
    # v channel (kv 1, dim 7), which is zeroed.
    units = no_units()
    alone, pair = [0 * HEAD_DIM + 5], [2 * HEAD_DIM + 7, 3 * HEAD_DIM + 7]
    units["attn"][1, alone + pair] = True
    ours, reference = pruned_pair(tmp_path, units)
    v_dead = 1 * HEAD_DIM + 7
    with torch.no_grad():
        attn = reference.model.layers[1].self_attn
        attn.o_proj.weight[:, alone + pair] = 0
        attn.v_proj.weight[v_dead, :] = 0
        attn.v_proj.bias[v_dead] = 0
    assert_same_logits(ours, reference)
    v = np.asarray(ours.layers[1].attn.v_proj.kernel[...])
    assert (v[:, v_dead] == 0).all() and (v[:, 5] != 0).any()
    assert np.asarray(ours.layers[1].attn.v_proj.bias[...])[v_dead] == 0
    o = np.asarray(ours.layers[1].attn.o_proj.kernel[...])
    assert (o[alone + pair] == 0).all() and (o[3 * HEAD_DIM + 5] != 0).any()


def test_v_channels_any_versus_all():
    from ssah_jax.models import ModelConfig

    config = ModelConfig.from_hf(tiny.llama_config(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    attn = np.zeros(HEADS * HEAD_DIM, bool)
    attn[0 * HEAD_DIM + 5] = True  # one of kv 0's two readers at dim 5
    attn[[2 * HEAD_DIM + 7, 3 * HEAD_DIM + 7]] = True  # both of kv 1's readers at dim 7
    assert np.flatnonzero(v_channels(attn, config, "any")).tolist() == [5, HEAD_DIM + 7]
    assert np.flatnonzero(v_channels(attn, config, "all")).tolist() == [HEAD_DIM + 7]


def test_parameter_masks_are_compact_and_leave_other_parameters_alone(tmp_path):
    path = tiny.save(tiny.llama_config(), tmp_path / "hf")
    model = load_weights(path)
    units = no_units()
    units["mlp"][1, 7] = True
    masks = nnx.to_pure_dict(parameter_masks(nnx.state(model, nnx.Param), units, model.config))
    mlp = masks["layers"][1]["mlp"]
    assert mlp["down_proj"]["kernel"].shape == (MLP, 1) and mlp["gate_proj"]["kernel"].shape == (1, MLP)
    assert masks["embed"]["embedding"].shape == () and not masks["embed"]["embedding"]
    with pytest.raises(ValueError, match="unit mask 'mlp' has shape"):
        parameter_masks(nnx.state(model, nnx.Param), {"attn": units["attn"], "mlp": units["mlp"][:, :10]},
                        model.config)


def test_freeze_keeps_frozen_elements_bit_identical_under_adamw():
    import jax
    import optax

    from ssah_jax.masking import freeze, zero_frozen_gradients

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)))}
    params["w"] = params["w"].at[0, 0].set(-0.0)  # a negative zero must survive too
    masks = {"w": jnp.asarray([True, False, True, False, False, False])[:, None],  # rows 0 and 2
             "b": jnp.zeros((), bool)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1), freeze(masks))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(params)
        grads["w"] = grads["w"].at[0, 1].set(jnp.nan)  # NaN at a frozen position
        grads = zero_frozen_gradients(grads, state[-1].masks)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for i in range(20):
        new, state = step(new, state, jnp.asarray(rng.normal(size=(3, 6)), jnp.float32))
    before, after = np.asarray(params["w"]), np.asarray(new["w"])
    frozen = np.asarray(masks["w"])[:, 0]
    assert before[frozen].tobytes() == after[frozen].tobytes()  # bit-identical, -0.0 included
    assert np.isfinite(after).all() and np.isfinite(np.asarray(new["b"])).all()
    assert (np.abs(after[~frozen] - before[~frozen]) > 0).all()  # the others moved


def test_freeze_refuses_a_mask_that_would_reshape_or_misalign_its_parameter():
    from ssah_jax.masking import freeze

    params = {"w": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}
    ok = {"w": jnp.asarray([True, False, False])[:, None], "b": jnp.zeros((), bool)}
    assert freeze(ok).init(params).masks["w"].shape == (3, 1)
    # [n, 1] on a bias [n] would broadcast its update to [n, n]; [n] on a square kernel would
    # freeze its columns, not its rows
    with pytest.raises(ValueError, match=r"mask of \['b'\] has shape \(3, 1\), its parameter \(3,\)"):
        freeze({**ok, "b": jnp.ones((3, 1), bool)}).init(params)
    with pytest.raises(ValueError, match=r"mask of \['w'\] has shape \(3,\)"):
        freeze({**ok, "w": jnp.ones((3,), bool)}).init(params)
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 1\)"):
        freeze({**ok, "w": jnp.ones((2, 1), bool)}).init(params)


def test_freeze_after_multisteps_keeps_negative_zeros():
    import jax
    import optax

    from ssah_jax.masking import freeze

    params = {"w": jnp.asarray([[-0.0, 1.0], [0.5, -2.0]], jnp.float32)}
    masks = {"w": jnp.asarray([[True, False], [False, True]])}
    # MultiSteps emits +0.0 updates while it accumulates; freeze after it turns them back into -0.0.
    opt = optax.chain(optax.MultiSteps(optax.adamw(1e-2, weight_decay=0.1), every_k_schedule=2), freeze(masks))
    state = opt.init(params)
    new = params
    for i in range(6):
        grads = {"w": jnp.full((2, 2), 0.1 * (i + 1), jnp.float32)}
        updates, state = jax.jit(opt.update)(grads, state, new)
        new = optax.apply_updates(new, updates)
    frozen = np.asarray(masks["w"])
    assert np.asarray(new["w"])[frozen].tobytes() == np.asarray(params["w"])[frozen].tobytes()
    assert (np.asarray(new["w"])[~frozen] != np.asarray(params["w"])[~frozen]).all()
