"""The files a run writes and reads back: JSON and JSONL records (``read_json``, ``read_jsonl``,
``WorkdirError`` for a damaged one), written whole or not at all (``write_atomic``), the record
that a command finished in its workdir (``finished.json``: ``mark_finished`` / ``read_finished``)
and matplotlib for its plots (``pyplot``)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from ssah_jax import hosts


class WorkdirError(ValueError):
    """The workdir cannot be used: it is a file, holds a damaged file, or results of other inputs."""


FINISHED = "finished.json"  # written when an ssah-jax command ran to its end in the workdir


def write_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file that then replaces it: a kill leaves
    the old file or the new one, never a truncated one that would stop the run's resumption."""
    partial = Path(str(path) + ".partial")
    partial.write_text(text)
    partial.replace(path)


def mark_finished(workdir: str | Path, argv: list[str], seconds: float) -> None:
    """Records in ``workdir/finished.json`` that a command finished there (what a sweep checks,
    however the command was run)."""
    from ssah_jax import runs  # runs.code_version, where a test replaces it for every caller

    if hosts.is_main():
        write_atomic(Path(workdir, FINISHED), json.dumps({
            "argv": argv, "seconds": round(seconds, 1), "code": runs.code_version(),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2) + "\n")


def read_finished(workdir: str | Path) -> dict[str, Any] | None:
    """The record of :func:`mark_finished` (None without one)."""
    try:
        record = json.loads(Path(workdir, FINISHED).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("argv"), list) else None


def read_json(path: Path) -> Any:
    """A JSON file a run wrote; WorkdirError naming it if it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path}: not valid JSON (a damaged workdir file: {e})") from None


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
            raise WorkdirError(f"{path}:{i + 1}: not valid JSON (a damaged workdir file)") from None
    return records


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (runs write PNGs, never show them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
