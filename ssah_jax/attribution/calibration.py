"""Unit scores of a model on a calibration set, computed once and cached in a file.

``calibration_scores`` encodes the records (chat template, response-only masks), batches them,
streams them through a scorer (:func:`~ssah_jax.attribution.unit_scores`) and writes
``<name>.npz`` (the scores, last and atomically: its presence means they are complete) and
``<name>.json`` (the settings, the set's size, truncation, tokens, time and prompts) into a
directory. A second call with the same directory reads the cached scores back, and refuses them
when they were computed with other settings or prompts. A score cache shared by runs
(:func:`score_cache`: a directory per model and settings) spares a run the pass when another
computed the same scores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ssah_jax import hosts, runs
from ssah_jax.attribution.kinds import model_identity
from ssah_jax.attribution.scorers import unit_scores
from ssah_jax.data import Record
from ssah_jax.data.batching import batch_dataset, bucket_lengths
from ssah_jax.data.tokenize import encode_records
from ssah_jax.models import CausalLM
from ssah_jax.models.units import MODULES


def load_scores(path: str | Path) -> dict[str, np.ndarray]:
    """The scores of a ``.npz`` written by :func:`calibration_scores` (``{module: [layers, units]}``)."""
    with np.load(path) as data:
        return {m: data[m] for m in MODULES}


def score_cache(root: str | Path, model: CausalLM, **identity: Any) -> Path:
    """The directory under ``root`` for ``model``'s scores: a hash of its weights' fingerprint
    (:func:`~ssah_jax.attribution.model_identity`) and of ``identity`` (its source, dtype, data
    and every attribution setting that changes a score), so runs of other settings never mix."""
    return Path(root) / runs.fingerprint({"model": model_identity(model), **identity})[:16]


def _copy_scores(source: Path, destination: Path, name: str) -> None:
    """``<name>.json`` then ``<name>.npz`` (each atomically; the npz last: its presence means
    complete), so parallel runs sharing a cache never read half a file."""
    destination.mkdir(parents=True, exist_ok=True)
    for file in (f"{name}.json", f"{name}.npz"):
        partial = destination / f"{file}.{os.getpid()}.partial"
        shutil.copy2(source / file, partial)
        partial.replace(destination / file)


def calibration_scores(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    directory: str | Path,
    name: str,
    *,
    scorer: str,
    tokens: str,
    max_length: int,
    batch_size: int,
    dataset: str = "",
    cache: Path | None = None,
    by_layer: bool = False,
) -> dict[str, np.ndarray]:
    """Scores of every unit of ``model`` on ``records`` (``{module: [layers, units]}``), kept in
    ``directory/<name>.npz``; ``dataset`` names the set in the ``.json`` beside it. With a
    ``cache`` (:func:`score_cache`) the scores are copied from it when it has them, and into it
    when it does not. ``by_layer``: SNIP one layer at a time (the same scores, less memory)."""
    path = Path(directory) / f"{name}.npz"
    if cache is not None:
        if (cache / f"{name}.npz").exists() and not path.exists() and hosts.is_main():
            _copy_scores(cache, Path(directory), name)
        hosts.sync(f"{name} scores cached")
        result = calibration_scores(model, tokenizer, records, directory, name, scorer=scorer, tokens=tokens,
                                    max_length=max_length, batch_size=batch_size, dataset=dataset, by_layer=by_layer)
        if not (cache / f"{name}.npz").exists() and hosts.is_main():
            _copy_scores(Path(directory), cache, name)
        return result
    settings = {"dataset": dataset, "scorer": scorer, "tokens": tokens, "max_length": max_length,
                "prompts": sorted({r.prompt for r in records})}
    if path.exists():
        info = path.with_suffix(".json")
        kept = json.loads(info.read_text()) if info.exists() else {}
        changed = sorted(k for k, v in settings.items() if k in kept and kept[k] != v)
        if changed:
            raise ValueError(f"{path}: scores of other settings ({', '.join(changed)} differ); "
                             "remove the file or use another directory")
        print(f"{name} scores: computed in an earlier run, kept ({path})")
        return load_scores(path)
    examples, stats = encode_records(tokenizer, records, max_length=max_length)
    print(f"{name} calibration set ({dataset or 'records'}): {stats}")
    # Every batch on every host: the model is whole on each (a multi-host run scores on each).
    batches = batch_dataset(examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                            buckets=bucket_lengths(max_length), shuffle=False, process_index=0, process_count=1)
    start = time.perf_counter()
    result = unit_scores(model, tqdm(batches, desc=f"{name} scores ({scorer})", unit="batch",
                                     disable=not hosts.is_main()), scorer, tokens, by_layer=by_layer)
    result = {m: np.asarray(v) for m, v in result.items()}
    seconds = time.perf_counter() - start
    if not hosts.is_main():  # process 0 keeps them
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({
        "dataset": dataset, "scorer": scorer, "tokens": tokens, "max_length": max_length, "samples": len(examples),
        "truncated": stats.truncated, "dropped": stats.dropped, "token_count": sum(len(e.ids) for e in examples),
        "response_tokens": sum(int(e.loss_mask.sum()) for e in examples), "seconds": round(seconds, 1),
        "prompts": settings["prompts"],
    }, indent=2) + "\n")
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        np.savez(f, **result)
    partial.replace(path)  # last, and atomic: its presence means the scores are complete
    return result
