"""Sweep config: the explicit safety signal's lambda x decoding schedule x threshold on
``ssah-jax finetune`` (Li & Kim, ICML 2025, arXiv 2505.17072), each model evaluated after training with
its trained signal deployed (strategic decoding).

Each point aligns ``set.model`` with configs/signals.py's signal recipe (reproduce's alignment
data and steps, a linear ``[CLS]`` head, ``L_sft + lambda * L_cls``; the contrast answers of a
``ssah-jax signals`` run's contrast stage, ``runs/signals/contrast/generations.jsonl``: run
``ssah-jax signals --config=configs/signals.py:smollm2_cpu --config.stages=contrast
--workdir=runs/signals`` first), then measures ASR without
a system prompt, prefilling ASR (k = 10) and XSTest over-refusal under one schedule and
threshold. lambda changes the training; schedule and threshold only the decoding, so the points
of one lambda train the same model (each in its own workdir).

Presets (``ssah-jax sweep --config=configs/sweeps/signal.py:<preset> --workdir=DIR``):
  smollm2  the demo model: lambda 0.01 / 0.1 / 1 x schedules each / periodic x thresholds
           0.3 / 0.5 / 0.7 (18 points, each an alignment: a GPU job)
  tiny     2 lambdas x 2 schedules of finetune's quick preset on ``tiny-random`` (a random 2-layer
           model made on the fly), no contrast data (72 s on the 2-core development CPU, two points
           at a time)
"""

from pathlib import Path

from ssah_jax.data import substitute_component
from ssah_jax.runs import config_from_file
from ssah_jax.sweeps import sweep_config

PRESETS = ("smollm2", "tiny")
CONTRAST = "runs/signals/contrast/generations.jsonl"  # the contrast stage of `ssah-jax signals`


def get_config(preset: str = "smollm2") -> object:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/sweeps/signal.py (presets: {', '.join(PRESETS)})")
    tiny = preset == "tiny"
    signals = config_from_file(Path(__file__).parents[1] / "signals.py", "tiny" if tiny else "smollm2_cpu")
    a, s = signals.align, signals.signal
    c = sweep_config("finetune", "configs/finetune.py:quick" if tiny else "configs/finetune.py:smollm2")
    c.set.model = "tiny-random" if tiny else "smollm2-135m-instruct"
    c.set.data = dict(dataset=substitute_component(a.dataset, "contrast", "" if tiny else CONTRAST), heldout=a.heldout,
                      max_length=a.max_length)
    c.set.steps, c.set.batch_size = a.steps, a.batch_size
    c.set.optimizer = dict(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps)
    c.set.signal = dict(head=s.head, malicious=s.malicious, lr_scale=s.lr_scale, probe=s.probe)
    e = signals.evaluation
    c.set.evaluation = dict(
        tasks=("asr", "prefill", "overrefusal"), max_new_tokens=e.max_new_tokens,
        harmful=dict(dataset=e.harmful.dataset, exclude=e.harmful.exclude, limit=e.harmful.limit,
                     settings=("no_system",)),
        prefill=dict(limit=e.prefill.limit, tokens=(10,)), overrefusal=dict(limit=e.overrefusal.limit))
    if tiny:
        c.grid = dict(signal=dict(lam=(0.1, 1.0)), evaluation=dict(signal=dict(schedule=("each", "periodic"))))
    else:
        c.grid = dict(signal=dict(lam=(0.01, 0.1, 1.0)),
                      evaluation=dict(signal=dict(schedule=("each", "periodic"), threshold=(0.3, 0.5, 0.7))))
    c.metrics = dict(asr="eval/metrics.json:asr_no_system.asr", prefill_asr="eval/metrics.json:prefill_10.asr",
                     overrefusal="eval/metrics.json:overrefusal.refusal_rate")
    c.set.keep_checkpoints = 1  # each point keeps its export and one train state (disk)
    if tiny:  # a batch that splits over the tests' 8 fake devices; two points at a time (2 cores)
        c.set.batch_size = 8
        c.parallel = 2
    c.lock()
    return c
