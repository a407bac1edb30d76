"""The data kit from its public sources: every file the loaders read (:data:`DATASETS`), fetched
at a pinned revision, checked against its recorded size and sha256, and written into the data
directory in the layout the loaders read (``ssah-jax data fetch``); the check of a directory
against the same record (``ssah-jax data check``).

The record is ``manifest.json`` beside this module: per file of the kit, its size, sha256,
licence, where it comes from (``repository@commit : path``, or a file inside a PyPI wheel) and
the URLs whose bytes, concatenated, are the file. ``scripts/data_manifest.py`` writes it from a
kit directory. A ``mirror`` (``file:///path/to/kit`` or ``https://host/kit``) holding the kit's
layout replaces the upstream URLs (an institute's copy; the tests' local one).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssah_jax.data.kit import resolve_data_dir
from ssah_jax.data.records import DataError
from ssah_jax.data.registry import DATASETS

MANIFEST = Path(__file__).with_name("manifest.json")
TIMEOUT_S = 60


@functools.cache
def manifest() -> dict[str, dict[str, Any]]:
    """Per file of the kit (its path under the data directory): ``size``, ``sha256``,
    ``license``, ``source``, ``urls`` (concatenated in order) and, for a file inside an archive,
    ``member``; ``accompanies``: the data file a licence file goes with."""
    return json.loads(MANIFEST.read_text())["files"]


def _reads(spec, path: str) -> bool:
    """Whether a dataset of :data:`DATASETS` reads the kit file ``path`` (a split's file, or a
    file under a split's directory)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in spec.splits.values())


def dataset_files(names: Sequence[str] = ()) -> list[str]:
    """The kit files of the datasets ``names`` (of :data:`DATASETS`; every file without names),
    with the licence files that go with them, in the manifest's order."""
    files = manifest()
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise DataError(f"unknown dataset {', '.join(map(repr, unknown))}; known: {', '.join(sorted(DATASETS))}")
    if not names:
        return list(files)
    chosen = {f for f in files if any(_reads(DATASETS[n], f) for n in names)}
    chosen |= {f for f, entry in files.items() if entry.get("accompanies") in chosen}
    return [f for f in files if f in chosen]


def datasets_of(path: str) -> list[str]:
    """The datasets of :data:`DATASETS` that read the kit file ``path``."""
    return [n for n, spec in DATASETS.items() if _reads(spec, path)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def problem(root: Path, path: str) -> str | None:
    """What is wrong with the kit file ``path`` under ``root``: ``missing``, or ``altered`` with
    the size or sha256 it has against the recorded one; None when it is intact."""
    entry, file = manifest()[path], root / path
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size != entry["size"]:
        return f"altered ({size} bytes, recorded {entry['size']})"
    digest = _sha256(file.read_bytes())
    if digest != entry["sha256"]:
        return f"altered (sha256 {digest[:12]}..., recorded {entry['sha256'][:12]}...)"
    return None


def check(names: Sequence[str] = (), data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The kit files of ``names`` (every file without names) that are missing or altered in the
    data directory, each with what is wrong (:func:`problem`); empty when all are intact."""
    root = resolve_data_dir(data_dir)
    found = {path: problem(root, path) for path in dataset_files(names)}
    return {path: why for path, why in found.items() if why is not None}


def _download(url: str, progress: Callable[[int], None]) -> bytes:
    """The bytes at ``url`` (``https://`` or ``file://``), reporting each chunk's size."""
    chunks = []
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                progress(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}: {getattr(e, 'reason', e)} (offline? --mirror=URL fetches from a copy of the kit)"
                        ) from None
    return b"".join(chunks)


def _bytes_of(path: str, mirror: str | None, progress: Callable[[int], None]) -> bytes:
    """The kit file ``path`` from its sources (or ``mirror``), checked against the manifest."""
    entry = manifest()[path]
    if mirror:
        data = _download(f"{mirror.rstrip('/')}/{path}", progress)
    else:
        data = b"".join(_download(url, progress) for url in entry["urls"])
        if "member" in entry:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                data = archive.read(entry["member"])
    if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
        where = f"{mirror.rstrip('/')}/{path}" if mirror else entry["source"]
        raise DataError(f"{path}: what {where} gave ({len(data)} bytes, sha256 {_sha256(data)[:12]}...) is not the "
                        f"recorded file ({entry['size']} bytes, sha256 {entry['sha256'][:12]}...); nothing written")
    return data


def fetch(names: Sequence[str] = (), data_dir: str | os.PathLike | None = None, *, mirror: str | None = None,
          progress: bool = True) -> dict[str, str]:
    """Fetches the kit files of ``names`` (every file without names) that are missing or altered
    in the data directory from their sources (or ``mirror``), each checked against its recorded
    size and sha256 before it is written (a file that fails is not written, and the error names
    it). Returns what was done per file: ``fetched`` or ``kept`` (already intact)."""
    from tqdm import tqdm

    root = resolve_data_dir(data_dir)
    files = dataset_files(names)
    todo = [p for p in files if problem(root, p) is not None]
    done = {p: "kept" for p in files if p not in todo}
    total = sum(manifest()[p]["size"] for p in todo if "member" not in manifest()[p] or mirror)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"data kit -> {root}", disable=not progress or not todo,
              leave=False) as bar:
        for path in todo:
            data = _bytes_of(path, mirror, bar.update)
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            os.replace(partial, target)  # a killed fetch leaves no half-written file under the real name
            done[path] = "fetched"
    return {p: done[p] for p in files}
