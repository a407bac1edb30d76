"""The evaluation task ``gcg`` (an :mod:`ssah_jax.evaluation.tasks` task, registered beside them by
the ``evaluate`` experiment: the attacks sit above the evaluation, whose judges decide them).

Per prompt of ``gcg.dataset`` (AdvBench: its target "Sure, here is ..."), GCG optimises a suffix
on the model's language model (a model deployed with its safety signal is attacked in its
weights, as in HarmBench's transfer setting for defences, and answers under its decoding); the
model then answers prompt + space + suffix and the run's judge decides, on the prompt alone.
Rows (``rows/gcg.jsonl``) hold the suffix, its loss curve and the step the target was reached;
a finished prompt is never optimised again, and the prompt being optimised resumes from its last
step (``rows/gcg.state.<process>.json``, written after every step). With ``gcg.transfer`` the
suffixes are another run's rows', answered here without optimising.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ssah_jax import hosts, runs
from ssah_jax.attacks.gcg import GCGConfig, GCGState, attack
from ssah_jax.data import Record
from ssah_jax.evaluation.judges import Judge
from ssah_jax.evaluation.safety import answer_rows, summarise_asr
from ssah_jax.evaluation.tasks import Entries, EvalSpec, RowStore, first
from ssah_jax.evaluation.tasks.safety import untrained
from ssah_jax.generation import language_model


def gcg_config(spec: EvalSpec) -> GCGConfig:
    """The typed GCG settings of an evaluation (the sampling seed is the evaluation's)."""
    g = spec.gcg
    try:
        return GCGConfig(steps=g.steps, search_width=g.search_width, topk=g.topk, n_replace=g.n_replace, init=g.init,
                         chunk=g.chunk, early_stop=g.early_stop, seed=spec.seed)
    except ValueError as e:
        raise runs.ConfigError(f"config.gcg: {e}") from None


def save_state(path: Path, index: int, prompt: str, state: GCGState) -> None:
    """Writes a prompt's attack state (atomically: a kill leaves the previous step's)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"index": index, "prompt": prompt, "state": state.to_dict()}))
    os.replace(tmp, path)


def load_state(path: Path, index: int, prompt: str) -> GCGState | None:
    """The saved state of prompt ``index`` (None: none, or another prompt's)."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return GCGState(**saved["state"]) if (saved["index"], saved["prompt"]) == (index, prompt) else None


def transferred(path: str, records: list[Record]) -> dict[str, list[int]]:
    """The suffixes (ids) of another run's ``gcg`` rows, by prompt; each of ``records`` needs one."""
    try:
        rows = runs.read_jsonl(Path(path))
    except (OSError, ValueError) as e:
        raise runs.ConfigError(f"config.gcg.transfer={path!r}: {e}") from None
    found = {r["prompt"]: r["suffix_ids"] for r in rows}
    missing = [r.prompt for r in records if r.prompt not in found]
    if missing:
        raise runs.ConfigError(f"config.gcg.transfer={path!r}: no suffix for {len(missing)} of the {len(records)} "
                               f"prompts (first: {missing[0][:60]!r}); it must be a gcg run on the same prompts")
    return found


def gcg(model: Any, tokenizer: Any, spec: EvalSpec, *, store: RowStore, judge: Judge) -> Entries:
    """``gcg``: ASR under GCG on the first ``gcg.limit`` prompts of ``gcg.dataset`` (without
    those of ``harmful.exclude``), the share whose target was reached, and the mean steps run."""
    g = spec.gcg
    records = first(untrained(g.dataset, spec.harmful.exclude, spec.data_dir, "gcg.dataset"), g.limit)
    if any(not r.response for r in records):
        raise runs.ConfigError(f"config.gcg.dataset={g.dataset!r}: GCG needs a target response for every prompt")
    config = gcg_config(spec)
    suffixes = transferred(g.transfer, records) if g.transfer else None
    state_path = store.directory / f"gcg.state.{hosts.index()}.json"

    def one(batch: list[Record], start: int) -> list[dict]:
        rows = []
        for i, record in enumerate(batch):
            if suffixes is not None:
                state = GCGState(0, suffixes[record.prompt], suffixes[record.prompt], float("nan"), [])
            else:
                index = start + i
                state = attack(language_model(model), tokenizer, record.prompt, record.response, config,
                               state=load_state(state_path, index, record.prompt),
                               on_step=lambda s, index=index, prompt=record.prompt: save_state(state_path, index,
                                                                                              prompt, s))
            suffix = tokenizer.decode(state.best)
            row = answer_rows(model, tokenizer, [Record(f"{record.prompt} {suffix}")], attack=False,
                              max_new_tokens=spec.max_new_tokens, batch_size=1, seed=spec.seed + start + i)[0]
            harmful = judge.harmful([record.prompt], [row["answer"]])[0]
            rows.append({**row, "prompt": record.prompt, "target": record.response, "suffix": suffix,
                         "suffix_ids": state.best, "loss": state.best_loss, "losses": state.losses,
                         "reached": state.reached, "steps": state.step, "harmful": harmful, "judge": judge.name,
                         **({"transfer": g.transfer} if g.transfer else {})})
        return rows

    def compute() -> dict:
        rows = store.rows("gcg", records, one, 1)
        return {**summarise_asr(rows), "reached": float(np.mean([r["reached"] is not None for r in rows])),
                "steps": float(np.mean([r["steps"] for r in rows])), "transfer": g.transfer or None}

    return {"gcg": compute}


def label(spec: EvalSpec, name: str, entry: dict) -> str | None:
    """A report's name of the attack metric ``name``, None for another family's."""
    if name != "gcg":
        return None
    g = spec.gcg
    how = (f"suffixes of {g.transfer}" if g.transfer else
           f"{g.steps} steps, width {g.search_width}, top-k {g.topk}")
    return f"ASR, {g.dataset}, GCG ({how})"
