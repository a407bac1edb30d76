"""Training: freeze masks under the sharded train step, unit selections vs the HF layout, LoRA,
schedules, and the freeze-mask builders."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax.attribution import classify
from ssah_jax.checkpoints.params import CheckpointError, model_to_hf_tensors
from ssah_jax.masking import freeze_masks
from ssah_jax.models import CausalLM, ModelConfig
from ssah_jax.runs import read_jsonl
from ssah_jax.sharding import make_mesh, shard_batch, use_rules
from ssah_jax.train import (
    Freeze,
    LoraConfig,
    OptimizerConfig,
    ResponseLoss,
    Trainee,
    apply_gradients,
    compile_train_step,
    create_state,
    learning_rate_schedule,
    lora,
    make_optimizer,
    model_shardings,
    setup_training,
)
from ssah_jax.train.loop import LoopConfig, fit
from tests import tiny


def tiny_model(**overrides):
    config = ModelConfig.from_hf(tiny.llama_config(**overrides))
    return CausalLM(config, rngs=nnx.Rngs(0))


def random_units(config, fraction=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return {"attn": rng.random((config.num_layers, config.num_heads * config.head_dim)) < fraction,
            "mlp": rng.random((config.num_layers, config.intermediate_size)) < fraction}


def random_batch(rows, length=24, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[::3, -5:] = 0  # some right padding
    loss = attention.copy()
    loss[:, :6] = 0  # a prompt
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def full(mask, param):
    return np.broadcast_to(np.asarray(mask), param.shape)


@pytest.mark.slow
def test_frozen_elements_bit_identical_over_20_sharded_adamw_steps_with_accumulation():
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = model.config
    masks = freeze_masks(params, config, frozen_units=random_units(config), frozen_groups=("norms",))
    # A -0.0 at a frozen position must stay -0.0 (a +0.0 update would flip its sign bit).
    params["layers"][0]["mlp"]["down_proj"]["kernel"] = params["layers"][0]["mlp"]["down_proj"]["kernel"].at[
        int(np.argmax(random_units(config)["mlp"][0])), 0].set(-0.0)
    initial = jax.device_get(params)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with jax.set_mesh(mesh), use_rules():
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=20,
                                                      weight_decay=0.1, clip_norm=0.5), masks)
        state, shardings = create_state(params, tx, model_shardings(model, mesh), rng=jax.random.key(0))
        kernel = state.params["layers"][1]["mlp"]["gate_proj"]["kernel"]
        assert "fsdp" in str(kernel.sharding.spec)  # FSDP really shards the kernels
        step = compile_train_step(Trainee.of(model), tx, schedule, shardings, accum_steps=2)
        for i in range(20):
            state, metrics = step(state, shard_batch(random_batch(16, seed=i)))
            assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        final = jax.device_get(state.params)
    moved = 0
    for f, i, m in zip(jax.tree.leaves(final), jax.tree.leaves(initial), jax.tree.leaves(jax.device_get(masks))):
        frozen = full(m, i)
        np.testing.assert_array_equal(f.view(np.uint32)[frozen], i.view(np.uint32)[frozen])
        moved += int((f != i)[~frozen].sum())
        assert not np.array_equal(f[~frozen], i[~frozen]) or not (~frozen).any()
    assert moved > 0.9 * sum(int((~full(m, p)).sum()) for p, m in zip(jax.tree.leaves(initial),
                                                                         jax.tree.leaves(jax.device_get(masks))))


@pytest.mark.slow
def test_accumulating_two_micro_batches_equals_one_batch():
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = freeze_masks(params, model.config)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    results = []
    # Adam's first update is lr * g / (|g| + eps): with the default eps (1e-8) an element whose
    # gradient is near eps turns the float rounding of a differently ordered sum into a visible
    # difference (0.1% of lr on one element of 4096 on one CPU). A large eps makes the update
    # proportional to g for small gradients, and with clipping off the comparison also sees the
    # gradient's scale (accumulated gradients 1.5x too large fail it; with eps 1e-8 and clipping,
    # Adam's scale invariance hid that).
    for accum in (1, 2):
        with jax.set_mesh(mesh), use_rules():
            optimizer = OptimizerConfig(learning_rate=1e-3, total_steps=3, eps=1e-2, clip_norm=0.0)
            tx, schedule = make_optimizer(optimizer, masks)
            state, shardings = create_state(jax.tree.map(jnp.copy, params), tx,
                                            model_shardings(model, mesh), rng=jax.random.key(0))
            step = compile_train_step(Trainee.of(model), tx, schedule, shardings, accum_steps=accum)
            state, metrics = step(state, shard_batch(random_batch(8)))
            results.append((jax.device_get(state.params), float(metrics["loss"])))
    (p1, l1), (p2, l2) = results
    assert abs(l1 - l2) < 1e-5
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class NllPlusRowTerm:
    """A second objective plugged into the unchanged step: the response NLL (per token) plus a
    per-row term (per row with any real token), and a weight-0 metric (the row count)."""

    weights: tuple = (("nll", 1.0), ("row", 0.5), ("rows", 0.0))

    def counts(self, batch):
        rows = jnp.sum(jnp.any(batch["attention_mask"] > 0, axis=1).astype(jnp.float32))
        return ResponseLoss().counts(batch) | {"row": rows, "rows": rows}

    def sums(self, model, batch):
        first = model(batch["input_ids"], batch["attention_mask"])[:, 0, 0]  # one logit per row
        real = jnp.any(batch["attention_mask"] > 0, axis=1)
        return ResponseLoss().sums(model, batch) | {"row": jnp.sum(jnp.where(real, first**2, 0.0)),
                                                    "rows": jnp.sum(real.astype(jnp.float32))}


def _one_step(model, objective, accum, batch):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), use_rules():
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=3),
                                      freeze_masks(params, model.config))
        state, shardings = create_state(jax.tree.map(jnp.copy, params), tx, model_shardings(model, mesh),
                                        rng=jax.random.key(0))
        trainee = dataclasses.replace(Trainee.of(model), objective=objective)
        state, metrics = compile_train_step(trainee, tx, schedule, shardings, accum_steps=accum)(
            state, shard_batch(batch))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.slow
def test_a_second_objective_plugs_in_and_accumulates_exactly():
    model, batch = tiny_model(), random_batch(8)
    batch["attention_mask"][5] = 0  # an empty row counts for neither term
    batch["loss_mask"][5] = 0
    (p1, m1), (p2, m2) = (_one_step(model, NllPlusRowTerm(), accum, batch) for accum in (1, 2))
    assert m1["rows"] == 1 and m1["row_count"] == 7 and m1["nll_count"] == batch["loss_mask"][:, 1:].sum()
    assert m1["loss"] == pytest.approx(m1["nll"] + 0.5 * m1["row"], rel=1e-6)
    for key in ("loss", "nll", "row", "grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5), key
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):  # Adam's first step is about lr * sign(g)
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The row term moves the parameters; with weight 0 it is a metric only.
    plain, _ = _one_step(model, ResponseLoss(), 1, batch)
    assert any(not np.allclose(a, b, atol=1e-7) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(plain)))
    metric_only = NllPlusRowTerm(weights=(("nll", 1.0), ("row", 0.0), ("rows", 0.0)))
    same, _ = _one_step(model, metric_only, 1, batch)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nan_gradients_at_frozen_positions_do_not_leak():
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = freeze_masks(params, model.config, frozen_units=random_units(model.config, seed=1))
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(20)]
    poisoned = [jax.tree.map(lambda g, m: np.where(full(m, g), np.nan, g), g, jax.device_get(masks)) for g in grads]
    mesh = make_mesh({"data": 2, "fsdp": 4})
    finals = []
    for sequence in (grads, poisoned):
        with jax.set_mesh(mesh), use_rules():
            tx, _ = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=20, weight_decay=0.1,
                                                   clip_norm=1.0), masks)
            state, shardings = create_state(jax.tree.map(jnp.copy, params), tx,
                                            model_shardings(model, mesh), rng=jax.random.key(0))
            step = jax.jit(lambda s, g: apply_gradients(tx, s, g)[0], in_shardings=(shardings, shardings.params),
                           out_shardings=shardings, donate_argnums=0)
            for g in sequence:
                state = step(state, g)
            finals.append(jax.device_get(state.params))
    for clean, dirty, initial in zip(*(jax.tree.leaves(t) for t in (*finals, jax.device_get(params)))):
        assert np.isfinite(dirty).all()
        np.testing.assert_array_equal(dirty.view(np.uint32), clean.view(np.uint32))
    assert any(not np.array_equal(c, i) for c, i in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(params)))


def hf_masks(model, masks):
    """Our masks, broadcast to their parameters and laid out as transformers' tensors."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    as_float = jax.tree.map(lambda m, p: np.broadcast_to(np.asarray(m), p.shape).astype(np.float32), masks, params)
    return {k: v.astype(bool) for k, v in model_to_hf_tensors(nnx.merge(nnx.graphdef(model), as_float)).items()}


def test_unit_selection_freezes_exactly_the_hf_rows_and_columns_of_its_units():
    model = tiny_model(attention_bias=True, mlp_bias=True)
    c = model.config  # 4 heads, 2 kv heads (groups of 2), head_dim 16, MLP 96
    rng = np.random.default_rng(0)
    shapes = {"attn": (2, 64), "mlp": (2, 96)}
    umap = classify({m: rng.random(s) for m, s in shapes.items()}, {m: rng.random(s) for m, s in shapes.items()},
                    {"SCU": 0.05, "UCU": 0.1, "RU": 0.2})
    units = umap.select("SCU+CU:0.06")
    # SCU plus the 6% of all units (19 of 320) that rank highest on I_S - I_U among the CU.
    assert sum(int(units[m].sum()) for m in shapes) == umap.counts()["SCU"] + round(0.06 * 320)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = hf_masks(model, freeze_masks(params, c, frozen_units=units))
    for layer in range(2):
        p = f"model.layers.{layer}."
        attn, mlp = units["attn"][layer], units["mlp"][layer]
        v = attn.reshape(2, 2, 16).any(axis=1).reshape(32)  # kv head k is read by query heads 2k, 2k+1
        expected = {
            "self_attn.o_proj.weight": np.broadcast_to(attn[None, :], (64, 64)),  # columns
            "self_attn.v_proj.weight": np.broadcast_to(v[:, None], (32, 64)),  # rows
            "self_attn.v_proj.bias": v,
            "mlp.down_proj.weight": np.broadcast_to(mlp[None, :], (64, 96)),  # columns
            "mlp.gate_proj.weight": np.broadcast_to(mlp[:, None], (96, 64)),  # rows
            "mlp.up_proj.weight": np.broadcast_to(mlp[:, None], (96, 64)),
            "mlp.gate_proj.bias": mlp,
            "mlp.up_proj.bias": mlp,
        }
        for name, mask in expected.items():
            np.testing.assert_array_equal(got[p + name], mask, err_msg=name)
    frozen_elsewhere = [k for k, m in got.items() if m.any() and not any(k.endswith(e) for e in expected)]
    assert frozen_elsewhere == []


def test_freeze_masks_for_trained_units_layers_and_groups():
    model = tiny_model()
    c = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    units = random_units(c, 0.5, seed=3)
    trained = hf_masks(model, freeze_masks(params, c, trained_units=units, frozen_groups=("embeddings", "head")))
    # Only the units train: q / k frozen, the B column and A rows of unselected units frozen,
    # norms train (not listed), embeddings and head frozen.
    assert trained["model.layers.0.self_attn.q_proj.weight"].all()
    np.testing.assert_array_equal(trained["model.layers.1.mlp.down_proj.weight"][0], ~units["mlp"][1])
    v_trained = units["attn"][0].reshape(2, 2, 16).all(axis=1).reshape(32)  # every reader must train
    np.testing.assert_array_equal(trained["model.layers.0.self_attn.v_proj.weight"][:, 0], ~v_trained)
    assert not trained["model.layers.0.input_layernorm.weight"].any() and not trained["model.norm.weight"].any()
    assert trained["model.embed_tokens.weight"].all() and trained["lm_head.weight"].all()

    layers = hf_masks(model, freeze_masks(params, c, frozen_layers=[1], frozen_groups=("norms",)))
    assert all(m.all() for k, m in layers.items() if k.startswith("model.layers.1."))
    assert not layers["model.layers.0.mlp.up_proj.weight"].any()
    assert layers["model.layers.0.input_layernorm.weight"].all()
    assert not layers["model.embed_tokens.weight"].any() and layers["model.norm.weight"].all()
    with pytest.raises(ValueError, match="frozen_layers"):
        freeze_masks(params, c, frozen_layers=[2])
    with pytest.raises(ValueError, match="frozen_groups"):
        freeze_masks(params, c, frozen_groups=("attention",))


def test_unit_selection_errors_name_the_problem():
    rng = np.random.default_rng(0)
    shapes = {"attn": (2, 8), "mlp": (2, 8)}
    umap = classify({m: rng.random(s) for m, s in shapes.items()}, {m: rng.random(s) for m, s in shapes.items()},
                    {"SCU": 0.1, "UCU": 0.1, "RU": 0.1})
    np.testing.assert_array_equal(umap.select("SCU + RU")["mlp"], umap.mask("SCU", "RU")["mlp"])
    with pytest.raises(ValueError, match="'XCU' is not a kind"):
        umap.select("SCU+XCU")
    with pytest.raises(ValueError, match="asks for 13 units, SCU has 3"):
        umap.select("SCU:0.4")


@pytest.mark.slow
def test_lora_starts_at_the_base_model_and_only_adapters_train():
    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    adapters = lora.init(jax.random.key(0), params, cfg)
    assert lora.count(adapters) == 2 * (4 * (64 + 64) + 4 * (96 + 64))
    merged = lora.merge(params, adapters, cfg)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # b = 0: the adapted model is the base model
    mesh = make_mesh({"data": 2, "fsdp": 4})
    base = jax.device_get(params)
    with jax.set_mesh(mesh), use_rules():
        shardings = model_shardings(model, mesh)
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=5),
                                      jax.tree.map(lambda _: False, adapters))
        state, state_shardings = create_state(adapters, tx, lora.shardings(adapters, shardings, cfg),
                                              rng=jax.random.key(0), base=params, base_shardings=shardings)
        step = compile_train_step(Trainee.of(model, lora_config=cfg), tx, schedule, state_shardings)
        losses = []
        for i in range(5):
            state, metrics = step(state, shard_batch(random_batch(8, seed=0)))
            losses.append(float(metrics["loss"]))
        final = jax.device_get(lora.merge(state.base, state.params, cfg))
        base_after = jax.device_get(state.base)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    flat = jax.tree_util.tree_flatten_with_path(final)[0]
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(flat, jax.tree.leaves(base)) if not np.array_equal(a, b)}
    assert changed == {f"['layers'][{i}]['{m}']['{p}']['kernel']" for i in range(2)
                       for m, p in (("attn", "q_proj"), ("mlp", "down_proj"))}


def test_schedules_warm_up_then_decay():
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4, total_steps=14))
    assert [float(cosine(i)) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(cosine(9)) == pytest.approx(0.5) and float(cosine(14)) == pytest.approx(0.0)
    linear = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear", total_steps=10,
                                                    end_fraction=0.5))
    assert float(linear(0)) == 2.0 and float(linear(5)) == pytest.approx(1.5) and float(linear(10)) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(OptimizerConfig(schedule="step"))


def test_parameters_outside_the_llama_layout_need_an_explicit_rule():
    """A new parameter (a safety signal's [CLS] row, say) is never silently trained or frozen,
    and has no HF checkpoint name."""
    from ssah_jax.checkpoints import CheckpointError
    from ssah_jax.checkpoints.params import model_to_hf_tensors

    model = tiny_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["signal"] = {"cls": jnp.zeros((64,)), "head": {"kernel": jnp.zeros((64, 1))}}
    with pytest.raises(ValueError, match="signal/cls is outside the Llama layout"):
        freeze_masks(params, model.config)
    trained = freeze_masks(params, model.config, frozen_groups=("embeddings",), other={"signal": False})
    frozen = freeze_masks(params, model.config, other={"signal": True})
    assert not trained["signal"]["cls"] and not trained["signal"]["head"]["kernel"] and trained["embed"]["embedding"]
    assert frozen["signal"]["cls"] and not frozen["embed"]["embedding"]
    model.signal = nnx.Param(jnp.zeros((64,)))
    with pytest.raises(CheckpointError, match="'signal'"):
        model_to_hf_tensors(model)


@pytest.mark.slow
def test_setup_training_freezes_what_the_setting_says_and_the_step_keeps_it():
    model = tiny_model()
    initial = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # the step donates the state
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=3)
    with jax.set_mesh(mesh), use_rules():
        full_ft = setup_training(model, mesh, Freeze(), opt)
        layer0 = setup_training(model, mesh, Freeze(layers=[0], description="layer 0"), opt, accum_steps=2)
        adapters = setup_training(model, mesh, Freeze(lora=LoraConfig(2, 4.0, ("q_proj",))), opt)
        state = layer0.state
        before = layer0.frozen_checksum(state)
        for seed in range(2):
            state, _ = layer0.step(state, shard_batch(random_batch(8, seed=seed)))
        assert layer0.frozen_checksum(state) == before
        changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                               layer0.final_params(state), initial)
    assert full_ft.frozen_elements == 0 and full_ft.description == "full fine-tuning"
    per_layer = sum(p.size for p in jax.tree.leaves(initial["layers"][0]))
    assert layer0.frozen_elements == per_layer and layer0.total_elements == full_ft.total_elements
    assert not any(jax.tree.leaves(changed["layers"][0])) and any(jax.tree.leaves(changed["layers"][1]))
    assert adapters.frozen_elements == 0 and adapters.total_elements == lora.count(adapters.state.params)
    assert adapters.description == (f"LoRA rank 2, alpha 4.0 on q_proj ({adapters.total_elements:,} adapter "
                                    "parameters; the base model is frozen)")


def test_freeze_setting_refuses_contradictions():
    with pytest.raises(ValueError, match="not both"):
        Freeze(frozen_units={}, trained_units={})
    with pytest.raises(ValueError, match="LoRA"):
        Freeze(lora=LoraConfig(2, 4.0, ("q_proj",)), layers=[0])


@pytest.mark.slow
def test_a_resumed_fit_continues_from_its_checkpoint_and_frees_the_initial_state(tmp_path):
    """Killed after 2 of 3 steps, a run resumes at step 2 and ends where an unbroken run ends;
    the state it was set up with is freed (as the first step would have donated it), so a
    resumed run does not hold two states."""
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=3)
    batches = [random_batch(8, seed=seed) for seed in range(3)]

    def run(steps, workdir):
        training = setup_training(tiny_model(), mesh, Freeze(), opt)
        loop = LoopConfig(steps=steps, log_every=1, checkpoint_every=1, keep_checkpoints=5)
        state, summary = fit(training, batches, loop, workdir, data_id={"data": "random batches"})
        return training, jax.tree.map(np.asarray, training.final_params(state)), summary

    with jax.set_mesh(mesh), use_rules():
        _, unbroken, _ = run(3, tmp_path / "unbroken")
        run(2, tmp_path / "resumed")
        training, resumed, summary = run(3, tmp_path / "resumed")
    assert (summary["resumed_from"], summary["steps_run"]) == (2, 1)
    assert all(x.is_deleted() for x in jax.tree.leaves(training.state) if isinstance(x, jax.Array))
    jax.tree.map(np.testing.assert_array_equal, resumed, unbroken)


@pytest.mark.slow
def test_a_fit_killed_in_an_evaluation_logs_each_evaluation_once_when_resumed(tmp_path):
    """Hooks run before their step's checkpoint: a run killed in its final evaluation resumes
    from the step before and evaluates again (not: a final checkpoint without its evaluation,
    which a re-run would never add); a run killed before its first checkpoint starts afresh
    without the killed run's records; a finished run re-run reports its last metrics."""
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=3)
    batches = [random_batch(8, seed=seed) for seed in range(3)]

    def run(workdir, kill_at=None, checkpoint_every=1):
        def hook(step, state):
            if step == kill_at:
                raise KeyboardInterrupt
            return {"value": float(step)}

        training = setup_training(tiny_model(), mesh, Freeze(), opt)
        loop = LoopConfig(steps=3, log_every=1, eval_every=2, checkpoint_every=checkpoint_every)
        _, summary = fit(training, batches, loop, workdir, data_id={"data": "random batches"}, hooks=[hook])
        return summary

    def evaluations(workdir):
        return [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "eval"]

    with jax.set_mesh(mesh), use_rules():
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "final", kill_at=3)
        assert run(tmp_path / "final")["resumed_from"] == 2
        assert evaluations(tmp_path / "final") == [0, 2, 3]
        again = run(tmp_path / "final")
        assert again["steps_run"] == 0 and "loss" in again["last"]
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "early", kill_at=2, checkpoint_every=10)
        assert run(tmp_path / "early", checkpoint_every=10)["resumed_from"] == 0
        assert evaluations(tmp_path / "early") == [0, 2, 3]


@pytest.mark.slow
def test_a_fit_resumed_with_other_frozen_units_is_refused(tmp_path):
    """The freeze masks travel in the optimizer state: a re-run whose units file changed (same
    path, same config) would train with the checkpoint's masks and report its own; refused."""
    mesh = make_mesh({"fsdp": -1})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant", total_steps=3)
    batches = [random_batch(8, seed=seed) for seed in range(3)]

    def run(steps, units_seed):
        model = tiny_model()
        training = setup_training(model, mesh, Freeze(frozen_units=random_units(model.config, seed=units_seed)), opt)
        loop = LoopConfig(steps=steps, log_every=1, checkpoint_every=1)
        return fit(training, batches, loop, tmp_path, data_id={"data": "random batches"})[1]

    with jax.set_mesh(mesh), use_rules():
        run(2, units_seed=0)
        with pytest.raises(CheckpointError, match="other frozen units"):
            run(3, units_seed=1)
        assert run(3, units_seed=0)["resumed_from"] == 2


@pytest.mark.slow
def test_a_fit_resumed_under_other_training_settings_is_refused_naming_them(tmp_path):
    """The checkpoint holds the settings it was made under (optimizer, seed, dtype, objective,
    LoRA): a re-run with another learning rate would mix two runs in one; refused, naming it."""
    mesh = make_mesh({"fsdp": -1})
    batches = [random_batch(8, seed=seed) for seed in range(3)]

    def run(steps, lr, rank=2, workdir=tmp_path):
        opt = OptimizerConfig(learning_rate=lr, schedule="constant", total_steps=3)
        training = setup_training(tiny_model(), mesh, Freeze(lora=LoraConfig(rank, 4.0, ("q_proj",))), opt)
        loop = LoopConfig(steps=steps, log_every=1, checkpoint_every=1)
        return fit(training, batches, loop, workdir, data_id={"data": "random batches"})[1]

    with jax.set_mesh(mesh), use_rules():
        run(2, lr=1e-2)
        with pytest.raises(CheckpointError, match=r"optimizer\.learning_rate: 0\.01 -> 0\.02, checkpoint -> this run"):
            run(3, lr=2e-2)
        # Named too when the setting changes the state's shapes (checked before the restore)
        with pytest.raises(CheckpointError, match=r"settings \(lora\.rank: 2 -> 4, checkpoint"):
            run(3, lr=1e-2, rank=4)
        assert run(3, lr=1e-2)["resumed_from"] == 2


def test_a_freeze_spec_builds_the_freeze_its_mode_names(tmp_path):
    """FreezeSpec (a config's freeze section, typed) -> Freeze: the units of its map's selection
    (frozen, or the only ones trained), as many random units, a block of layers, LoRA, nothing."""
    from ssah_jax.train import FreezeSpec

    model = tiny_model()
    rng = np.random.default_rng(0)
    shapes = {"attn": (2, 64), "mlp": (2, 96)}
    umap = classify({m: rng.random(s) for m, s in shapes.items()}, {m: rng.random(s) for m, s in shapes.items()},
                    {"SCU": 0.05, "UCU": 0.1, "RU": 0.2}, model=model)
    npz, _ = umap.save(tmp_path / "units")
    scu, count = umap.select("SCU"), umap.counts()["SCU"]
    frozen = FreezeSpec(mode="units", units_file=str(npz), selection="SCU").build(model)
    assert all((frozen.frozen_units[m] == scu[m]).all() for m in shapes) and frozen.trained_units is None
    assert frozen.description == f"frozen: SCU of {npz} ({count} units)"
    only = FreezeSpec(mode="only_units", units_file=str(npz), selection="RU", groups=("norms",)).build(model)
    assert all((only.trained_units[m] == umap.select("RU")[m]).all() for m in shapes) and only.groups == ("norms",)
    assert only.description.startswith("trained: only RU of") and only.description.endswith("; frozen groups: norms")
    drawn = FreezeSpec(mode="units", units_file=str(npz), selection="SCU", random=True, seed=3).build(model)
    assert all((drawn.frozen_units[m] == umap.random_units(count, 3)[m]).all() for m in shapes)
    assert sum(int(drawn.frozen_units[m].sum()) for m in shapes) == count
    assert FreezeSpec(mode="layers", layers="0-1").build(model).layers == [0, 1]
    adapters = LoraConfig(2, 4.0, ("q_proj",))
    assert FreezeSpec(mode="lora", lora=adapters).build(model).lora == adapters
    assert FreezeSpec().build(model).description == "full fine-tuning"
    with pytest.raises(ValueError):
        FreezeSpec(mode="units", units_file=str(npz), selection="nonsense").build(model)
