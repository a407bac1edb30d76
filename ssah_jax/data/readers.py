"""From a file to raw rows: a reader per file format (JSONL, a JSON list, CSV, TSV, MMLU's
folder of CSVs, plain lines) yields each row with its line number, or the ``_Malformed`` that
reading it raised; ``_field`` / ``_text`` take a checked field out of a row."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssah_jax.data.records import DataError, _Malformed


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _Malformed(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    # Line numbers of list items: the line where each top-level item starts.
    starts = _json_item_lines(text, len(rows))
    yield from zip(starts, rows)


def _json_item_lines(text: str, count: int) -> list[int]:
    decoder = json.JSONDecoder()
    lines, pos, line, counted = [], text.index("[") + 1, 1, 0
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _read_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if len(row) != len(header):
                yield line, _Malformed(f"{len(row)} fields, the header has {len(header)}")
            else:
                yield line, dict(zip(header, row))


def _read_tsv(path: Path) -> Iterator[tuple[int, Any]]:
    return _read_csv(path, "\t")


def _read_mmlu(path: Path) -> Iterator[tuple[int, Any]]:
    subject = path.stem.rsplit("_", 1)[0]  # abstract_algebra_test.csv -> abstract_algebra
    for line, row in _read_csv(path):
        yield line, {**row, "subject": subject} if isinstance(row, dict) else row


def _read_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line.strip()


def _field(row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise _Malformed(f"expected an object, got {type(row).__name__}")
    if key not in row:
        raise _Malformed(f"missing field {key!r}")
    return row[key]


def _text(row: Any, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"field {key!r} must be a non-empty string")
    return value
