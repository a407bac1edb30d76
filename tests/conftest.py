"""Shared fixtures. Tests never touch the network: tiny random models, the demo GGUF
(installed from PyPI), and ../shared/data."""

import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices for the sharding tests; must be set before JAX is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data kit beside the checkout (the project's machines and CI have it there); the subprocesses
# the tests start inherit it.
SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
os.environ.setdefault("SSAH_DATA_DIR", SHARED_DATA)
# One persistent compilation cache for the whole run: the pytest-xdist workers and the CLI
# subprocesses inherit it, so a program compiled by one test (the same tiny model, step and
# shapes) is read back by the next instead of compiled again. Removed when the run ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ssah_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


def real_model(name: str):
    """(our model, tokenizer, transformers reference model) for a registered model, fp32;
    the test is skipped when the model is not at hand (the demo model always is)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from ssah_jax.checkpoints import DEMO_NAME, load_model, model_path

    try:
        path = model_path(name, download=False)
    except FileNotFoundError as e:
        if name == DEMO_NAME:
            raise
        pytest.skip(str(e))
    model, tokenizer = load_model(str(path))
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, tokenizer, reference


@pytest.fixture(scope="session")
def demo():
    """SmolLM2-135M-Instruct (see real_model)."""
    return real_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct, when fetched into the cache (see real_model)."""
    return real_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture
def tiny_llama(tmp_path):
    return tiny.save(tiny.llama_config(), tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with the demo model's tokenizer and chat template (an HF directory)."""
    from ssah_jax.checkpoints import demo_gguf_path, load_tokenizer

    directory = tiny.save(tiny.llama_config(vocab_size=49152, pad_token_id=2), tmp_path_factory.mktemp("tiny_chat"))
    load_tokenizer(str(demo_gguf_path(download=False))).save_pretrained(directory)
    return directory


REAL_MODEL_FIXTURES = {"demo", "qwen"}
# Fixtures that take minutes to make (a real model; a whole pipeline or multi-host run a module's
# tests read): every test that takes one is slow, whatever its own time.
SLOW_FIXTURES = REAL_MODEL_FIXTURES | {"pipeline", "finetuned"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """The markers (pytest.ini; docs/development.md) hold: a test that takes a real model's
    fixture without the ``real_model`` marker is a collection error naming it; a test that takes
    one of SLOW_FIXTURES is marked slow."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    unmarked = [item.nodeid for item in items
                if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("real_model") is None]
    if unmarked:
        raise pytest.UsageError(f"tests taking {sorted(REAL_MODEL_FIXTURES)} need @pytest.mark.real_model: "
                                + ", ".join(unmarked))
