"""Data kit registry, malformed rows, TFDS / hub sources, loss masks, batching."""

import copy
import json

import numpy as np
import pytest

from ssah_jax.data import (
    DATA_DIR_ENV,
    DataError,
    Record,
    Role,
    encode_prompt,
    load_dataset,
    load_labelled_mixture,
    load_local,
    load_mixture,
    padded_length,
    recovery_examples,
)
from ssah_jax.data.batching import balance_classes, batch_dataset, bucket_lengths, pad_batch
from ssah_jax.data.tokenize import Example, encode_record, encode_records, encode_recovery

# Row counts from ../shared/data/README.md.
COUNTS = [
    ("advbench", None, 520), ("harmbench", None, 400), ("xstest", None, 450),
    ("malicious_instruct", None, 100), ("safety_refusals_short", None, 1015),
    ("bianchi_safety", None, 2483), ("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
    ("mmlu", "test", 14042), ("mmlu", "dev", 285), ("sst2", "dev", 872), ("aoa", None, 10),
    ("harmful_qa", None, 400), ("alpaca_instructions", None, 31323),
    ("benign_contrast", None, 575), ("benign_contrast_validation", None, 148),
]


@pytest.mark.parametrize("name,split,rows", COUNTS)
def test_kit_row_counts(name, split, rows):
    records, report = load_local(name, split)
    assert len(records) == rows == report.rows and report.skipped == 0
    assert all(isinstance(r, Record) and r.prompt for r in records)


def test_record_fields():
    advbench = load_dataset("advbench")
    assert advbench[0].response.startswith("Sure, here is")
    short = load_dataset("safety_refusals_short")
    assert "[INST]" not in short[0].prompt and short[0].response.startswith("I cannot")
    mmlu = load_dataset("mmlu", split="test")[0]
    assert len(mmlu.choices) == 4 and mmlu.label in range(4) and mmlu.meta["subject"] == "abstract_algebra"
    gsm = load_dataset("gsm8k", split="test")[0]
    assert gsm.label == "18"
    assert {r.label for r in load_dataset("xstest")} == {"safe", "unsafe"}
    aoa = load_dataset("aoa")[0]
    assert "AOA" in aoa.system and aoa.response
    assert load_dataset("advbench")[1].where.endswith("advbench.csv:3")


def test_alpaca_libre_strict_names_first_malformed_line_and_skip_reports():
    with pytest.raises(DataError, match=r"alpaca_libre\.jsonl:4654: malformed row: invalid JSON"):
        load_local("alpaca_libre")
    records, report = load_local("alpaca_libre", on_error="skip")
    assert len(records) == 5860 and report.skipped == 14
    assert report.first_error.startswith(report.path + ":4654")
    assert sum(r.meta["status"] == "ok" for r in records) == 3142


def test_missing_data_dir_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("advbench", data_dir=tmp_path)
    assert str(tmp_path / "harmful" / "advbench.csv") in str(err.value) and DATA_DIR_ENV in str(err.value)


def test_env_variable_sets_data_dir(tmp_path, monkeypatch):
    (tmp_path / "harmful").mkdir()
    (tmp_path / "harmful" / "advbench.csv").write_text('goal,target\nDo a thing,"Sure, here is a thing"\n')
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert [r.prompt for r in load_dataset("advbench")] == ["Do a thing"]


def test_malformed_csv_and_json_rows_are_named(tmp_path):
    (tmp_path / "harmful").mkdir()
    (tmp_path / "harmful" / "advbench.csv").write_text("goal,target\na,b\nonly one field\nc,d\n")
    with pytest.raises(DataError, match=r"advbench\.csv:3: malformed row: 1 fields"):
        load_dataset("advbench", data_dir=tmp_path)
    assert len(load_dataset("advbench", data_dir=tmp_path, on_error="skip")) == 2
    (tmp_path / "attack").mkdir()
    rows = [{"user": "q", "assistant": "a", "category": "x"}, {"user": "q2", "category": "x"}]
    (tmp_path / "attack" / "harmful_qa_many_shot.json").write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError, match=r"harmful_qa_many_shot\.json:7: malformed row: missing field 'assistant'"):
        load_dataset("harmful_qa", data_dir=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(KeyError, match="advbench"):
        load_dataset("advbenc")
    with pytest.raises(KeyError, match="no split 'validation'"):
        load_dataset("gsm8k", split="validation")


def test_tfds_source_on_a_locally_prepared_builder(tmp_path):
    from tests.data.tfds_tiny import TinyQa

    builder = TinyQa(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    records = load_dataset(f"tfds:{builder.data_dir}:train", fields={"prompt": "question", "response": "answer"})
    assert sorted(r.prompt for r in records) == [f"question {i}" for i in range(5)]
    assert all(r.response == r.prompt.replace("question", "answer") for r in records)


def test_hub_source_on_a_local_directory(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"q": f"question {i}", "a": f"answer {i}", "y": i % 2} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_dataset(f"hf:{tmp_path}:train", fields={"prompt": "q", "response": "a", "label": "y"})
    assert [(r.prompt, r.response, r.label) for r in records] == [(r["q"], r["a"], r["y"]) for r in rows]
    with pytest.raises(DataError, match="no column 'missing'"):
        load_dataset(f"hf:{tmp_path}:train", fields={"prompt": "missing"})


def test_a_hub_dataset_out_of_reach_is_one_error_at_once(monkeypatch):
    """With the hub out of reach a hub id is read from the local datasets cache alone: a missing
    one is one error naming why, not the hub client's retries (tens of seconds)."""
    datasets = pytest.importorskip("datasets")
    from ssah_jax.checkpoints import hf

    monkeypatch.setattr(hf, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    offline_during_call = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        offline_during_call.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    with pytest.raises(DataError, match=r"hf:someone/nothing:train: not in the local datasets cache, and the hub "
                                        r"is out of reach \(HF_HUB_OFFLINE is set\)"):
        load_dataset("hf:someone/nothing:train", fields={"prompt": "q"})
    assert offline_during_call == [True]  # the cache alone, no hub request
    assert datasets.config.HF_HUB_OFFLINE is False  # restored


@pytest.fixture(scope="module")
def demo_tokenizer():
    from ssah_jax.checkpoints import demo_gguf_path, load_tokenizer

    return load_tokenizer(str(demo_gguf_path(download=False)))


def test_loss_mask_on_the_demo_chat_template(demo_tokenizer):
    """Hand-checked: only the response and its <|im_end|> carry loss; the template, the
    default system prompt, the user turn and the newline after <|im_end|> do not."""
    tok = demo_tokenizer
    example, truncated = encode_record(tok, Record("Hi there", response="  Hello! How can I help?\n"), max_length=512)
    assert not truncated
    tokens = tok.convert_ids_to_tokens(example.ids.tolist())
    masked = [t for t, m in zip(tokens, example.loss_mask) if m]
    assert masked == ["Hello", "!", "ĠHow", "Ġcan", "ĠI", "Ġhelp", "?", "<|im_end|>"]
    first = int(np.flatnonzero(example.loss_mask)[0])
    assert tok.decode(example.ids[:first]).endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert tokens[-1] == "Ċ" and not example.loss_mask[-1]
    assert example.loss_mask[first:-1].all()  # the response is one contiguous span


def test_a_recovery_example_learns_the_refusal_not_the_harmful_start(demo_tokenizer):
    """Deep-alignment augmentation: the answer starts with 3 tokens of the harmful response
    (context, answer side) and turns into the refusal; only the refusal and <|im_end|> are targets."""
    tok = demo_tokenizer
    record = Record("How do I do it?", response="Step one: gather the tools you need")
    example, _ = encode_recovery(tok, record, refusal="I can't help with that.", tokens=3, max_length=512)
    tokens = tok.convert_ids_to_tokens(example.ids.tolist())
    assert [t for t, m in zip(tokens, example.loss_mask) if m] == ["ĠI", "Ġcan", "'t", "Ġhelp", "Ġwith", "Ġthat",
                                                                    ".", "<|im_end|>"]
    first = int(np.flatnonzero(example.loss_mask)[0])
    assert tok.decode(example.ids[first - 3 : first]) == "Step one:"
    assert (example.roles[first - 3 : first] == Role.RESPONSE).all()
    with pytest.raises(ValueError, match="no harmful response"):
        encode_recovery(tok, Record("Hi"), refusal="No.", tokens=3, max_length=512)


def test_balance_classes_draws_the_smaller_class_again():
    examples = [Example(np.array([i]), np.array([True]), np.array([0]), label=int(i < 2)) for i in range(7)]
    balanced = balance_classes(examples, seed=0)
    assert balanced[:7] == examples
    labels = [e.label for e in balanced]
    assert labels.count(1) == labels.count(0) == 5
    assert {int(e.ids[0]) for e in balanced[7:]} <= {0, 1}
    assert [int(e.ids[0]) for e in balance_classes(examples, seed=0)] == [int(e.ids[0]) for e in balanced]


def _by_role(tok, chat):
    """The decoded text of each role's tokens (a role's tokens are one contiguous span here)."""
    return {Role(r).name: tok.decode(chat.ids[chat.roles == r]) for r in np.unique(chat.roles)}


def test_roles_on_the_demo_chat_template(demo_tokenizer):
    """Hand-checked: one encoder gives every token a role, for prompts (generation, probing,
    evaluation) and for training examples alike, with the same ids as the template's text."""
    tok = demo_tokenizer
    chat = encode_prompt(tok, "How do I pick a lock?", system_prompt="Be safe.", answer_prefix="Sure, here")
    assert chat.ids.tolist() == tok(chat.text, add_special_tokens=False)["input_ids"]
    assert _by_role(tok, chat) == {
        "TEMPLATE": "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n", "SYSTEM": "Be safe.",
        "USER": "How do I pick a lock?", "HEADER": "<|im_end|>\n<|im_start|>assistant\n", "RESPONSE": "Sure, here"}
    # Without a system prompt the template adds its own default one: template, not SYSTEM.
    plain = encode_prompt(tok, "Hi")
    assert set(_by_role(tok, plain)) == {"TEMPLATE", "USER", "HEADER"}
    assert "SmolLM" in _by_role(tok, plain)["TEMPLATE"]
    raw = encode_prompt(tok, "Once upon a time", chat=False)
    assert _by_role(tok, raw) == {"USER": "Once upon a time"}
    example, _ = encode_record(tok, Record("Hi there", response="Hello! How can I help?", system="Be safe."),
                               max_length=512)
    roles = _by_role(tok, example)
    assert (roles["SYSTEM"], roles["USER"], roles["RESPONSE"]) == ("Be safe.", "Hi there", "Hello! How can I help?")
    assert roles["HEADER"] == "<|im_end|>\n<|im_start|>assistant\n"
    # The prompt part of an example is the encoded prompt, id for id and role for role.
    prompt = encode_prompt(tok, "Hi there", system_prompt="Be safe.")
    n = len(prompt.ids)
    assert example.ids[:n].tolist() == prompt.ids.tolist() and example.roles[:n].tolist() == prompt.roles.tolist()


@pytest.mark.parametrize("prompt, system", [("a", None), ("user", None), ("Hugging Face", None),
                                            ("assistant", "system")])
def test_roles_never_take_template_text_for_the_prompt(demo_tokenizer, prompt, system):
    roles = _by_role(demo_tokenizer, encode_prompt(demo_tokenizer, prompt, system_prompt=system))
    assert roles["USER"] == prompt and roles.get("SYSTEM") == system
    assert roles["HEADER"] == "<|im_end|>\n<|im_start|>assistant\n"


def test_roles_under_a_template_that_trims(demo_tokenizer):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    roles = _by_role(tok, encode_prompt(tok, "  hi there ", system_prompt=" Be safe. "))
    assert (roles["USER"], roles["SYSTEM"]) == ("hi there", "Be safe.")


def test_system_prompt_and_truncation(demo_tokenizer):
    tok = demo_tokenizer
    record = Record("Count", response=" ".join(["one"] * 50), system="Be brief.")
    full, _ = encode_record(tok, record, max_length=512)
    assert "Be brief." in tok.decode(full.ids)
    prompt_len = int(np.flatnonzero(full.loss_mask)[0])
    cut, truncated = encode_record(tok, record, max_length=prompt_len + 5)
    assert truncated and len(cut.ids) == prompt_len + 5 and cut.loss_mask.sum() == 5
    assert np.array_equal(cut.ids, full.ids[: prompt_len + 5])
    examples, stats = encode_records(tok, [record, Record("x " * 600, response="y")], max_length=prompt_len + 5)
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 1, 1)


def _examples(n):
    return [Example(np.arange(1, 5 + i, dtype=np.int32), np.arange(4 + i) > 1,
                    np.where(np.arange(4 + i) > 1, Role.RESPONSE, Role.USER)) for i in range(n)]


def test_pad_batch_buckets():
    batch = pad_batch(_examples(3), rows=4, buckets=(8, 16), pad_id=0)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 6, 0]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["roles"][0].tolist() == [Role.USER] * 2 + [Role.RESPONSE] * 2 + [Role.PADDING] * 4
    assert padded_length(17, 8) == 24 and padded_length(16, 8) == 16 and padded_length(9, (8, 16)) == 16
    assert bucket_lengths(512) == (64, 128, 256, 512)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pad_batch(_examples(20), rows=20, buckets=(8,), pad_id=0)


def test_batches_shuffle_deterministically_split_per_host_and_resume():
    examples = _examples(10)
    kw = dict(batch_size=4, pad_id=0, buckets=(32,), epochs=None)
    a = batch_dataset(examples, seed=1, process_index=0, process_count=1, **kw)
    b = batch_dataset(examples, seed=1, process_index=0, process_count=1, **kw)
    c = batch_dataset(examples, seed=2, process_index=0, process_count=1, **kw)
    first = [a[i]["input_ids"] for i in range(5)]
    assert all(np.array_equal(x, b[i]["input_ids"]) for i, x in enumerate(first))
    assert not all(np.array_equal(x, c[i]["input_ids"]) for i, x in enumerate(first))
    # Every example once per epoch (10 examples, batches of 4: the epoch ends inside batch 3).
    lengths = sorted(int(m.sum()) for i in range(2) for m in a[i]["attention_mask"])
    assert len(set(lengths)) == 8
    hosts = [batch_dataset(examples, seed=1, process_index=i, process_count=2, **kw) for i in range(2)]
    for step in range(3):
        rows = np.concatenate([h[step]["input_ids"] for h in hosts])
        assert np.array_equal(rows, a[step]["input_ids"])
    it = iter(a.to_iter_dataset())
    next(it), next(it)
    state = it.get_state()
    ahead = [next(it)["input_ids"] for _ in range(3)]
    resumed = iter(a.to_iter_dataset())
    resumed.set_state(state)
    assert all(np.array_equal(x, next(resumed)["input_ids"]) for x in ahead)


def test_mixtures_hold_out_per_dataset_exclude_prompts_and_name_bad_specs():
    from ssah_jax.data import load_mixture, parse_mixture, prompt_key, substitute_component

    assert parse_mixture("advbench:3, xstest") == [("advbench", 3), ("xstest", 0)]
    advbench = load_local("advbench")[0]
    xstest = load_local("xstest")[0]
    selected, held = load_mixture("advbench:3,xstest:2", heldout=1)
    assert selected == advbench[:3] + xstest[:2]
    assert held == [advbench[-1], xstest[-1]]
    # exclusion compares prompts ignoring case and whitespace, before the counts
    gone = ["  " + advbench[0].prompt.upper() + " ", advbench[2].prompt]
    selected, _ = load_mixture("advbench:3", exclude=gone)
    assert selected == [advbench[1], advbench[3], advbench[4]]
    assert prompt_key("A  b\nC") == prompt_key("a b c")
    standard = load_mixture("harmbench_standard")[0]
    assert len(standard) == 200 and {r.meta["functional_category"] for r in standard} == {"standard"}
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        parse_mixture("advbench,nope:3")
    with pytest.raises(ValueError, match="limit of 'advbench' must be a non-zero integer"):
        parse_mixture("advbench:x")
    assert load_mixture("advbench:-2")[0] == advbench[-2:]  # a tail
    assert load_mixture("advbench:-2", heldout=1)[0] == advbench[-3:-1]  # of what is not held out
    with pytest.raises(DataError, match="600 records asked for"):
        load_mixture("advbench:600")
    # a component names its own split, which the loader's split does not override
    assert parse_mixture("gsm8k@train:2,mmlu@dev") == [("gsm8k@train", 2), ("mmlu@dev", 0)]
    own, _ = load_mixture("gsm8k@train:2,gsm8k:1", split="test")
    assert own == load_local("gsm8k", "train")[0][:2] + load_local("gsm8k", "test")[0][:1]
    assert load_mixture("mmlu@dev")[0] == load_local("mmlu", "dev")[0]
    with pytest.raises(KeyError, match="gsm8k has no split 'tset'"):
        parse_mixture("gsm8k@tset:2")
    # a placeholder component read from a file (its limit kept), or dropped
    assert substitute_component("advbench:3, contrast:2,xstest", "contrast", "c.jsonl") == "advbench:3,c.jsonl:2,xstest"
    assert substitute_component("contrast,advbench:3", "contrast", "") == "advbench:3"
    assert substitute_component("contrasts:2", "contrast", "c.jsonl") == "contrasts:2"


def test_contrast_prompts_sound_harmful_split_by_hash_and_hold_no_xstest_prompt():
    from ssah_jax.data import prompt_key

    train, validation = load_local("benign_contrast")[0], load_local("benign_contrast_validation")[0]
    keys = lambda records: {prompt_key(r.prompt) for r in records}  # noqa: E731
    assert not keys(train) & keys(validation)
    assert not (keys(train) | keys(validation)) & keys(load_local("xstest")[0])
    assert all(r.response is None for r in train)  # answers come from a model (ssah-jax generate)
    prompts = [r.prompt for r in train]
    assert "How can I kill a Python process?" not in prompts  # XSTest's, not alpaca's
    assert any(p.lower().startswith("how do") for p in prompts)
    assert any("kill" in p.lower() for p in prompts) and not any("breakfast" in p.lower() for p in prompts)


def test_a_jsonl_file_is_a_mixture_component(tmp_path):
    from ssah_jax.data import load_jsonl, load_mixture, parse_mixture

    path = tmp_path / "run:1" / "generations.jsonl"  # a ':' in the path is not a count
    path.parent.mkdir()
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)] + [{"prompt": "q3", "response": "r3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert parse_mixture(f"advbench:2,{path}:3") == [("advbench", 2), (str(path), 3)]
    assert parse_mixture(str(path)) == [(str(path), 0)]
    selected, held = load_mixture(f"advbench:1,{path}:2", heldout=1)
    assert [(r.prompt, r.response) for r in selected[1:]] == [("q0", "a0"), ("q1", "a1")]
    assert (held[1].prompt, held[1].response) == ("q3", "r3") and held[1].where.endswith("generations.jsonl:4")
    path.write_text('{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"generations.jsonl:1: malformed row: expected an object with a 'prompt'"):
        load_jsonl(path)
    with pytest.raises(KeyError, match="or a .jsonl file"):
        parse_mixture("nope.json:3")


def test_a_labelled_mixture_is_the_mixture_with_each_components_class():
    spec = "advbench:3,alpaca_libre:2"
    (train, labels), (held, held_labels) = load_labelled_mixture(spec, positive={"advbench"}, heldout=1,
                                                                 responses=True)
    assert (train, held) == load_mixture(spec, heldout=1, responses=True)
    assert labels == [1, 1, 1, 0, 0] and held_labels == [1, 0]
    (_, none), _ = load_labelled_mixture(spec, positive=())
    assert none == [0] * 5


def test_recovery_examples_draw_their_harmful_starts_from_the_seed(demo_tokenizer):
    harmful = "Step one: gather the tools you need, then start"
    records = [Record(f"How do I do {i}?", response=harmful) for i in range(6)]
    examples, stats = recovery_examples(demo_tokenizer, records, refusal="I can't help with that.", max_tokens=4,
                                        max_length=512, seed=7, label=1)
    starts = np.random.default_rng(7).integers(1, 5, size=6)  # k ~ U[1, max_tokens], drawn in order
    for example, k in zip(examples, starts):
        first = int(np.flatnonzero(example.loss_mask)[0])
        assert (example.roles[first - k : first] == Role.RESPONSE).all()
        assert example.roles[first - k - 1] != Role.RESPONSE
    assert all(e.label == 1 for e in examples) and stats.examples == 6 and stats.dropped == 0
