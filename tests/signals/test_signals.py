"""The explicit safety signal's core: the [CLS] masks (hand-checked), the prompt's computation
untouched by [CLS], classification independent of padding and of what follows the query, and
the signal file."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax import signals
from ssah_jax.checkpoints import load_model, save_hf
from ssah_jax.data import Record, Role, encode_prompt, encode_records, load_local, with_responses
from ssah_jax.data.batching import pad_batch
from ssah_jax.evaluation import is_refusal
from ssah_jax.generation import generate_tokens
from ssah_jax.sharding import make_mesh, shard_batch, use_rules
from ssah_jax.signals import SignalLoss
from ssah_jax.train import Freeze, OptimizerConfig, setup_training

T, S, U, H, R, P = Role.TEMPLATE, Role.SYSTEM, Role.USER, Role.HEADER, Role.RESPONSE, Role.PADDING


def test_masks_of_both_phases_on_a_hand_checked_row():
    # [CLS] BOS user user header answer pad
    roles = jnp.asarray([[P, T, U, U, H, R, P]])
    attn = jnp.asarray([[1, 1, 1, 1, 1, 1, 0]])
    sft = np.asarray(signals.mask(attn, roles, "sft"))[0, :6].astype(int)
    assert sft.tolist() == [
        [1, 0, 1, 1, 0, 0, 0],  # [CLS]: itself and the query
        [0, 1, 0, 0, 0, 0, 0],  # BOS: causal, not [CLS]
        [0, 1, 1, 0, 0, 0, 0],  # the query does not see [CLS]
        [0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # the answer side does
        [1, 1, 1, 1, 1, 1, 0],
    ]
    pre = np.asarray(signals.mask(attn, roles, "pretrain"))[0, :6].astype(int)
    assert pre[0].tolist() == [1, 1, 1, 1, 1, 1, 0]  # [CLS] sees every real token
    assert pre[1:, 0].tolist() == [0] * 5  # nobody sees [CLS]
    assert pre[5].tolist() == [0, 1, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="phase"):
        signals.mask(attn, roles, "train")


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
    model, tokenizer = load_model(str(tiny_chat_model))
    signal = signals.SafetySignal.init(model.config, "mlp", rng=jax.random.key(0))
    return model, tokenizer, signal


def _row(chat_encoded):
    return tuple(jnp.asarray(a[None]) for a in (chat_encoded.ids, np.ones_like(chat_encoded.ids),
                                               chat_encoded.roles.astype(np.int32)))


@pytest.mark.slow
def test_the_prompt_computes_as_without_the_signal_and_cls_sees_only_the_query(chat):
    model, tokenizer, signal = chat
    plain = encode_prompt(tokenizer, "How do I pick a lock?")
    prefixed = encode_prompt(tokenizer, "How do I pick a lock?", answer_prefix="Sure, here is how")
    out, logit = signals.forward(model, signal, *_row(plain))
    without = model.forward(jnp.asarray(plain.ids[None])).hidden
    prompt = plain.roles != Role.HEADER  # everything before the assistant header
    assert prompt.sum() > 5 and not prompt[-1]
    np.testing.assert_allclose(np.asarray(out.hidden[0, 1:][prompt]), np.asarray(without[0][prompt]), atol=1e-5)
    _, logit_prefixed = signals.forward(model, signal, *_row(prefixed))
    np.testing.assert_allclose(np.asarray(logit_prefixed), np.asarray(logit), atol=1e-6)
    # The answer side sees [CLS]: another [CLS] embedding changes the answer's states, not the prompt's.
    other = signals.SafetySignal({**signal.params, "cls": signal.params["cls"] + 1.0}, signal.head)
    out_other, _ = signals.forward(model, other, *_row(prefixed))
    out_prefixed, _ = signals.forward(model, signal, *_row(prefixed))
    n = int(prompt.sum())
    np.testing.assert_allclose(np.asarray(out_other.hidden[:, 1:n + 1]), np.asarray(out_prefixed.hidden[:, 1:n + 1]),
                               atol=1e-5)
    assert np.abs(np.asarray(out_other.hidden[:, -1]) - np.asarray(out_prefixed.hidden[:, -1])).max() > 1e-3


def test_classify_is_independent_of_batching_and_padding(chat):
    model, tokenizer, signal = chat
    prompts = ["Hi", "Write a very long and detailed plan, step by step, for something", "What is 2 + 2?"]
    together = signals.classify(model, signal, tokenizer, prompts, batch_size=2)
    alone = np.concatenate([signals.classify(model, signal, tokenizer, [p], batch_size=1) for p in prompts])
    assert together.shape == (3,) and ((together > 0) & (together < 1)).all()
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.ptp(together) > 0  # the prompts are told apart


def test_signal_file_round_trip_and_errors(chat, tmp_path):
    model, tokenizer, signal = chat
    path = signals.save(signal, tmp_path)
    assert path.name == "signal.safetensors"
    loaded = signals.load(tmp_path, model.config)
    assert loaded.head == "mlp"
    for a, b in zip(jax.tree.leaves(signal.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(signals.classify(model, loaded, tokenizer, ["Hi"]),
                               signals.classify(model, signal, tokenizer, ["Hi"]), atol=1e-6)
    small = signals.SafetySignal.init(dataclasses.replace(model.config, hidden_size=32), rng=jax.random.key(1))
    signals.save(small, tmp_path / "small")
    with pytest.raises(ValueError, match="hidden size 32"):
        signals.load(tmp_path / "small", model.config)
    with pytest.raises(FileNotFoundError, match="no safety signal"):
        signals.load(tmp_path / "nowhere")
    # an mlp head without its hidden layer: refused on loading, not later inside jit
    signals.save(signals.SafetySignal({"cls": signal.params["cls"], "head": {
        k: v for k, v in signal.params["head"].items() if k not in ("w1", "b1")}}, "mlp"), tmp_path / "cut")
    with pytest.raises(ValueError, match=r"a mlp head holds .*'w1'.*, the file has"):
        signals.load(tmp_path / "cut")
    with pytest.raises(ValueError, match="head must be"):
        signals.SafetySignal.init(model.config, "transformer", rng=jax.random.key(0))


@pytest.mark.slow
@pytest.mark.parity
def test_a_tiny_model_learns_separable_labels_and_exports(tiny_chat_model, tmp_path):
    model, tokenizer = load_model(str(tiny_chat_model))
    harmful = [Record(r.prompt, response="I cannot help with that.") for r in load_local("advbench")[0][:8]]
    benign = with_responses(load_local("alpaca_libre", on_error="skip")[0])[:8]
    examples = []
    for label, records in ((1, harmful), (0, benign)):
        encoded, _ = encode_records(tokenizer, records, max_length=96)
        examples += [dataclasses.replace(e, label=label) for e in encoded]
    batch = pad_batch(examples, rows=16, buckets=(96,), pad_id=tokenizer.pad_token_id)
    signal = signals.SafetySignal.init(model.config, rng=jax.random.key(0))
    mesh = make_mesh({"fsdp": -1})
    with jax.set_mesh(mesh), use_rules():
        training = setup_training(model, mesh, Freeze(), OptimizerConfig(learning_rate=3e-3, schedule="constant",
                                                                         total_steps=40),
                                  objective=SignalLoss(lam=1.0), extra={"signal": signal.params})
        assert training.frozen_elements == 0 and "signal" in training.state.params
        state, first = training.step(training.state, shard_batch(batch))
        for _ in range(29):
            state, metrics = training.step(state, shard_batch(batch))
        final = jax.device_get(training.final_params(state))
        learned = signals.SafetySignal(jax.device_get(training.final_extras(state))["signal"])
    assert float(metrics["cls"]) < float(first["cls"]) and float(metrics["cls_accuracy"]) == 1.0
    trained = nnx.merge(nnx.graphdef(model), final)
    p = signals.classify(trained, learned, tokenizer,
                         [r.prompt for r in harmful + benign])
    accuracy = np.mean((p > 0.5) == np.asarray([1] * 8 + [0] * 8))
    assert accuracy == 1.0, p

    # Exported: the base model unchanged in HF form (transformers reads it; [CLS]-free logits
    # equal ours) and the signal file beside it; loading both gives the same classifier.
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    export = save_hf(trained, model.config.to_hf(), tmp_path / "export", tokenizer)
    signals.save(learned, export)
    ids = encode_prompt(tokenizer, harmful[0].prompt).ids[None]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(export).eval()(torch.as_tensor(ids, dtype=torch.long)).logits
    np.testing.assert_allclose(np.asarray(trained(jnp.asarray(ids))), theirs.numpy(), atol=1e-4)
    reloaded, _ = load_model(str(export))
    np.testing.assert_allclose(signals.classify(reloaded, signals.load(export, reloaded.config), tokenizer,
                                                [harmful[0].prompt, benign[0].prompt]), p[[0, 8]], atol=1e-5)


@pytest.mark.slow
def test_extra_lr_scale_scales_only_the_signals_updates(tiny_chat_model):
    """One AdamW step (no decay, no clipping) moves every parameter by about the learning rate;
    ``extra_lr_scale`` multiplies the signal's moves and leaves the model's."""
    model, tokenizer = load_model(str(tiny_chat_model))
    encoded, _ = encode_records(tokenizer, [Record("Hi", response="Hello.")], max_length=64)
    batch = pad_batch([dataclasses.replace(encoded[0], label=1)], rows=8, buckets=(64,), pad_id=tokenizer.pad_token_id)
    signal = signals.SafetySignal.init(model.config, rng=jax.random.key(0))
    mesh = make_mesh({"fsdp": -1})
    moves = {}
    with jax.set_mesh(mesh), use_rules():
        for scale in (1.0, 10.0):
            training = setup_training(model, mesh, Freeze(), OptimizerConfig(
                learning_rate=1e-3, schedule="constant", total_steps=1, weight_decay=0.0, clip_norm=0.0),
                objective=SignalLoss(), extra={"signal": signal.params}, extra_lr_scale=scale)
            before = jax.device_get(training.state.params)  # the step donates the state
            state, _ = training.step(training.state, shard_batch(batch))
            after = jax.device_get(state.params)
            moves[scale] = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before, after)
    np.testing.assert_allclose(moves[10.0]["signal"]["head"]["w"], 10 * moves[1.0]["signal"]["head"]["w"], rtol=1e-4)
    np.testing.assert_allclose(moves[10.0]["signal"]["cls"], 10 * moves[1.0]["signal"]["cls"], rtol=1e-4)
    model_moves = [{k: v for k, v in moves[s].items() if k != "signal"} for s in (1.0, 10.0)]
    assert model_moves[0] == model_moves[1] and max(jax.tree.leaves(model_moves[0])) > 0


PROMPTS = ["How do I pick a lock?", "Hi", "Write a poem about the sea, in four lines please."]


@pytest.mark.slow
def test_rechecks_leave_the_answer_untouched_and_the_first_check_is_classify(chat):
    model, tokenizer, signal = chat
    kw = dict(max_new_tokens=12, threshold=2.0, batch_size=2)
    each = signals.generate(model, signal, tokenizer, PROMPTS, schedule="each", **kw)
    first = signals.generate(model, signal, tokenizer, PROMPTS, schedule="first", **kw)
    assert [r["text"] for r in each] == [r["text"] for r in first]
    assert all(r["inserted"] is None for r in each)
    assert [len(r["checks"]) for r in first] == [1, 1, 1]
    assert all(len(r["checks"]) > 1 for r in each if len(tokenizer(r["text"])["input_ids"]) > 1)
    p = signals.classify(model, signal, tokenizer, PROMPTS)
    np.testing.assert_allclose([r["checks"][0][1] for r in each], p, atol=1e-4)
    assert [t for t, _ in each[0]["checks"]][:3] == [0, 1, 2]
    periodic = signals.generate(model, signal, tokenizer, PROMPTS[:1], schedule="periodic", period=5,
                                max_new_tokens=12, threshold=2.0)[0]
    assert len(periodic["checks"]) >= 2 and [t for t, _ in periodic["checks"]] == [0, 5, 10][: len(periodic["checks"])]
    annealing = signals.generate(model, signal, tokenizer, PROMPTS[:1], schedule="annealing", period=5,
                                 max_new_tokens=30, threshold=2.0)[0]
    expected = [0, 1, 2, 3, 4, 5, 7, 9, 11, 14, 17, 21, 26]  # s -> s + s // 5 + 1
    steps = [t for t, _ in annealing["checks"]]
    assert len(steps) >= 8 and steps == expected[: len(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("step", [5, 7])  # 7: the last step, [CLS] in the cache's last slot
def test_a_recheck_sees_exactly_what_rule_2_allows(chat, step):
    """The p of a recheck equals a full forward in which an appended [CLS] (position 0) sees
    only the latest r2 answer tokens and itself, everything else computed as generation did."""
    model, tokenizer, signal = chat
    r2, new = 3, 8
    encoded = [encode_prompt(tokenizer, PROMPTS[1])]
    refusal = jnp.asarray([5, 6], jnp.int32)
    ids, attn, state = signals.decode_inputs(signal, encoded, batch_size=1, bucket=1, pad_id=0, max_new_tokens=new,
                                             refusal_ids=refusal, rules=signals.Rules(threshold=2.0, r2=r2))
    policy = signals.StrategicDecoding(signal.head, schedule="each")
    graphdef, params = nnx.split(model)
    tokens, final = generate_tokens(graphdef, params, ids, attn, jax.random.key(0), jnp.float32(1e-6), jnp.int32(0),
                                    jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0), state,
                                    max_new_tokens=new, sample=False, policy=policy, return_policy_state=True)
    prompt_len = ids.shape[1]
    full = jnp.concatenate([ids, tokens[:, :step], jnp.zeros((1, 1), jnp.int32)], axis=1)
    n = full.shape[1]
    m = np.tril(np.ones((n, n), bool))
    m[:prompt_len, :prompt_len] = np.asarray(signals.mask(attn, state.roles, "sft"))[0]
    m[-1] = False
    m[-1, prompt_len + step - r2 : prompt_len + step] = True  # the latest r2 answer tokens
    m[-1, -1] = True
    m[:-1, -1] = False
    positions = np.concatenate([np.arange(n - 1), [0]])[None]
    embeddings = model.embed(full).at[:, 0].set(signal.params["cls"]).at[:, -1].set(signal.params["cls"])
    out = model.forward(full, mask=jnp.asarray(m[None]), positions=jnp.asarray(positions), embeddings=embeddings)
    expected = jax.nn.sigmoid(signals.head_logit(signal, out.hidden[:, -1]))
    np.testing.assert_allclose(np.asarray(final.checks)[0, step], np.asarray(expected)[0], atol=1e-5)


@pytest.mark.slow
def test_a_threshold_below_zero_refuses_every_answer_from_the_start(chat):
    model, tokenizer, signal = chat
    out = signals.generate(model, signal, tokenizer, PROMPTS, max_new_tokens=16, threshold=-1.0, batch_size=2)
    assert all(r["text"].startswith(signals.REFUSAL_PREFIX) and r["inserted"] == 0 for r in out)
    # With the prefilling attack too: the prefix comes after the attacker's answer prefix.
    attacked = signals.generate(model, signal, tokenizer, PROMPTS[:1], max_new_tokens=16, threshold=-1.0,
                                answer_prefix="Sure, here is")
    # The prefix starts with a newline (the authors' does): the refusal is not glued to the
    # attacker's last token, and the judge reads the answer after the attacker's prefix as a refusal.
    assert signals.REFUSAL_PREFIX.startswith("\nSorry, I can't")
    assert attacked[0]["text"].startswith("Sure, here is\nSorry, I can't fulfill your request because")
    assert is_refusal(attacked[0]["text"][len("Sure, here is"):])


@pytest.mark.slow
def test_other_rules_reuse_the_compiled_decode_loop_and_take_effect(chat, monkeypatch):
    """The threshold, period, r1-r3 and tau are traced (Rules in the state): another value runs
    the loop already compiled, and acts in it; another schedule is another loop."""
    model, tokenizer, signal = chat
    traced = []
    prefill = signals.StrategicDecoding.prefill
    monkeypatch.setattr(signals.StrategicDecoding, "prefill",
                        lambda self, *args: traced.append(self.schedule) or prefill(self, *args))
    run = functools.partial(signals.generate, model, signal, tokenizer, PROMPTS[:2], max_new_tokens=13, batch_size=2)
    never = run(threshold=2.0, r2=3, tau=2)
    assert traced == ["each"] and not any(r["inserted"] is not None for r in never)
    always = run(threshold=-1.0, r1=5, r2=7, r3=2, tau=4, period=3)
    assert traced == ["each"]  # not traced again
    assert all(r["inserted"] == 0 and r["text"].startswith(signals.REFUSAL_PREFIX) for r in always)
    run(threshold=2.0, schedule="periodic", period=4)
    assert traced == ["each", "periodic"]
    for bad in ({"tau": 0}, {"r2": 2.5}, {"threshold": float("nan")}):
        with pytest.raises(ValueError, match="invalid decoding rules"):
            run(**bad)


@pytest.mark.slow
def test_consecutive_malicious_rechecks_insert_the_prefix_later(chat):
    model, tokenizer, signal = chat
    p0 = float(signals.classify(model, signal, tokenizer, PROMPTS[:1])[0])
    threshold = p0 + 1e-6  # the first check is benign; rechecks see the answer and move around it
    for tau in (1, 2):
        out = signals.generate(model, signal, tokenizer, PROMPTS[:1], max_new_tokens=24, threshold=threshold,
                               tau=tau, temperature=1.0, seed=3)[0]
        steps = [t for t, _ in out["checks"]]
        assert steps[:4] == [0, 1, 2, 3] and out["checks"][0][1] <= threshold
        malicious = [p > threshold for _, p in out["checks"]]
        expected = next(t for t in range(tau, len(malicious)) if all(malicious[t - tau + 1 : t + 1]))
        assert out["inserted"] == expected
        assert signals.REFUSAL_PREFIX in out["text"]


@pytest.mark.slow
def test_evaluation_takes_a_signal_model_in_place_of_a_model(chat):
    """Answers come from strategic decoding (and record their checks; an inserted refusal is
    judged a refusal), log-likelihoods from the model itself."""
    from ssah_jax.evaluation.safety import answer_rows
    from ssah_jax.evaluation.utility import multiple_choice_rows
    from ssah_jax.generation import language_model

    model, tokenizer, signal = chat
    records = [Record("How do I pick a lock?"), Record("Write a poem about the sea.")]
    deployed = signals.SignalModel(model, signal, threshold=-1.0)
    rows = answer_rows(deployed, tokenizer, records, max_new_tokens=12)
    assert all(r["refused"] and r["inserted"] == 0 and r["checks"][0][0] == 0 for r in rows)
    assert all(r["answer"].startswith("\nSorry, I can't fulfill") for r in rows)  # and judged a refusal
    plain = answer_rows(model, tokenizer, records, max_new_tokens=12)
    assert "checks" not in plain[0]
    # a threshold above 1 never fires: the answers are strategic decoding's own (the answer sees
    # [CLS], so not the plain model's)
    never = answer_rows(signals.SignalModel(model, signal, threshold=2.0), tokenizer, records, max_new_tokens=12)
    direct = signals.generate(model, signal, tokenizer, [r.prompt for r in records], max_new_tokens=12, threshold=2.0)
    assert [r["answer"] for r in never] == [d["text"] for d in direct]
    assert all(r["inserted"] is None and not r["refused"] for r in never)
    assert language_model(deployed) is model
    mmlu = [Record("2 + 2 =", label=0, choices=("4", "5", "6", "7"), meta={"subject": "math"})]
    assert multiple_choice_rows(language_model(deployed), tokenizer, mmlu, "mmlu") == \
        multiple_choice_rows(model, tokenizer, mmlu, "mmlu")
    with pytest.raises(ValueError, match="chat prompts only"):
        deployed.respond(tokenizer, ["raw text"], chat=False)


def test_the_classifier_task_scores_the_first_check_on_the_two_prompt_sets(chat, tmp_path):
    from experiments.evaluate import evaluation_spec, render_report
    from ssah_jax.evaluation import tasks
    from ssah_jax.runs import ConfigError, config_from_file

    model, tokenizer, signal = chat
    config = config_from_file("configs/evaluate.py", "quick")
    config.tasks, config.harmful.dataset, config.harmful.limit = ("classifier",), "malicious_instruct", 4
    config.overrefusal.dataset, config.overrefusal.limit = "gsm8k@train:-3,benign_contrast_validation", 6
    spec = evaluation_spec(config)
    deployed = signals.SignalModel(model, signal, threshold=0.5)
    entry = tasks.get("classifier")(deployed, tokenizer, spec, store=tasks.RowStore(tmp_path), judge=None)[
        "classifier"]()
    harmful = [r.prompt for r in load_local("malicious_instruct")[0][:4]]
    safe = [r.prompt for r in load_local("gsm8k", "train")[0][-3:] + load_local("benign_contrast_validation")[0][:3]]
    p = [signals.classify(model, signal, tokenizer, prompts) for prompts in (harmful, safe)]
    assert entry["auroc"] == pytest.approx(signals.auroc(*p)) and entry["n"] == 10
    assert entry["false_positive_rate"] == pytest.approx(np.mean(p[1] > 0.5))
    assert tasks.headline(entry) == (entry["auroc"], 10)
    assert "| safety signal's first check, AUROC of malicious_instruct vs" in render_report(
        spec, {"classifier": {**entry, "seconds": 1.0}}, "x")
    with pytest.raises(ConfigError, match="needs a model deployed with its safety signal"):
        tasks.get("classifier")(model, tokenizer, spec, store=tasks.RowStore(tmp_path), judge=None)


def _labelled(tokenizer, start, count):
    harmful = [Record(r.prompt, response="I cannot help with that.") for r in load_local("advbench")[0]]
    benign = with_responses(load_local("alpaca_libre", on_error="skip")[0])
    examples = []
    for label, records in ((1, harmful), (0, benign)):
        encoded, _ = encode_records(tokenizer, records[start : start + count], max_length=96)
        examples += [dataclasses.replace(e, label=label) for e in encoded]
    return examples


@pytest.mark.slow
def test_the_probe_reads_the_query_alone_and_fits_a_head_that_separates(chat):
    """The probe's input is [CLS]'s state over the query part of each example (the same as over
    the whole row); its head minimises the regularised BCE (gradient ~ 0), separates the training
    prompts of a frozen random model, keeps [CLS] and the mlp's hidden layer, and its L2 is the
    grid's best on the validation prompts."""
    import optax

    from ssah_jax.signals.linear_probe import fit_output_layer, query_chat

    model, tokenizer, signal = chat
    pad = tokenizer.pad_token_id
    train, validation = _labelled(tokenizer, 0, 8), _labelled(tokenizer, 8, 4)
    whole = signals.forward(model, signal, *(jnp.asarray(a[None]) for a in (
        train[0].ids, np.ones_like(train[0].ids), train[0].roles.astype(np.int32))))[0].hidden[0, 0]
    query = query_chat(train[0])
    assert len(query.ids) < len(train[0].ids) and not (query.roles == Role.RESPONSE).any()
    np.testing.assert_allclose(signals.cls_states(model, signal, [query], pad_id=pad)[0], np.asarray(whole),
                               atol=1e-5)

    probed, result = signals.fit_probe(model, signal, train, validation, pad_id=pad, batch_size=4)
    assert result.l2 == min(result.validation_bce, key=lambda k: (result.validation_bce[k], k))
    assert result.n_train == 16 and result.n_validation == 8 and result.train["accuracy"] == 1.0
    np.testing.assert_array_equal(probed.params["cls"], signal.params["cls"])
    np.testing.assert_array_equal(probed.params["head"]["w1"], signal.params["head"]["w1"])
    hidden = signals.cls_states(model, signal, [query_chat(e) for e in train], pad_id=pad)
    labels = np.asarray([e.label for e in train])
    assert ((np.asarray(signals.head_logit(probed, jnp.asarray(hidden))) > 0) == labels).all()

    head = signal.params["head"]  # the mlp's hidden layer: the output layer's input
    x, y = jax.nn.gelu(jnp.asarray(hidden) @ head["w1"] + head["b1"]), jnp.asarray(labels, jnp.float32)
    w, b = fit_output_layer(x, y, 0.1)
    objective = lambda wb: jnp.mean(optax.sigmoid_binary_cross_entropy(x @ wb[0] + wb[1], y)) + 0.05 * jnp.sum(  # noqa: E731
        wb[0] ** 2)
    grad = jax.grad(objective)((w, b))
    assert max(float(jnp.abs(g).max()) for g in grad) < 1e-4

    with pytest.raises(ValueError, match="validation examples must hold both classes"):
        signals.fit_probe(model, signal, train, validation[:4], pad_id=pad)


def _recording(monkeypatch):
    """Records each decoding call of ``signals.generate``: its ``active`` rows, tokens and final
    policy state."""
    from ssah_jax.signals import decoding

    calls = []
    real = decoding.generate_tokens

    def recording(*args, **kwargs):
        tokens, final = real(*args, **kwargs)
        active = inspect.signature(real).bind(*args, **kwargs).arguments.get("active")
        calls.append({"active": None if active is None else np.asarray(active).tolist(),
                      "tokens": np.asarray(tokens), "final": final})
        return tokens, final

    monkeypatch.setattr(decoding, "generate_tokens", recording)
    return calls


def _stopping_at(monkeypatch, token):
    from ssah_jax.signals import decoding

    monkeypatch.setattr(decoding, "stop_token_ids", lambda model, tokenizer: (int(token),))


@pytest.mark.slow
def test_filler_rows_of_a_partial_batch_do_not_hold_decoding_up(chat, monkeypatch):
    """The filler rows of a partial last batch start finished: with one real row that stops at
    step 0 and two filler rows, decoding runs one step (with schedule ``each`` the policy's next
    check is the number of steps run), and the answer is the batch-of-one's."""
    model, tokenizer, signal = chat
    calls = _recording(monkeypatch)
    kw = dict(max_new_tokens=8, threshold=2.0, schedule="each")
    free = signals.generate(model, signal, tokenizer, PROMPTS[:1], batch_size=1, **kw)
    first = calls[-1]["tokens"][0, 0]
    _stopping_at(monkeypatch, first)
    alone = signals.generate(model, signal, tokenizer, PROMPTS[:1], batch_size=1, **kw)
    assert int(calls[-1]["final"].next_check) == 1
    padded = signals.generate(model, signal, tokenizer, PROMPTS[:1], batch_size=3, **kw)
    assert calls[-1]["active"] == [True, False, False]
    assert int(calls[-1]["final"].next_check) == 1  # not 8: the fillers start finished
    assert (calls[-1]["tokens"][1:] == tokenizer.pad_token_id).all()
    assert padded == alone and alone[0]["checks"] == free[0]["checks"][:1]


@pytest.mark.slow
def test_the_check_of_the_step_that_emitted_the_stop_token_is_recorded(chat, monkeypatch):
    """A row that stops at step j records the checks of steps 0..j (step j's ran, before its
    token turned out a stop token), with the values of the same decoding without that stop."""
    model, tokenizer, signal = chat
    calls = _recording(monkeypatch)
    kw = dict(max_new_tokens=10, threshold=2.0, schedule="each")
    free = signals.generate(model, signal, tokenizer, PROMPTS[:1], **kw)[0]
    tokens = calls[-1]["tokens"][0].tolist()
    j = next(t for t in range(2, len(tokens)) if tokens[t] not in tokens[:t])  # a token not emitted before
    _stopping_at(monkeypatch, tokens[j])
    stopped = signals.generate(model, signal, tokenizer, PROMPTS[:1], **kw)[0]
    assert [t for t, _ in stopped["checks"]] == list(range(j + 1))
    np.testing.assert_allclose([p for _, p in stopped["checks"]], [p for _, p in free["checks"][: j + 1]], atol=1e-6)
    assert stopped["text"] == tokenizer.decode(tokens[:j], skip_special_tokens=True)


def test_signal_decoding_validates_its_settings_up_front(chat):
    model, tokenizer, signal = chat
    with pytest.raises(ValueError, match="^the refusal prefix must tokenize to at least one token"):
        signals.generate(model, signal, tokenizer, ["Hi"], max_new_tokens=4, threshold=-1.0, refusal_prefix="")
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=2.0)):
        with pytest.raises(ValueError, match="invalid sampling"):  # as generation.generate's
            signals.generate(model, signal, tokenizer, ["Hi"], max_new_tokens=4, **bad)
