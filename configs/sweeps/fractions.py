"""Sweep config: the SSAH fraction rule (Li & Kim, arXiv 2410.10862; docs/results/fractions.md) on ``ssah-jax prune``.

Each kind's pruned fraction is raised while the attribute it should not touch stays within a
limit of the dense model: SCU while perplexity on held-out benign responses grows by at most
10% (utility), UCU while ASR rises by at most 7.5 points (safety), RU while neither moves (both).
Every point prunes one kind at one fraction (the others at the paper's Llama-2-7B-Chat values,
which only decide which units are left for the later kinds: SCU are taken first, then UCU, then
RU); the points share one set of unit scores (``attribution.cache_dir``). ``report.md`` ends
with the chosen fractions (``selected.json``), the largest before the first past a limit.

Presets (``ssah-jax sweep --config=configs/sweeps/fractions.py:<preset> --workdir=DIR``):
  smollm2  the demo model (give an aligned one with ``--config.set.model=<HF directory>``, e.g.
           runs/reproduce/align_full/export): 25 points (dense; SCU 0.05-3%; UCU 0.5-20%; RU 0.5-30%),
           ASR without system prompt on 128 held-out harmful prompts (32 new tokens) and
           perplexity on 100 held-out alpaca_libre responses; limit +0.075 ASR is two standard
           errors of a difference of two ~10% rates on 128 prompts
  qwen     Qwen2.5-Coder-0.5B-Instruct, aligned by its makers (qwen2.5-coder-0.5b-instruct): 16
           points (dense; SCU 0.05-2%; UCU 0.5-13.3%; RU 0.5-14.8%) on the same sets as smollm2
           (its makers' alignment data is unknown: no prompt is excluded beyond smollm2's)
  tiny     4 points of ``prune``'s quick preset on ``tiny-random`` (a random 2-layer model made on
           the fly) (52 s on the 2-core development CPU)
"""

from ssah_jax.sweeps import sweep_config

PRESETS = ("smollm2", "qwen", "tiny")
TRAINED_HARMFUL = "safety_refusals_short,bianchi_safety"  # configs/reproduce.py's alignment data


def _point(kind: str, fraction: float) -> tuple[str, ...]:
    return (f"kinds.{kind.lower()}={fraction}", f"variants=minus_{kind}")


def get_config(preset: str = "smollm2") -> object:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/sweeps/fractions.py (presets: {', '.join(PRESETS)})")
    tiny = preset == "tiny"
    c = sweep_config("prune", "configs/prune.py:quick" if tiny else "configs/prune.py:smollm2")
    c.set.model = {"qwen": "qwen2.5-coder-0.5b-instruct", "tiny": "tiny-random"}.get(preset, "smollm2-135m-instruct")
    c.set.attribution = dict(cache_dir="{workdir}/scores")
    c.set.evaluation = dict(tasks=("asr", "perplexity"), harmful=dict(settings=("no_system",)))
    if tiny:
        grid = {"SCU": (0.01, 0.02), "UCU": (0.05,), "RU": ()}
    else:
        c.set.evaluation.harmful.dataset = "advbench:64,harmbench_standard:64"
        c.set.evaluation.harmful.exclude = TRAINED_HARMFUL
        c.set.evaluation.harmful.limit = 0
        # from a few dozen units (0.05% of SmolLM2's 63,360) up past the paper's 7B values
        grid = {"SCU": (0.0005, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.013, 0.02, 0.03),
                "UCU": (0.005, 0.01, 0.02, 0.05, 0.1, 0.133, 0.2),
                "RU": (0.005, 0.01, 0.02, 0.05, 0.1, 0.148, 0.2, 0.3)}
        if preset == "qwen":  # about 4 times SmolLM2's compute per point: the grid thinned
            grid = {"SCU": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02), "UCU": (0.005, 0.02, 0.05, 0.133),
                    "RU": (0.005, 0.01, 0.02, 0.05, 0.148)}
    c.points = (("dense", "variants=dense"),) + tuple(_point(k, f) for k, fs in grid.items() for f in fs)
    c.metrics = dict(asr="*.asr_no_system.asr", perplexity="*.perplexity.perplexity")
    asr_limit = "+0.075"
    c.select = dict(
        SCU=dict(key="kinds.scu", baseline="dense", limits=dict(perplexity="x1.10")),
        UCU=dict(key="kinds.ucu", baseline="dense", limits=dict(asr=asr_limit)),
        RU=dict(key="kinds.ru", baseline="dense", limits=dict(perplexity="x1.10", asr=asr_limit)),
    )
    if tiny:
        del c.select["RU"]
    c.lock()
    return c
