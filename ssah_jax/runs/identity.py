"""A run's identity and the workdir that records it: the values that determine a run
(``determining``: every leaf of its config but the experiment's ``EXCLUDED`` keys and its ``ADDED``
keys at their old values), their hash (``fingerprint``) and differences, and ``prepare_workdir``,
which records them in ``identity.json`` and refuses a workdir of another identity or experiment."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from ssah_jax import hosts
from ssah_jax.runs.checks import ConfigError
from ssah_jax.runs.records import WorkdirError, read_json, write_atomic

IDENTITY = "identity.json"  # what a workdir's results were computed from (see prepare_workdir)
# Files a run writes before it computes anything (reproduce: its invocation log and a stage's timer).
BOOKKEEPING = (IDENTITY, "config.json", "invocations.jsonl", "elapsed.json")


# Keys added to a config after results were recorded: each experiment declares its own
# (``ADDED`` beside ``EXCLUDED``: a dotted key's tail -> the value that gives the results of
# before; a pipeline's ``ADDED`` holds its sub-runs' too) and the top-level sections its config
# gained (``ADDED_SECTIONS``). At its old value an added key stays out of a run's identity, so
# adding it refuses no existing workdir. Matched on the tail, as sub-runs nest configs
# (``train.signal.lr_scale`` is finetune's key inside an attack stage): a tail must name one key
# of one experiment's config wherever it appears (tests/infrastructure/test_run_identity.py checks every preset).
Added = Mapping[str, Any]


def added_at_old_value(key: str, value: Any, added: Added) -> bool:
    """Whether ``key`` is one of ``added`` (or ends in one) at the value it had before it was
    added: a config without the key and one with it at that value are the same run."""
    return any((key == k or key.endswith("." + k)) and value == v for k, v in added.items())


def leaves(config: ConfigDict) -> dict[str, Any]:
    """Every leaf of ``config`` as a dotted key, JSON-typed (tuples as lists), in file order."""
    return _flatten(json.loads(config.to_json_best_effort()))


def determining(config: ConfigDict, excluded: tuple[str, ...] = (), added: Added | None = None) -> dict[str, Any]:
    """The values that determine a run's outputs: every leaf of ``config`` as a dotted key
    (``"optimizer.learning_rate"``), JSON-typed (tuples as lists), without the keys ``excluded``
    (an excluded section drops every key under it) and without a key of ``added`` (the
    experiment's ``ADDED``) at its old value. Each experiment names its excluded keys once, the
    ones that only affect speed or logging; an excluded key the config does not have is an
    error, so a renamed key cannot silently become determining."""
    flat = leaves(config)
    unknown = [e for e in excluded if not any(k == e or k.startswith(e + ".") for k in flat)]
    if unknown:
        raise KeyError(f"excluded keys {unknown} are not keys of the config")
    return _determining(flat, excluded, added or {})


def _determining(flat: dict[str, Any], excluded: tuple[str, ...], added: Added) -> dict[str, Any]:
    return {k: v for k, v in flat.items()
            if not any(k == e or k.startswith(e + ".") for e in excluded) and not added_at_old_value(k, v, added)}


def fingerprint(values: Any) -> str:
    """sha256 of the canonical JSON of ``values`` (sorted keys, no spaces)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "config.") -> str:
    """``config.k: old -> new`` for each key whose value differs, comma-separated."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    return ", ".join(f"{prefix}{k}: {_show(old.get(k, _ABSENT))} -> {_show(new.get(k, _ABSENT))}" for k in keys)


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def prepare_workdir(workdir: str | Path, config: ConfigDict, excluded: tuple[str, ...] = (), *,
                    added: Added | None = None, sections: tuple[str, ...] = (), overwrite: bool = False,
                    staged: bool = False) -> Path:
    """Creates ``workdir`` for a run of ``config``: records the run's identity in
    ``identity.json`` (the hash and values of :func:`determining` ``(config, excluded)``) and
    the resolved config in ``config.json``.

    A workdir holding a run of another identity is refused (ConfigError listing each differing
    key as ``config.k: old -> new``), so a resume never mixes the results of two configs;
    ``overwrite`` clears an earlier run's workdir first (one whose ``config.json`` has this
    config's keys; any other directory is refused). ``staged``: the run
    is made of stages that record and check their own identities (reproduce), the workdir none.
    ``added`` / ``sections``: the experiment's ``ADDED`` and ``ADDED_SECTIONS`` (keys and
    top-level sections its config gained later: a workdir from before them is resumed).
    Call it after validating the config, so an invalid one leaves no workdir behind."""
    workdir = Path(workdir)
    for path in (workdir, *workdir.parents):
        if path.exists():
            if not path.is_dir():
                raise WorkdirError(f"workdir {workdir}: {'it' if path == workdir else path} is a file, not a directory")
            break
    added = added or {}
    values = None if staged else determining(config, excluded, added)
    if overwrite:
        _check_clearable(workdir, config, sections)
    elif not _same_experiment(workdir, config, sections):
        raise WorkdirError(f"{workdir} holds a run of another experiment (its config.json has other keys); "
                           "use a new --workdir")
    elif values is not None:
        recorded = _recorded(workdir, excluded, added)
        if recorded is not None and recorded != values:
            raise ConfigError(f"{workdir} holds a run with other values of determining config keys: "
                              f"{differences(recorded, values)}; restore them, rerun with --overwrite to start "
                              "afresh in it, or use a new --workdir")
    hosts.sync("workdir checked")  # every process checked the workdir before process 0 changes it
    if hosts.is_main():
        if overwrite:
            _clear(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        identity = ({"staged": "each stage records its own identity in <stage>/stage.json"} if values is None else
                    {"hash": fingerprint(values), "excluded": list(excluded), "determining": values})
        write_atomic(workdir / IDENTITY, json.dumps(identity, indent=2, ensure_ascii=False) + "\n")
        write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    hosts.sync("workdir ready")
    return workdir


def _recorded(workdir: Path, excluded: tuple[str, ...], added: Added) -> dict[str, Any] | None:
    """The determining values a workdir's results came from: ``identity.json``, or for a workdir
    of an earlier version the ``config.json`` it holds (None: an empty or new workdir)."""
    if (workdir / IDENTITY).exists():
        return read_json(workdir / IDENTITY).get("determining")
    if (workdir / "config.json").exists():
        return _determining(_flatten(read_json(workdir / "config.json")), excluded, added)
    return None


def _same_experiment(workdir: Path, config: ConfigDict, sections: tuple[str, ...]) -> bool:
    """Whether ``workdir`` is new, or holds a config.json with the top-level keys of ``config``
    (an HF model's config.json, or another experiment's, has other keys), but for sections
    added later (``sections``)."""
    if not (workdir / "config.json").exists():
        return not (workdir / IDENTITY).exists()
    try:
        recorded = set(json.loads((workdir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return False
    return recorded <= set(config.keys()) and not set(config.keys()) - recorded - set(sections)


def _check_clearable(workdir: Path, config: ConfigDict, sections: tuple[str, ...]) -> None:
    """``--overwrite`` empties only the workdir of an earlier run of this experiment."""
    if not workdir.exists() or not any(workdir.iterdir()):
        return
    if not (workdir / "config.json").exists() or not _same_experiment(workdir, config, sections):
        raise WorkdirError(f"--overwrite: {workdir} does not look like a workdir of this experiment (no config.json "
                           "of its config keys); not clearing it")


def _clear(workdir: Path) -> None:
    """Empties a workdir (``--overwrite``, after :func:`_check_clearable`)."""
    if not workdir.exists() or not any(workdir.iterdir()):
        return
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(f"--overwrite: cleared {workdir}")


def holds_results(workdir: Path) -> bool:
    """Whether ``workdir`` holds anything but the bookkeeping of prepare_workdir and empty
    files or directories (what a run that failed before producing anything leaves)."""
    return any(p.is_file() and p.name not in BOOKKEEPING and p.stat().st_size > 0 for p in workdir.rglob("*"))
