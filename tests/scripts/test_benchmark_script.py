"""scripts/benchmark.py's measuring helpers (the benchmarks themselves are not tests)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ssah_jax.checkpoints import load_weights
from tests import tiny


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).parents[2] / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_profile_names_the_xla_ops_that_ran_and_nothing_else(bench_script):
    x = jnp.ones((128, 128))
    f = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
    f(x).block_until_ready()
    ops = bench_script.op_profile(lambda: f(x).block_until_ready())
    kinds = [kind for kind, _, _ in ops]
    # Every kind is an instruction of the compiled module (no runtime spans, no Python frames),
    # and the product, the largest op, is there.
    hlo = f.lower(x).compile().as_text()
    assert kinds and all(f"%{kind}" in hlo for kind in kinds), kinds
    assert any("dot" in kind or "ynn" in kind or "xnn" in kind for kind in kinds), kinds
    assert all(seconds >= 0 and count >= 1 for _, seconds, count in ops)
    lines = bench_script.summary({"benchmark": "train", "ours_step_s": 1.0, "ours_first_step_s": 2.0,
                               "transformers_step_s": 1.0, "torch_threads": 2, "speedup": 1.0, "batch": 1,
                               "length": 8, "dtype": "float32", "machine": "m", "ours_op_profile": ops})
    assert any("top XLA ops" in line for line in lines) and any(kinds[0] in line for line in lines)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_floor_multiplies_every_matrix_once(bench_script, tmp_path, tied):
    model = load_weights(tiny.save(tiny.llama_config(tie_word_embeddings=tied), tmp_path / "hf"))
    result = bench_script.matmul_floor(model, batch=2, repeats=1)
    # 7 projections per layer and the LM head (the embedding table when tied); the untied
    # input embedding is a lookup, not a product.
    assert result["matrices"] == 7 * model.config.num_layers + 1
    assert result["matmul_floor_ms_per_step"] > 0


@pytest.mark.slow
def test_signals_benchmark_runs_every_schedule_against_plain_decoding(bench_script):
    import argparse

    args = argparse.Namespace(batch=2, new_tokens=3, repeats=1, dtype="float32")
    result = bench_script.bench_signals(args)
    assert set(result["tokens_per_s"]) == {"plain", "each", "first", "periodic", "annealing"}
    assert result["time_vs_plain"]["plain"] == 1.0
    assert len(bench_script.summary(result)) == 6


@pytest.mark.slow
def test_mfu_benchmark_counts_the_flops_xla_counts(bench_script):
    """The model FLOPs per trained token (6 per matrix weight + PaLM's attention term) are
    within 15% of what XLA counts in the compiled train step (which adds the elementwise ops);
    MFU is achieved / peak; decoding is set against its bandwidth floor."""
    import argparse

    rows = jax.device_count()  # FSDP over every device (8 fake CPU devices in the suite)
    # XLA counts a scan's body once: its count is comparable for the unrolled step only.
    args = argparse.Namespace(size="tiny", batch=rows, length=64, repeats=1, decode_batch=rows, new_tokens=4,
                              peak_tflops=2.0, layout="unrolled", remat="none")
    result = bench_script.bench_mfu(args)
    assert 1.0 <= result["xla_flops_per_token"] / result["model_flops_per_token"] <= 1.15
    assert result["mfu"] == pytest.approx(result["achieved_tflops_per_device"] / 2.0)
    assert result["achieved_tflops_per_device"] == pytest.approx(
        result["model_flops_per_token"] * result["train_tokens_per_s"] / result["devices"] / 1e12)
    assert 0 < result["decode_fraction_of_floor"] and len(bench_script.summary(result)) == 4
    # 16 layers of Llama-3.2-1B's shape: 1.24e9 weights, 6 FLOPs each, plus attention at 2048 tokens
    config = __import__("ssah_jax.models", fromlist=["ModelConfig"]).ModelConfig(**bench_script.MFU_SIZES["1b"])
    assert bench_script.train_flops_per_token(config, 2048) == pytest.approx(6 * 1.2358e9 + 12 * 16 * 2048 * 2048,
                                                                             rel=1e-3)


def test_a_decode_step_excludes_the_prefill(bench_script):
    # 8 tokens in 1.5 s, one token (the prefill and its first token) in 0.8 s: 0.1 s per step
    assert bench_script._per_step(1.5, 0.8, 8) == pytest.approx(0.1)
    assert bench_script._per_step(0.8, 0.8, 1) == 0.8  # one token: no decode step to isolate


def test_decode_benchmark_runs_on_a_mesh_and_its_bandwidth_is_maxtexts(bench_script):
    """``decode --mesh`` on fake CPU devices: a batch of 6 on a data-parallel size of 4 is filled
    up to 8 rows; the bandwidth figure is (weights + cache) / devices / step time."""
    import argparse

    # tensor 4: (6 GB + 2 GB) / 4 devices / 10 ms; data 2 x tensor 2: 6 GB / 2 + 2 GB / 4 per 10 ms
    assert bench_script.decode_bandwidth(6e9, 2e9, {"data": 1, "fsdp": 1, "tensor": 4}, 0.01) == 2e11
    assert bench_script.decode_bandwidth(6e9, 2e9, {"data": 2, "fsdp": 1, "tensor": 2}, 0.01) == 3.5e11
    assert bench_script.parse_mesh("data=2, tensor=4") == {"data": 2, "tensor": 4}
    with pytest.raises(SystemExit, match="--mesh='data2': expected axis=size pairs"):
        bench_script.parse_mesh("data2")
    args = argparse.Namespace(size="tiny", mesh="data=2,fsdp=2,tensor=2", decode_batch=6, new_tokens=3, repeats=1,
                              hbm_gb_s=100.0)
    result = bench_script.bench_decode(args)
    config = bench_script.MFU_SIZES["tiny"]
    assert result["devices"] == 8 and result["rows"] == 8
    slots = 8 * config["num_kv_heads"] * (64 + 3) * config["head_dim"]  # rows x kv heads x length x head_dim
    assert result["cache_bytes"] == 2 * config["num_layers"] * slots * 2  # keys and values, bf16
    expected = (result["weight_bytes"] / 2 + result["cache_bytes"] / 8) / result["step_s"]
    assert result["bandwidth_per_device_gb_s"] == pytest.approx(expected / 1e9)
    assert result["fraction_of_hbm"] == pytest.approx(expected / 100e9)
    assert result["tokens_per_s_per_device"] == pytest.approx(6 / result["step_s"] / 8)
    args.mesh = "tensor=8"  # 8 does not divide the 4 heads (nor the 2 kv heads)
    with pytest.raises(SystemExit, match="tensor=8 does not divide heads=4"):
        bench_script.bench_decode(args)


def test_the_gcg_summary_says_what_was_compared(bench_script):
    lines = bench_script.summary({
        "benchmark": "gcg", "ours_step_s": 2.0, "ours_first_step_s": 50.0, "torch_step_s": 4.0, "speedup": 2.0,
        "torch_threads": 2, "search_width": 64, "topk": 256, "suffix_tokens": 20, "prompt_tokens": 40,
        "target_tokens": 10, "chunk": 64, "dtype": "float32", "machine": "m"})
    assert lines[2].startswith("ratio:     2.00x  (torch time / ours; search width 64, top-k 256, a 20-token suffix")
