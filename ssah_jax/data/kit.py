"""Loading local files: a dataset of the data kit (``load_local``, from the directory
``resolve_data_dir`` finds) or a JSONL file of prompts and responses (``load_jsonl``). Files are
read by line so an error names ``file:line``; ``on_error="skip"`` drops malformed rows and reports
how many it dropped (a warning, once per process)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ssah_jax.data.readers import _read_jsonl, _text
from ssah_jax.data.records import DataError, LoadReport, Record, _Malformed
from ssah_jax.data.registry import DATASETS

log = logging.getLogger(__name__)


class _Once(logging.Filter):
    """Lets each distinct message through once per process: a dataset that every stage of a run
    loads reports its skipped rows once, not once per load."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


log.addFilter(_Once())

DATA_DIR_ENV = "SSAH_DATA_DIR"


def default_data_dir() -> Path:
    """Where ``ssah-jax data fetch`` puts the kit without ``$SSAH_DATA_DIR``: the user's cache
    (``$XDG_CACHE_HOME``, else ``~/.cache``) under ``ssah_jax/data``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssah_jax" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$SSAH_DATA_DIR``, else :func:`default_data_dir`."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return default_data_dir()


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.csv")) if path.is_dir() else [path]


def load_local(
    name: str,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
) -> tuple[list[Record], LoadReport]:
    """A kit dataset and a report of what was read (rows, skipped rows, first error)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or 'tfds:...', 'hf:...')")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    spec = DATASETS[name]
    split = split or spec.default_split
    if split not in spec.splits:
        raise KeyError(f"dataset {name!r} has no split {split!r}; splits: {list(spec.splits)}")
    root = resolve_data_dir(data_dir)
    path = root / spec.splits[split]
    if not path.exists():
        raise DataError(
            f"dataset {name!r}: {path} not found; `ssah-jax data fetch {name}` fetches it there, or point "
            f"the config key data_dir or the environment variable {DATA_DIR_ENV} at a data kit"
        )
    records, skipped, first_error = [], 0, None
    for file in _files(path):
        for line, row in spec.reader(file):
            where = f"{file}:{line}"
            try:
                if isinstance(row, _Malformed):
                    raise row
                record = spec.parse(row)
                if spec.keep is None or spec.keep(record):
                    records.append(dataclasses.replace(record, where=where))
            except _Malformed as e:
                if on_error == "raise":
                    raise DataError(f"{where}: malformed row: {e} (on_error='skip' drops such rows)") from None
                skipped += 1
                first_error = first_error or f"{where}: {e}"
    report = LoadReport(name, split, str(path), len(records), skipped, first_error)
    if skipped:
        log.warning("%s/%s: skipped %d malformed rows of %s (first: %s)", name, split, skipped, path, first_error)
    return records, report


def check_kit_dataset(name: str) -> str:
    """``name`` if it is a kit dataset (what :func:`load_local` reads); KeyError otherwise."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return name


def _prompt_response(row) -> Record:
    response = row.get("response", row.get("answer")) if isinstance(row, dict) else None
    if not isinstance(response, str):
        raise _Malformed("expected an object with a 'prompt' and a 'response' (or 'answer') string")
    return Record(_text(row, "prompt"), response=response)


def load_jsonl(path: str | os.PathLike, on_error: str = "raise") -> list[Record]:
    """The records of a JSONL file of ``{"prompt", "response" | "answer"}`` objects."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records = []
    for line, row in _read_jsonl(path):
        try:
            if isinstance(row, _Malformed):
                raise row
            records.append(dataclasses.replace(_prompt_response(row), where=f"{path}:{line}"))
        except _Malformed as e:
            if on_error == "raise":
                raise DataError(f"{path}:{line}: malformed row: {e}") from None
            log.warning("%s:%d: skipped a malformed row: %s", path, line, e)
    return records
