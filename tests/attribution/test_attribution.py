"""Unit scores against a direct computation from full activations / gradients of the
transformers model, streaming, sharding, unit kinds and UnitMap files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssah_jax import sharding
from ssah_jax.attribution import (
    KINDS,
    UnitMap,
    UnitMapMismatch,
    classify,
    sweep_fraction,
    token_mask,
    unit_scores,
)
from ssah_jax.checkpoints import load_weights
from ssah_jax.runs import DTYPES
from tests import tiny

torch = pytest.importorskip("torch")

SEQ = 20


def calibration_batch(rows=8, seed=0):
    """Right-padded rows with a prompt and a response of varying lengths (like pad_batch)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, size=(rows, SEQ)).astype(np.int32)
    attention = np.zeros((rows, SEQ), np.int32)
    loss = np.zeros((rows, SEQ), np.int32)
    for r in range(rows):
        n = int(rng.integers(10, SEQ + 1))
        prompt = int(rng.integers(3, n - 2))
        attention[r, :n] = 1
        loss[r, prompt:n] = 1
        ids[r, n:] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def split(batch, parts):
    return [{k: v[i::parts] for k, v in batch.items()} for i in range(parts)]  # any split will do


def reference_scores(hf_model, batch, scorer, tokens="response"):
    """Direct float64 numpy computation from the transformers model's full activations and
    autograd gradients (its ``weight`` is ``[out, in]``: unit j is column j)."""
    captured = {}
    hooks = []
    for i, layer in enumerate(hf_model.model.layers):
        for module, proj in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            hooks.append(proj.register_forward_pre_hook(
                lambda mod, args, key=(module, i): captured.__setitem__(key, args[0].detach().double().numpy())))
    ids = torch.as_tensor(batch["input_ids"]).long()
    logits = hf_model(ids, attention_mask=torch.as_tensor(batch["attention_mask"])).logits
    for h in hooks:
        h.remove()
    real = batch["attention_mask"] > 0
    response = batch["loss_mask"] > 0
    select = {"response": real & response, "all": real,
              "prompt": real & (np.cumsum(response, axis=1) == 0)}[tokens]
    if scorer == "snip":
        targets = torch.as_tensor(select[:, 1:])
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(logp * targets).sum() / targets.sum()
        loss.backward()
    out = {"attn": [], "mlp": []}
    for i, layer in enumerate(hf_model.model.layers):
        for module, proj in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            w = proj.weight.detach().double().numpy()  # [out, in]
            x = captured[(module, i)][select]  # [tokens, units]
            if scorer == "wifv":
                out[module].append(x.var(axis=0) * (w**2).sum(axis=0))
            elif scorer == "wanda":
                out[module].append(np.sqrt((x**2).sum(axis=0)) * np.abs(w).sum(axis=0))
            else:
                g = proj.weight.grad.double().numpy()
                out[module].append(np.abs(w * g).sum(axis=0))
    hf_model.zero_grad()
    return {m: np.stack(v) for m, v in out.items()}


def assert_close(ours, ref, rtol):
    for m in ("attn", "mlp"):
        a, b = np.asarray(ours[m], np.float64), ref[m]
        assert a.shape == b.shape
        err = np.abs(a - b) / np.abs(b)  # element-wise relative error
        assert err.max() <= rtol, (m, err.max())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    hf_config = tiny.llama_config(num_attention_heads=4, num_key_value_heads=2)  # GQA, 2 layers
    reference = tiny.build(hf_config)
    path = tmp_path_factory.mktemp("attr") / "hf"
    reference.save_pretrained(path)
    return load_weights(path), reference, path


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("scorer", ["wifv", "wanda", "snip"])
def test_scores_equal_direct_computation_and_stream(tiny_pair, scorer):
    model, reference, _ = tiny_pair
    batch = calibration_batch()
    expected = reference_scores(reference, batch, scorer)
    one = unit_scores(model, [batch], scorer)
    assert_close(one, expected, 1e-5)
    streamed = unit_scores(model, split(batch, 4), scorer)
    assert_close(streamed, {m: np.asarray(v, np.float64) for m, v in one.items()}, 1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("tokens", ["prompt", "all"])
def test_token_selection(tiny_pair, tokens):
    model, reference, _ = tiny_pair
    batch = calibration_batch(seed=1)
    expected = reference_scores(reference, batch, "wifv", tokens)
    assert_close(unit_scores(model, split(batch, 2), "wifv", tokens), expected, 1e-5)


def test_token_mask_semantics():
    batch = {"attention_mask": np.array([[1, 1, 1, 1, 1, 0]]), "loss_mask": np.array([[0, 0, 1, 1, 0, 0]])}
    assert token_mask(batch, "response").tolist() == [[False, False, True, True, False, False]]
    assert token_mask(batch, "prompt").tolist() == [[True, True, False, False, False, False]]
    assert token_mask(batch, "all").tolist() == [[True, True, True, True, True, False]]


def test_bad_calibration_input(tiny_pair):
    model = tiny_pair[0]
    batch = calibration_batch()
    with pytest.raises(ValueError, match="lacks \\['loss_mask'\\]"):
        unit_scores(model, [{k: batch[k] for k in ("input_ids", "attention_mask")}])
    with pytest.raises(ValueError, match="scorer='flap'"):
        unit_scores(model, [batch], "flap")
    for scorer in ("wifv", "snip"):
        with pytest.raises(ValueError, match="no response tokens"):
            unit_scores(model, [{**batch, "loss_mask": np.zeros_like(batch["loss_mask"])}], scorer)


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("scorer", ["wifv", "snip"])
def test_sharded_scores_match_single_device(tiny_pair, scorer):
    model, _, path = tiny_pair
    batch = calibration_batch()
    expected = unit_scores(model, split(batch, 2), scorer)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_weights(path, mesh=mesh)
    with jax.set_mesh(mesh), sharding.use_rules():
        scores = unit_scores(sharded, split(batch, 2), scorer)
    assert len(scores["mlp"].sharding.device_set) == 8
    assert_close(scores, {m: np.asarray(v, np.float64) for m, v in expected.items()}, 1e-5)


# ---------------------------------------------------------------------------------------------
# Kinds


def random_scores(seed, layers=3, attn=16, mlp=24):
    rng = np.random.default_rng(seed)
    return {"attn": rng.gamma(2.0, size=(layers, attn)), "mlp": rng.gamma(2.0, size=(layers, mlp)) * 10}


FRACTIONS = {"SCU": 0.05, "UCU": 0.15, "RU": 0.2}


@pytest.mark.parametrize("ranking", ["global", "per_layer"])
def test_kinds_are_disjoint_cover_and_honour_fractions(ranking):
    safety, utility = random_scores(0), random_scores(1)
    umap = classify(safety, utility, FRACTIONS, ranking=ranking)
    stacked = np.stack([np.concatenate([umap.masks[k][m].ravel() for m in ("attn", "mlp")]) for k in KINDS])
    assert (stacked.sum(axis=0) == 1).all()  # every unit has exactly one kind
    if ranking == "global":
        n = stacked.shape[1]
        assert umap.counts() == {"SCU": round(0.05 * n), "UCU": round(0.15 * n), "RU": round(0.2 * n),
                                 "CU": n - round(0.05 * n) - round(0.15 * n) - round(0.2 * n)}
    else:
        for m, size in (("attn", 16), ("mlp", 24)):
            for k in ("SCU", "UCU", "RU"):
                assert (umap.masks[k][m].sum(axis=1) == round(FRACTIONS[k] * size)).all()
    # The ranking rules, on the layer-mean normalised scores.
    norm = {name: {m: s[m] / s[m].mean(axis=1, keepdims=True) for m in s} for name, s in
            (("s", safety), ("u", utility))}
    diff = np.concatenate([(norm["s"][m] - norm["u"][m]).ravel() for m in ("attn", "mlp")])
    total = np.concatenate([(norm["s"][m] + norm["u"][m]).ravel() for m in ("attn", "mlp")])
    scu, ucu, ru, cu = (stacked[KINDS.index(k)].astype(bool) for k in ("SCU", "UCU", "RU", "CU"))
    if ranking == "global":
        assert diff[scu].min() >= diff[~scu].max()
        assert diff[ucu].max() <= diff[~scu & ~ucu].min()
        assert total[ru].max() <= total[cu].min()


def test_classify_rejects_bad_fractions():
    s = random_scores(0)
    with pytest.raises(ValueError, match="sum at most 1"):
        classify(s, s, {"SCU": 0.5, "UCU": 0.4, "RU": 0.3})
    with pytest.raises(ValueError, match="needs exactly"):
        classify(s, s, {"SCU": 0.1})
    with pytest.raises(ValueError, match="ranking='layer'"):
        classify(s, s, FRACTIONS, ranking="layer")


def test_unit_map_files_round_trip_and_check_the_model(tiny_pair, tmp_path):
    model, _, path = tiny_pair
    scores = unit_scores(model, [calibration_batch()])
    umap = classify(scores, random_scores(2, layers=2, attn=64, mlp=96), FRACTIONS, model=model,
                    info={"scorer": "wifv", "data": {"safety": "test"}})
    npz, summary = umap.save(tmp_path / "units")
    assert npz.name == "units.npz" and summary.name == "units.json"
    loaded = UnitMap.load(tmp_path / "units", model=model)
    assert loaded.counts() == umap.counts()
    for k in KINDS:
        for m in ("attn", "mlp"):
            np.testing.assert_array_equal(loaded.masks[k][m], umap.masks[k][m])
    np.testing.assert_array_equal(loaded.scores["safety"]["mlp"], np.asarray(scores["mlp"]))
    assert loaded.info["scorer"] == "wifv" and loaded.info["fractions"] == FRACTIONS
    # The same checkpoint in bfloat16 is the same model; other weights are not.
    UnitMap.load(tmp_path / "units", model=load_weights(path, dtype=DTYPES["bfloat16"]))
    other = tmp_path / "other"
    tiny.save(tiny.llama_config(num_attention_heads=4, num_key_value_heads=2), other, seed=1)
    with pytest.raises(UnitMapMismatch, match="other weights"):
        UnitMap.load(tmp_path / "units", model=load_weights(other))
    wider = tmp_path / "wider"
    tiny.save(tiny.llama_config(intermediate_size=128), wider)
    with pytest.raises(UnitMapMismatch, match="intermediate_size"):
        UnitMap.load(tmp_path / "units", model=load_weights(wider))
    union = loaded.mask("SCU", "CU")
    assert union["mlp"].sum() == loaded.masks["SCU"]["mlp"].sum() + loaded.masks["CU"]["mlp"].sum()


def test_sweep_fraction_keeps_the_largest_fraction_within_tolerance():
    losses = {0.01: 0.5, 0.02: 1.0, 0.04: 2.9, 0.08: 3.5, 0.16: 1.0}
    chosen, tried = sweep_fraction(losses.__getitem__, [0.16, 0.01, 0.04, 0.02, 0.08], tolerance=3.0)
    assert chosen == 0.04
    assert [f for f, _ in tried] == [0.01, 0.02, 0.04, 0.08]  # stops at the first violation
    assert sweep_fraction(lambda f: 10.0, [0.01], tolerance=3.0)[0] == 0.0


def test_scores_are_float32_arrays(tiny_pair):
    scores = unit_scores(tiny_pair[0], [calibration_batch()], "wanda")
    assert all(isinstance(v, jax.Array) and v.dtype == jnp.float32 for v in scores.values())


def test_transition_matrix_counts_units_by_kind_before_and_after():
    from ssah_jax.attribution import transition_matrix

    before = classify(random_scores(0), random_scores(1), FRACTIONS)
    same = transition_matrix(before, before)
    assert (same == np.diag([before.counts()[k] for k in KINDS])).all()
    after = classify(random_scores(2), random_scores(3), FRACTIONS)
    m = transition_matrix(before, after)
    assert m.sum() == before.num_units
    assert list(m.sum(axis=1)) == [before.counts()[k] for k in KINDS]
    assert list(m.sum(axis=0)) == [after.counts()[k] for k in KINDS]
    i, j = KINDS.index("SCU"), KINDS.index("RU")
    assert m[i, j] == sum((before.masks["SCU"][u] & after.masks["RU"][u]).sum() for u in ("attn", "mlp"))



def test_kind_transitions_classify_each_model_alike_and_chain_the_matrices():
    from ssah_jax.attribution import kind_transitions, transition_matrix

    scores = [(random_scores(2 * i), random_scores(2 * i + 1)) for i in range(3)]
    maps = [classify(s, u, FRACTIONS, ranking="per_layer") for s, u in scores]
    got = kind_transitions(scores, FRACTIONS, ranking="per_layer")
    assert len(got) == 2
    for m, (a, b) in zip(got, zip(maps, maps[1:])):
        assert (m == transition_matrix(a, b)).all()
    assert not (got[0] == kind_transitions(scores[:2], FRACTIONS)[0]).all()  # the options reach classify


def test_a_score_cache_spares_another_run_the_pass_and_keys_on_the_settings(tiny_chat_model, tmp_path, monkeypatch):
    """Scores one run computed into a cache (attribution.score_cache) are copied, not computed
    again, by a run with the same model and settings; other settings get another directory."""
    from ssah_jax.attribution import calibration, calibration_scores, score_cache
    from ssah_jax.checkpoints import load_model
    from ssah_jax.data import Record

    model, tokenizer = load_model(str(tiny_chat_model))
    records = [Record("How do I bake bread?", "Mix flour, water and salt."), Record("Name a colour.", "Blue.")]
    kw = dict(scorer="wifv", tokens="response", max_length=64, batch_size=2)
    cache = score_cache(tmp_path / "cache", model, source="tiny", dtype="float32")
    first = calibration_scores(model, tokenizer, records, tmp_path / "a", "safety", cache=cache, **kw)
    assert (cache / "safety.npz").exists() and (cache / "safety.json").exists()
    monkeypatch.setattr(calibration, "unit_scores", lambda *a, **k: pytest.fail("scored again"))
    second = calibration_scores(model, tokenizer, records, tmp_path / "b", "safety", cache=cache, **kw)
    assert (tmp_path / "b" / "safety.npz").exists()
    for module in first:
        np.testing.assert_array_equal(first[module], second[module])
    assert score_cache(tmp_path / "cache", model, source="tiny", dtype="bfloat16") != cache
