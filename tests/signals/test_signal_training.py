"""Training the signal beyond the first check. The decoding's rechecks (signals.Rechecks): the
views' windows on a hand-checked row, each view equal to an explicit forward of its own, the
rows untouched by the views, a rule-2 view equal to the decoding's recheck at that step, the
loss's terms. The [CLS]-only loss of signal pre-training: no gradient reaches the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssah_jax import signals
from ssah_jax.checkpoints import load_model
from ssah_jax.data import Record, Role, encode_prompt, encode_records
from ssah_jax.data.batching import pad_batch
from ssah_jax.generation import generate_tokens

T, U, H, R, P = Role.TEMPLATE, Role.USER, Role.HEADER, Role.RESPONSE, Role.PADDING


def test_the_views_of_a_hand_checked_row():
    # [CLS] BOS user user header r r r r r pad
    roles = jnp.asarray([[P, T, U, U, H, R, R, R, R, R, P]])
    attn = jnp.asarray([[1] * 10 + [0]])
    sees, used = signals.views(attn, roles, signals.Rechecks(r1=2, r2=2, windows=2))
    assert np.asarray(sees).astype(int)[0].tolist() == [
        [0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0],  # rule 1: the query and the first 2 answer tokens
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],  # rule 2 up to answer token ceil(5 / 2) = 3: tokens 2, 3
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],  # up to token 5, the answer's last: tokens 4, 5
    ]
    assert np.asarray(used).tolist() == [[True, True, True]]
    # one answer token and 3 windows: every window ends at it, so only the first is used; no
    # answer at all: no view
    short = jnp.asarray([[P, T, U, H, R, P, P], [P, T, U, U, H, P, P]])
    _, used = signals.views(jnp.asarray([[1] * 5 + [0, 0], [1] * 5 + [0, 0]]), short, signals.Rechecks(windows=3))
    assert np.asarray(used).tolist() == [[True, True, False, False], [False, False, False, False]]
    with pytest.raises(ValueError, match="windows"):
        signals.Rechecks(windows=0)


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
    model, tokenizer = load_model(str(tiny_chat_model))
    return model, tokenizer, signals.SafetySignal.init(model.config, "linear", rng=jax.random.key(1))


def _batch(tokenizer, pairs):
    examples, _ = encode_records(tokenizer, [Record(prompt=p, response=r) for p, r in pairs], max_length=96)
    return {k: jnp.asarray(v) for k, v in pad_batch(examples, len(examples), (96,), tokenizer.pad_token_id).items()}


PAIRS = [("How do I pick a lock?", "I can't help with that, since picking a lock you do not own is a crime."),
         ("Write a haiku about the sea.",
          "Waves fold into foam,\nsalt wind carries gulls away,\nthe tide keeps its time.")]


@pytest.mark.slow
def test_each_view_equals_an_explicit_forward_and_leaves_the_rows_as_they_were(chat):
    model, tokenizer, signal = chat
    batch = _batch(tokenizer, PAIRS)
    rechecks = signals.Rechecks(r1=3, r2=4, windows=3)
    args = (model, signal, batch["input_ids"], batch["attention_mask"], batch["roles"])
    out, logit, view_logits, used = signals.forward_views(*args, rechecks)
    plain, plain_logit = signals.forward(*args)
    np.testing.assert_allclose(np.asarray(logit), np.asarray(plain_logit), atol=1e-5)
    real = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(np.asarray(out.hidden[:, 1:])[real], np.asarray(plain.hidden[:, 1:])[real], atol=1e-5)
    assert np.asarray(used).all()
    ids, attn, roles = signals.prepend_cls(batch["input_ids"], batch["attention_mask"], batch["roles"])
    sees, _ = signals.views(attn, roles, rechecks)
    base = np.asarray(signals.mask(attn, roles, "sft"))
    for row in range(len(PAIRS)):
        n = int(attn[row].sum())
        answer = np.flatnonzero(np.asarray(roles[row]) == R)
        for v in range(rechecks.count):
            window = np.asarray(sees[row, v, :n])
            if v == 0:  # what rule 1 reads, counted by hand: the query and the first r1 answer tokens
                expected = np.isin(np.asarray(roles[row, :n]), (U, Role.SYSTEM))
                expected[answer[: rechecks.r1]] = True
            else:  # rule 2: r2 answer tokens up to ceil(v * answer / windows)
                end = -(-v * len(answer) // rechecks.windows)
                expected = np.zeros(n, bool)
                expected[answer[max(end - rechecks.r2, 0) : end]] = True
            np.testing.assert_array_equal(window, expected)
            # the row up to its last real token, then one [CLS] at position 0 seeing the window and itself
            full = jnp.concatenate([ids[row : row + 1, :n], jnp.zeros((1, 1), jnp.int32)], axis=1)
            m = np.zeros((n + 1, n + 1), bool)
            m[:n, :n] = base[row, :n, :n]
            m[n, :n], m[n, n] = window, True
            positions = jnp.asarray(np.concatenate([np.arange(n), [0]])[None])
            embeddings = model.embed(full).at[:, 0].set(signal.params["cls"]).at[:, -1].set(signal.params["cls"])
            alone = model.forward(full, mask=jnp.asarray(m[None]), positions=positions, embeddings=embeddings)
            expected_logit = signals.head_logit(signal, alone.hidden[0, -1])
            np.testing.assert_allclose(float(view_logits[row, v]), float(expected_logit), atol=1e-5)


@pytest.mark.slow
def test_a_rule_2_view_is_what_the_decoding_checks_at_that_step(chat):
    """Trained and deployed alike: a row of the prompt and the answer's first ``step`` generated
    tokens, its one rule-2 view (r2 tokens up to the answer's end) gives the p the decoding's
    recheck at ``step`` gave."""
    model, tokenizer, signal = chat
    r2, new, step = 3, 8, 6
    encoded = encode_prompt(tokenizer, PAIRS[1][0])
    ids, attn, state = signals.decode_inputs(signal, [encoded], batch_size=1, bucket=1, pad_id=0, max_new_tokens=new,
                                             refusal_ids=jnp.asarray([5], jnp.int32),
                                             rules=signals.Rules(threshold=2.0, r2=r2))
    graphdef, params = nnx.split(model)
    tokens, final = generate_tokens(graphdef, params, ids, attn, jax.random.key(0), jnp.float32(1e-6), jnp.int32(0),
                                    jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0), state,
                                    max_new_tokens=new, sample=False, policy=signals.StrategicDecoding(signal.head),
                                    return_policy_state=True)
    row_ids = jnp.concatenate([jnp.asarray(encoded.ids[None]), tokens[:, :step]], axis=1)
    row_roles = jnp.concatenate([jnp.asarray(encoded.roles[None], jnp.int32), jnp.full((1, step), int(R))], axis=1)
    _, _, view_logits, used = signals.forward_views(model, signal, row_ids, jnp.ones_like(row_ids), row_roles,
                                                    signals.Rechecks(r2=r2, windows=1))
    assert bool(used[0, 1])
    np.testing.assert_allclose(float(jax.nn.sigmoid(view_logits[0, 1])), float(final.checks[0, step]), atol=1e-5)


def test_the_loss_takes_every_used_view_with_its_label(chat):
    model, tokenizer, signal = chat
    batch = _batch(tokenizer, PAIRS)
    batch["label"] = jnp.asarray([1, 0], jnp.int32)
    batch["answer_label"] = jnp.asarray([0, 1], jnp.int32)
    loss = signals.SignalLoss(lam=0.1, rechecks=signals.Rechecks(r1=3, r2=4, windows=3))
    assert dict(loss.weights) == {"nll": 1.0, "cls": 0.1, "cls_accuracy": 0.0, "recheck": 0.1,
                                  "recheck_accuracy": 0.0}
    counts, sums = loss.counts(batch), loss.sums(model, batch, signal=signal.params)
    assert float(counts["recheck"]) == 8 and float(counts["cls"]) == 2
    _, _, view_logits, _ = signals.forward_views(model, signal, batch["input_ids"], batch["attention_mask"],
                                                 batch["roles"], loss.rechecks)
    labels = np.asarray([[1, 0, 0, 0], [0, 1, 1, 1]], np.float32)  # rule 1: the row's label; windows: the answer's
    z = np.asarray(view_logits, np.float64)
    bce = np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))
    np.testing.assert_allclose(float(sums["recheck"]), bce.sum(), rtol=1e-5)
    plain = signals.SignalLoss(lam=0.1)
    assert "recheck" not in dict(plain.weights)
    np.testing.assert_allclose(float(plain.sums(model, batch, signal=signal.params)["nll"]), float(sums["nll"]),
                               rtol=1e-5)


def test_the_cls_only_loss_leaves_the_model_without_gradient(chat):
    """Signal pre-training on harmful text: [CLS] reads every token (the pretrain mask), and with
    lm=False nothing flows back into the model, not even through the keys and values [CLS]
    attends to; with the LM loss, or under the same mask with lm=True, it does."""
    model, tokenizer, signal = chat
    batch = _batch(tokenizer, PAIRS)
    batch["label"] = jnp.asarray([1, 0], jnp.int32)

    def grads(loss):
        def value(model, params):
            sums, counts = loss.sums(model, batch, signal=params), loss.counts(batch)
            return sum(w * sums[t] / jnp.maximum(counts[t], 1.0) for t, w in loss.weights if w)

        return nnx.grad(value, argnums=(0, 1))(model, signal.params)

    model_grads, signal_grads = grads(signals.SignalLoss(phase="pretrain", lm=False))
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(model_grads))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(signal_grads))
    assert dict(signals.SignalLoss(lm=False).weights)["nll"] == 0.0
    # the classifier's term alone, with lm=True: [CLS]'s reading of the text reaches the model
    cls_alone = signals.SignalLoss(phase="pretrain", lam=1.0)
    model_grads, _ = nnx.grad(lambda m, p: cls_alone.sums(m, batch, signal=p)["cls"], argnums=(0, 1))(
        model, signal.params)
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(model_grads)) > 0
