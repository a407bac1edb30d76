"""What every experiment run shares: config validation and its workdir."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A config value is out of range; the message names the key."""


def get(config: ConfigDict, key: str) -> Any:
    """The value of a dotted key (``"attack.lora.rank"``)."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check(config: ConfigDict, key: str, ok: Callable[[Any], bool], requirement: str) -> None:
    """Raises ConfigError naming ``config.<key>`` unless ``ok(value)``."""
    value = get(config, key)
    if not ok(value):
        raise ConfigError(f"config.{key}={value!r}: {requirement}")


def dtype(config: ConfigDict, key: str = "dtype"):
    check(config, key, lambda v: v in DTYPES, f"must be one of {sorted(DTYPES)}")
    return DTYPES[config[key]]


def prepare_workdir(workdir: str | Path, config: ConfigDict, determining: tuple[str, ...] = ()) -> Path:
    """Creates ``workdir`` and writes the resolved config to ``config.json``.

    ``determining``: the top-level keys the workdir's results depend on; a workdir holding a
    run with other values of them is refused (ConfigError naming the keys), so a resume
    never mixes the results of two configs."""
    workdir = Path(workdir)
    previous = workdir / "config.json"
    if determining and previous.exists():
        old = json.loads(previous.read_text())
        new = json.loads(config.to_json_best_effort())
        changed = [k for k in determining if old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(f"{workdir} holds a run with other values of "
                              + ", ".join(f"config.{k}" for k in changed) + "; use a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return workdir


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a killed run) is dropped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return records


def config_from_file(path: str | Path, preset: str, drop: tuple[str, ...] = ()) -> ConfigDict:
    """``get_config(preset)`` of a config file without its top-level keys ``drop`` (configs
    nest each other's sections this way, dropping what the outer config sets)."""
    spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    with config.unlocked():
        for key in drop:
            del config[key]
    return config


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (runs write PNGs, never show them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def set_values(config: ConfigDict, values: dict[str, Any]) -> None:
    """Sets dotted keys (``"evaluation.harmful.limit"``) of a preset; a key must exist."""
    for key, value in values.items():
        target = config
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        if leaf not in target:
            raise KeyError(f"preset sets unknown config key {key!r}")
        target[leaf] = value


def machine() -> dict[str, Any]:
    """What a measurement ran on: CPU model and count, jax version and devices."""
    import jax

    return {"machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "devices": [str(d.device_kind) for d in jax.devices()]}


def describe_machine(m: dict[str, Any] | None = None) -> str:
    """``m`` (a recorded ``machine()``; this machine by default) in one line, for reports and
    benchmark output."""
    m = m or machine()
    return (f"{m['processor']} ({m['machine']}), {m['cpus']} cores, jax {m['jax']} on "
            f"{len(m['devices'])} x {m['devices'][0]}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
