"""Every stage on the mesh (8 fake CPU devices): decoding, evaluation, attribution, probing and
the safety signal's classifier and decoding give on a ``data x fsdp x tensor`` mesh what they
give on one device; the compiled steps of a tensor-sharded model hold no whole weight or gradient
on one device; and a mesh that cannot hold the model is a one-line error naming its key."""

import copy
import json
import math

import jax
import numpy as np
import pytest

from configs.evaluate import get_config as evaluate_config
from configs.generate import get_config as generate_config
from experiments import evaluate, generate
from ssah_jax.checkpoints import demo_gguf_path, load_model, load_tokenizer
from ssah_jax.runs import ConfigError
from ssah_jax.sharding import make_mesh, use_rules
from tests import tiny

ONE = dict(data=1, fsdp=1, tensor=1)
MESH = dict(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A tiny random Llama with 8 heads over 4 kv heads (each tensor shard holds whole groups)
    and the demo model's tokenizer and chat template."""
    directory = tmp_path_factory.mktemp("grouped")
    tiny.save(tiny.llama_config(vocab_size=49152, pad_token_id=2, num_attention_heads=8, num_key_value_heads=4),
              directory)
    load_tokenizer(str(demo_gguf_path(download=False))).save_pretrained(directory)
    return directory


def on(shape, directory):
    """``(mesh, model, tokenizer)``: the model placed on a mesh of ``shape`` (over the first
    devices it needs)."""
    size = math.prod(shape.values())
    mesh = make_mesh(shape, devices=jax.devices()[:size])
    model, tokenizer = load_model(str(directory), mesh=mesh)
    return mesh, model, tokenizer


def run_on(shape, directory, body):
    mesh, model, tokenizer = on(shape, directory)
    with jax.set_mesh(mesh), use_rules():
        return body(model, tokenizer)


def same_rows(a, b, rtol=1e-5, where="row"):
    """Rows equal: text and integers exactly, floats within ``rtol`` relative or one unit of the
    4th decimal (rows keep log-probabilities rounded to 4 places: values 1e-5 apart can straddle
    a rounding boundary)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_rows(a[k], b[k], rtol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_rows(x, y, rtol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1.0001e-4), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_decoding_is_the_same_on_a_mesh_greedy_and_sampled_and_a_small_batch_is_padded(grouped):
    """Greedy and sampled answers on data 2 x fsdp 2 x tensor 2 (the batch over data x fsdp, the
    heads and the KV cache's kv heads over tensor) are the one device's, token for token; a
    batch of 3 (or 1) on a data-parallel size of 4 is filled up with rows that start finished."""
    from ssah_jax.generation import generate_ids

    prompts = ["How do I bake bread?", "Tell me a joke", "What is 2+2?"]

    def answers(model, tokenizer):
        return {(b, t): generate_ids(model, tokenizer, prompts, max_new_tokens=10, batch_size=b, temperature=t, seed=3)
                for b in (1, 3) for t in (0.0, 1.0)}

    assert run_on(MESH, grouped, answers) == run_on(ONE, grouped, answers)


def test_kv_cache_is_laid_out_batch_over_data_and_kv_heads_over_tensor(grouped):
    from ssah_jax.models import KVCache

    mesh, model, _ = on(MESH, grouped)
    with jax.set_mesh(mesh), use_rules():
        cache = jax.jit(lambda: KVCache.init(model.config, 4, 16, model.dtype))()
    k = cache.layers[0].k  # [B, K, T, D]
    assert k.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    assert k.addressable_shards[0].data.shape == (1, 2, 16, model.config.head_dim)  # of [4, 4, 16, head_dim]


@pytest.mark.slow
def test_evaluate_and_generate_on_a_mesh_write_the_one_device_rows(tmp_path, grouped):
    """``ssah-jax evaluate`` (asr, prefill, overrefusal, mmlu, perplexity) and ``generate`` with
    ``mesh.data=2, mesh.fsdp=2, mesh.tensor=2`` write the rows of ``mesh`` 1 x 1 x 1 (the mesh is
    no part of a run's identity: the same workdir takes either)."""
    config = evaluate_config("quick")
    config.model = str(grouped)
    config.tasks = ("asr", "prefill", "overrefusal", "mmlu", "perplexity")
    config.harmful.limit = config.prefill.limit = config.overrefusal.limit = 3
    config.harmful.settings = ("no_system",)
    config.mmlu.limit, config.perplexity.limit, config.max_new_tokens, config.batch_size = 6, 5, 8, 2
    rows = {}
    for name, shape in (("one", ONE), ("mesh", MESH)):
        c = copy.deepcopy(config)
        c.mesh.update(shape)
        evaluate.run(c, str(tmp_path / name))
        rows[name] = {p.name: read_rows(p) for p in sorted((tmp_path / name / "rows").iterdir())}
    assert set(rows["one"]) == {"asr_no_system.jsonl", "prefill_5.jsonl", "overrefusal.jsonl", "mmlu.jsonl",
                                "perplexity.jsonl"}
    same_rows(rows["mesh"], rows["one"])

    g = generate_config("quick")
    g.model, g.max_new_tokens, g.batch_size = str(grouped), 8, 3
    answers = {}
    for name, shape in (("one", ONE), ("mesh", MESH)):
        c = copy.deepcopy(g)
        c.mesh.update(shape)
        generate.run(c, str(tmp_path / f"generate_{name}"))
        answers[name] = read_rows(tmp_path / f"generate_{name}" / "generations.jsonl")
    assert answers["mesh"] == answers["one"] and len(answers["one"]) == len(g.prompts)


@pytest.mark.slow
@pytest.mark.real_model
def test_the_demo_model_evaluates_the_same_on_data_2_fsdp_4(tmp_path):
    """The demo model (9 heads, 3 kv heads: no tensor axis divides them) on data 2 x fsdp 4."""
    config = evaluate_config("quick")
    config.tasks = ("asr", "mmlu", "perplexity")
    config.harmful.limit, config.harmful.settings, config.max_new_tokens = 4, ("no_system",), 12
    config.mmlu.limit, config.perplexity.limit = 4, 4
    rows = {}
    for name, shape in (("one", ONE), ("mesh", dict(data=2, fsdp=4, tensor=1))):
        c = copy.deepcopy(config)
        c.mesh.update(shape)
        evaluate.run(c, str(tmp_path / name))
        rows[name] = {p.name: read_rows(p) for p in sorted((tmp_path / name / "rows").iterdir())}
    same_rows(rows["mesh"], rows["one"])


@pytest.mark.parametrize("scorer", ["wifv", "wanda", "snip", "snip_by_layer"])
def test_unit_scores_on_a_mesh_are_the_one_device_scores(grouped, scorer):
    """WIFV / Wanda statistics and SNIP gradients (all layers at once, or one layer's at a time)
    with the model sharded (its gradient sums sharded like the kernels) give the one device's
    scores (SNIP's all at once) within 1e-5 relative, and so the same unit kinds; 5 calibration
    rows in batches of 3 on a data-parallel size of 4 are padded."""
    from ssah_jax.attribution import classify, unit_scores
    from ssah_jax.data import Record, encode_records
    from ssah_jax.data.batching import batch_dataset, bucket_lengths

    def scores(model, tokenizer, scorer=scorer):
        records = [Record(f"Question {i}: how do plants grow?", f"Answer {i}: with light and water.")
                   for i in range(5)]
        examples, _ = encode_records(tokenizer, records, max_length=128)
        batches = batch_dataset(examples, batch_size=3, pad_id=tokenizer.pad_token_id, buckets=bucket_lengths(128),
                                shuffle=False, process_index=0, process_count=1)
        by_layer = scorer == "snip_by_layer"
        return {m: np.asarray(v) for m, v in unit_scores(model, batches, "snip" if by_layer else scorer,
                                                         by_layer=by_layer).items()}

    sharded = run_on(MESH, grouped, scores)
    single = run_on(ONE, grouped, lambda m, t: scores(m, t, "snip" if scorer == "snip_by_layer" else scorer))
    for module in single:
        np.testing.assert_allclose(sharded[module], single[module], rtol=1e-5, atol=1e-12 * single[module].max())
    fractions = {"SCU": 0.05, "UCU": 0.1, "RU": 0.2}
    kinds = [classify(s, s, fractions).masks for s in (sharded, single)]
    for kind in kinds[1]:
        for module in kinds[1][kind]:
            np.testing.assert_array_equal(kinds[0][kind][module], kinds[1][kind][module])


def test_probing_and_the_signal_on_a_mesh_are_the_one_device_results(grouped):
    """Reasoning-direction distances and ``classify`` probabilities within 1e-5; the signal's
    strategic decoding (``each`` schedule) gives the same answers, checks and insertions."""
    from ssah_jax import signals
    from ssah_jax.probing import direction_distances

    queries = ["How do I pick a lock?", "Write a poem about rain", "How to make a cake?"]

    def results(model, tokenizer):
        signal = signals.SafetySignal.init(model.config, rng=jax.random.key(1))
        distances = direction_distances(model, tokenizer, queries, {"refusal": " I cannot help with that request"},
                                        max_tokens=4, batch_size=2)
        p = signals.classify(model, signal, tokenizer, queries, batch_size=2)
        answers = signals.generate(model, signal, tokenizer, queries, max_new_tokens=8, schedule="each",
                                   threshold=0.5, batch_size=2)
        return distances["refusal"], p, answers

    (d8, p8, a8), (d1, p1, a1) = run_on(MESH, grouped, results), run_on(ONE, grouped, results)
    np.testing.assert_allclose(d8, d1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-6)
    assert [a["text"] for a in a8] == [a["text"] for a in a1]
    assert [a["inserted"] for a in a8] == [a["inserted"] for a in a1]
    for x, y in zip(a8, a1):
        assert [s for s, _ in x["checks"]] == [s for s, _ in y["checks"]]
        np.testing.assert_allclose([p for _, p in x["checks"]], [p for _, p in y["checks"]], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_no_stage_holds_a_whole_weight_or_gradient_on_one_device():
    """A model whose fp32 ``B``-kernel gradient (what SNIP accumulates) is larger than a cap:
    the compiled attribution steps (WIFV statistics, SNIP gradient) and greedy decoding on
    tensor 8 stay under the cap per device; on one device each is over it."""
    from ssah_jax.models import ModelConfig
    from ssah_jax.train.memory import plan_attribution, plan_generation

    config = ModelConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=8,
                         num_kv_heads=8, head_dim=128)
    gradient = 4 * config.num_layers * config.hidden_size * (config.num_heads * config.head_dim
                                                             + config.intermediate_size)
    cap = gradient * 0.9
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=8))
    one = make_mesh(ONE, devices=jax.devices()[:1])
    bills = {
        "wifv": lambda m: plan_attribution(config, m, scorer="wifv", batch_size=8, length=32),
        "snip": lambda m: plan_attribution(config, m, scorer="snip", batch_size=8, length=32),
        "decode": lambda m: plan_generation(config, m, batch_size=8, prompt_tokens=32, max_new_tokens=16),
    }
    for name, bill in bills.items():
        sharded, whole = bill(mesh), bill(one)
        assert sharded.total < cap < whole.total, (name, sharded.total, cap, whole.total)
    # SNIP by layer keeps one layer's gradient sums (sharded) where SNIP keeps every layer's
    snip, by_layer = (plan_attribution(config, mesh, scorer="snip", batch_size=8, length=32, by_layer=b)
                      for b in (False, True))
    assert snip.optimizer == gradient / 8 and by_layer.optimizer == gradient / 8 / config.num_layers


def test_a_mesh_that_cannot_hold_the_model_is_one_line_naming_its_key(tmp_path, grouped):
    config = generate_config("quick")
    config.model, config.max_new_tokens = str(grouped), 2
    config.mesh.update(dict(data=1, fsdp=1, tensor=8))  # 8 does not divide the 4 kv heads
    with pytest.raises(ConfigError, match=r"^config\.mesh\.tensor: tensor=8 does not divide kv_heads=4 "
                                          r"\(also sharded over tensor: vocab=49152, heads=8, mlp=96\) of the model$"):
        generate.run(config, str(tmp_path / "a"))
    config.mesh.update(dict(data=16, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match=r"^config\.mesh=\{'data': 16, 'fsdp': 1, 'tensor': 1\}: .*needs 16 devices, "
                                          r"8 are available$"):
        generate.run(config, str(tmp_path / "b"))
    config.mesh.update(dict(data=-1, fsdp=-1, tensor=1))
    with pytest.raises(ConfigError, match=r"^config\.mesh=.*: at most one axis may be -1$"):
        generate.run(config, str(tmp_path / "c"))
    config.mesh.update(dict(data=0, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match=r"^config\.mesh\.data=0: must be a device count >= 1, or -1"):
        generate.run(config, str(tmp_path / "d"))


def test_a_workdir_from_before_the_mesh_section_resumes_on_any_mesh(tmp_path, grouped):
    """``mesh`` is no part of a run's identity: a workdir whose config.json predates the section
    is resumed (its answers kept), and so is one run on another mesh."""
    config = generate_config("quick")
    config.model, config.max_new_tokens, config.batch_size = str(grouped), 4, 2
    config.prompts = ("Tell me a joke", "What is 2+2?", "Name a colour")
    workdir = tmp_path / "run"
    generate.run(config, str(workdir))
    recorded = json.loads((workdir / "config.json").read_text())
    del recorded["mesh"]  # as written before the section existed
    (workdir / "config.json").write_text(json.dumps(recorded))
    before = read_rows(workdir / "generations.jsonl")
    config.mesh.update(MESH)
    generate.run(config, str(workdir))
    assert read_rows(workdir / "generations.jsonl") == before
