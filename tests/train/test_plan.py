"""``ssah-jax plan``: the per-device memory bill of a compiled step from abstract weights; on fake
CPU devices it agrees with a measured step, and its advice makes a step that does not fit fit."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoConfig

from ssah_jax.models import CausalLM, Layout, ModelConfig
from ssah_jax.sharding import make_mesh, shard_batch, use_rules
from ssah_jax.train.memory import plan_generation, plan_train_step
from ssah_jax.train.setup import Freeze, setup_training
from ssah_jax.train.step import OptimizerConfig

ROOT = Path(__file__).resolve().parents[2]


def _rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("layout", [Layout(), Layout(scan=True, remat="full")], ids=["unrolled", "scan_full"])
def test_plan_of_a_train_step_agrees_with_a_measured_step(layout):
    # Big enough that the step's buffers (hundreds of MB over the 8 devices) dwarf the noise of RSS.
    config = ModelConfig.from_hf(AutoConfig.for_model(
        "llama", hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4,
        num_hidden_layers=4, vocab_size=32000))
    mesh = make_mesh({"fsdp": -1})
    batch_size, length = 8, 512
    bill = plan_train_step(config, mesh, batch_size=batch_size, length=length, layout=layout)

    with jax.set_mesh(mesh), use_rules():
        training = setup_training(CausalLM(config, layout=layout, rngs=nnx.Rngs(0)), mesh, Freeze(),
                                  OptimizerConfig())
        ids = np.random.default_rng(0).integers(0, 32000, (batch_size, length)).astype(np.int32)
        ones = np.ones_like(ids)
        batch = shard_batch({"input_ids": ids, "attention_mask": ones, "loss_mask": ones, "roles": ones,
                             "label": np.zeros(batch_size, np.int32)})
        step = training.step.lower(training.state, batch).compile()
        state = jax.block_until_ready(training.state)
        held = [sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards)
                for tree in (state.params, state.opt_state)]
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from here
        before = _rss("VmRSS")
        jax.block_until_ready(step(state, batch))
        during = _rss("VmHWM") - before
    devices = mesh.devices.size
    # What the state holds is exact; the rest is XLA's buffer assignment, measured as the peak.
    assert held[0] == bill.parameters * devices
    assert held[1] == pytest.approx(bill.optimizer * devices, rel=0.01)
    measured = sum(held) + during
    predicted = bill.total * devices
    assert measured == pytest.approx(predicted, rel=0.2), (measured / 2**20, predicted / 2**20)


@pytest.mark.slow
def test_a_scanned_7b_plan_is_abstract_and_sharded():
    config = ModelConfig.from_hf(AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=32, vocab_size=32000))
    mesh = make_mesh({"fsdp": -1})
    bill = plan_train_step(config, mesh, batch_size=8, length=256, compute_dtype=jax.numpy.bfloat16,
                           layout=Layout(scan=True, remat="full"), capacity=80 * 2**30)
    params, norms = 6_738_415_616, (2 * 32 + 1) * 4096  # the norms' scales are replicated
    assert bill.parameters == (params - norms) * 4 // 8 + norms * 4  # float32 master weights, FSDP over 8
    assert bill.optimizer == pytest.approx(2 * bill.parameters, rel=0.01)  # Adam's two moments
    assert bill.fits
    decode = plan_generation(config, batch_size=4, prompt_tokens=64, max_new_tokens=16,
                             dtype=jax.numpy.bfloat16, capacity=16 * 2**30)
    assert decode.parameters == params * 2 and decode.fits


def plan(*flags):
    return subprocess.run([sys.executable, "-m", "ssah_jax.cli", "plan", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_plan_command_says_what_fits(tiny_chat_model):
    # Two rows per device: the logits of the tiny model's large vocabulary dominate, so remat
    # barely helps and the advice ends in two micro-batches.
    flags = ["--config=configs/finetune.py:quick", f"--config.model={tiny_chat_model}", "--config.batch_size=16"]
    first = plan(*flags)
    assert first.returncode == 0, first.stderr[-2000:]
    total = float(re.search(r"total\s+([\d.]+) GiB", first.stdout).group(1))
    assert "-> fits" in first.stdout
    tight = plan(*flags, f"--memory_gb={total * 0.8:.4f}")
    assert tight.returncode == 0, tight.stderr[-2000:]
    assert "DOES NOT FIT" in tight.stdout
    advice = re.search(r"fits with (.*?) \(", tight.stdout)
    assert advice, tight.stdout
    again = plan(*flags, f"--memory_gb={total * 0.8:.4f}", *advice.group(1).split())
    assert "-> fits" in again.stdout and "DOES NOT FIT" not in again.stdout


@pytest.mark.slow
def test_plan_errors_are_one_line():
    refused = plan("--config=configs/finetune.py:quick")  # batch 4 does not split over 8 devices
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("ssah-jax: [finetune] a micro-batch of 4 / 1")
    unknown = plan("--config=configs/finetune.py:quick", "--config.no_such_key=1")
    assert unknown.returncode == 2 and "config.no_such_key" in unknown.stderr


NO_HUB = """
import sys
import httpx2
import huggingface_hub


class Refused(httpx2.BaseTransport):  # any request to the hub is reported, and fails at once
    def handle_request(self, request):
        print(f"HUB REQUEST {{request.url}}", file=sys.stderr, flush=True)
        raise AssertionError("no hub request expected")


huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=Refused()))
{body}
"""


@pytest.mark.slow
def test_a_papers_model_plans_without_a_hub_request():
    """llama2_7b_8gpu names meta-llama/Llama-2-7b-chat-hf: its architecture is known offline, so
    the plan asks the hub nothing (HF_HUB_OFFLINE unset); the patched client does see a request
    for a repository it does not know."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    run = lambda body: subprocess.run([sys.executable, "-c", NO_HUB.format(body=body)], cwd=ROOT,  # noqa: E731
                                      capture_output=True, text=True, timeout=600, env=env)
    planned = run("from ssah_jax.cli import main\nmain(['ssah-jax', 'plan', "
                  "'--config=configs/finetune.py:llama2_7b_8gpu'])")
    assert "HUB REQUEST" not in planned.stderr, planned.stderr[-2000:]
    assert planned.returncode == 0 and "-> fits" in planned.stdout, planned.stderr[-2000:]
    control = run("from transformers import AutoConfig\ntry:\n    AutoConfig.from_pretrained('someorg/some-model')\n"
                  "except BaseException:\n    pass")
    assert "HUB REQUEST https://huggingface.co/someorg/some-model" in control.stderr, control.stderr[-2000:]


@pytest.mark.slow
def test_plan_bills_attribution_and_decoding_on_the_configs_mesh(tiny_chat_model):
    """``prune``'s plan bills a batch of its attribution and of its evaluation's decoding on
    ``config.mesh`` (a host's devices): tensor 2 holds half the weights a device holds alone;
    a tensor axis that does not divide the kv heads is one line naming the key."""
    flags = ["--config=configs/prune.py:quick", f"--config.model={tiny_chat_model}"]

    def bills(*more):
        done = plan(*flags, *more)
        assert done.returncode == 0, done.stderr[-2000:]
        params = [float(v) for v in re.findall(r"parameters\s+([\d.]+) GiB", done.stdout)]
        return done.stdout, params

    alone, params_alone = bills("--config.mesh.data=1")
    split, params_split = bills("--config.mesh.data=1", "--config.mesh.tensor=2")
    assert "[attribution (wifv)]" in alone and "[evaluation]" in alone
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 2} of a host's 8 devices" in split
    assert len(params_alone) == len(params_split) == 2
    for one, two in zip(params_alone, params_split):
        assert two < 0.6 * one  # the tensor-split matrices (most of the weights) halved
    refused = plan(*flags, "--config.mesh.data=1", "--config.mesh.tensor=4")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "ssah-jax: config.mesh.tensor: tensor=4 does not divide kv_heads=2 (also sharded over tensor: "
        "vocab=49152, heads=4, mlp=96) of the model")
