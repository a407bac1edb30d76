"""Answer prompts with a model and write them to the workdir (``generations.jsonl``, ``report.md``).

Resumes: answers already in ``generations.jsonl`` are kept and only the rest is generated; a
workdir of another config is refused (``runs.prepare_workdir``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ml_collections import ConfigDict

from experiments._mesh import check_mesh, load_on_mesh, on_mesh
from ssah_jax import hosts, runs
from ssah_jax.data import Record, load_mixture
from ssah_jax.evaluation.tasks import RowStore
from ssah_jax.generation import generate

# Keys that only affect speed or logging: the mesh (experiments._mesh). ``batch_size`` determines
# the answers: a batch is sampled with the seed ``seed + its first index`` and its rows share that key.
EXCLUDED: tuple[str, ...] = ("mesh",)
# Added after results were recorded, at the value that gives the results of before (a top-level
# key, so also a section a workdir from before it lacks).
ADDED = {"prompts_dataset": ""}
ADDED_SECTIONS = ("prompts_dataset", "mesh")


def read_prompts(path: str) -> list[str]:
    """One prompt per line (.txt), or JSONL records with a ``prompt`` field."""
    file = Path(path)
    if not file.exists():
        raise runs.ConfigError(f"config.prompts_file={path!r}: no such file")
    if file.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise runs.ConfigError(f"config.prompts_file: {file}:{i}: expected a JSON object with a 'prompt' "
                                       "field") from None
        return prompts
    return [line for line in file.read_text().splitlines() if line.strip()]


def prompts_of(config: ConfigDict) -> list[str]:
    """The prompts to answer: ``prompts_dataset``, else ``prompts_file``, else ``prompts``."""
    if config.prompts_dataset and config.prompts_file:
        raise runs.ConfigError("config.prompts_dataset and config.prompts_file: set one of them, not both")
    if config.prompts_dataset:
        try:
            return [r.prompt for r in load_mixture(config.prompts_dataset)[0]]
        except (KeyError, ValueError) as e:
            raise runs.ConfigError(f"config.prompts_dataset={config.prompts_dataset!r}: {e}") from None
    if config.prompts_file:
        prompts = read_prompts(config.prompts_file)
        if not prompts:
            raise runs.ConfigError(f"config.prompts_file={config.prompts_file}: no prompts in it (empty, or blank "
                                   "lines only)")
        return prompts
    if not config.prompts:
        raise runs.ConfigError("config.prompts: no prompts to answer (set it, config.prompts_file or "
                               "config.prompts_dataset)")
    return list(config.prompts)


def validate(config: ConfigDict) -> None:
    runs.check(config, "max_new_tokens", lambda v: v >= 1, "must be >= 1")
    runs.check(config, "temperature", lambda v: v >= 0, "must be >= 0")
    runs.check(config, "top_k", lambda v: v >= 0, "must be >= 0")
    runs.check(config, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
    runs.check(config, "batch_size", lambda v: v >= 1, "must be >= 1")
    runs.dtype(config)
    check_mesh(config)


def plan_configs(config: ConfigDict) -> list:
    """What ``ssah-jax plan`` compiles: the decoding of a batch of prompts."""
    from experiments.finetune import decode_spec
    from ssah_jax.train.memory import PlanItem

    return [PlanItem("generate", config.model, decode_spec(config))]


def run(config: ConfigDict, workdir: str, *, overwrite: bool = False) -> Path:
    validate(config)
    prompts = prompts_of(config)
    out = runs.prepare_workdir(workdir, config, EXCLUDED, added=ADDED, sections=ADDED_SECTIONS,
                               overwrite=overwrite)
    store = RowStore(out)  # generations.jsonl: resumable, dealt out to the hosts of a multi-host run
    resumed = len(runs.read_jsonl(store.path("generations")))
    with on_mesh(config) as mesh:
        # a finished run's re-run only rewrites the report: it loads no model
        model, tokenizer = load_on_mesh(config, mesh) if resumed < len(prompts) else (None, None)
        return _answer(config, out, store, prompts, resumed, model, tokenizer)


def _answer(config: ConfigDict, out: Path, store: RowStore, prompts: list[str], resumed: int, model, tokenizer
            ) -> Path:
    kwargs = dict(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, system_prompt=config.system_prompt or None,
        answer_prefix=config.answer_prefix or None, batch_size=config.batch_size,
    )

    def answer(records: list[Record], offset: int) -> list[dict]:
        # One seed per batch, so a resumed run samples what an uninterrupted one would.
        prompts = [r.prompt for r in records]
        return [{"prompt": p, "answer": a} for p, a in
                zip(prompts, generate(model, tokenizer, prompts, seed=config.seed + offset, **kwargs))]

    start = time.perf_counter()
    done = store.rows("generations", [Record(p) for p in prompts], answer, config.batch_size)
    seconds = time.perf_counter() - start
    # Each invocation's work, kept across re-runs (timing.jsonl): the report sums them.
    timing = out / "timing.jsonl"
    if hosts.is_main():
        with open(timing, "a") as f:
            f.write(json.dumps({"answered": len(prompts) - resumed, "seconds": round(seconds, 1)}) + "\n")
    hosts.sync("timing written")
    invocations = runs.read_jsonl(timing)
    worked = [i for i in invocations if i["answered"]]
    report = out / "report.md"
    lines = [
        "# generate", "",
        f"model `{config.model}`, dtype {config.dtype}, {len(prompts)} prompts, "
        f"max {config.max_new_tokens} new tokens, temperature {config.temperature}. "
        + (f"Answered in {sum(i['seconds'] for i in worked):.1f} s, compilation included ("
           + ", ".join(f"{i['answered']} prompts in {i['seconds']:.1f} s" for i in worked)
           + f"; {len(invocations)} invocation{'s' if len(invocations) > 1 else ''} of this workdir)."
           if sum(i["answered"] for i in worked) >= len(prompts) else
           f"{len(prompts) - sum(i['answered'] for i in worked)} of them answered before the timing was "
           "recorded."), "",
    ]
    for r in done:
        lines += [f"## {r['prompt']}", "", r["answer"], ""]
    if hosts.is_main():
        report.write_text("\n".join(lines))
    hosts.sync("generations written")
    print(f"Report: {report}")
    return report
