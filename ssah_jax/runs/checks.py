"""A config's values checked and read: ``ConfigError`` (a value out of range, naming its key),
``check`` / ``check_parses`` / ``dtype``, a dotted key's value (``get``), a preset's values
(``set_values``) and a config file's ``get_config`` (``config_from_file``)."""

from __future__ import annotations

import importlib.util
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


def check_parses(config: ConfigDict, key: str, parse: Callable[[Any], Any], optional: bool = False) -> None:
    """Raises ConfigError naming ``config.<key>`` when ``parse(value)`` raises KeyError or
    ValueError (e.g. ``ssah_jax.data.parse_mixture`` on a dataset spec); ``optional``: an empty
    value passes."""
    value = get(config, key)
    if optional and not value:
        return
    try:
        parse(value)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.{key}={value!r}: {e.args[0]}") from None


def dtype(config: ConfigDict, key: str = "dtype"):
    check(config, key, lambda v: v in DTYPES, f"must be one of {sorted(DTYPES)}")
    return DTYPES[config[key]]


def config_from_file(path: str | Path, preset: str | None, drop: tuple[str, ...] = ()) -> ConfigDict:
    """``get_config(preset)`` of a config file (its default preset when ``preset`` is empty)
    without its top-level keys ``drop`` (configs nest each other's sections this way, dropping
    what the outer config sets). A file without ``get_config`` is a ConfigError."""
    spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(preset)")
    config = module.get_config(preset) if preset else module.get_config()
    with config.unlocked():
        for key in drop:
            del config[key]
    return config


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
