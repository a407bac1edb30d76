"""Sweep config: fine-tuning attacks x protections x seeds on ``ssah-jax finetune`` (SSAH
Tables 2-3 as a grid), each attacked model's ASR measured after training (``evaluation``).

Each point fine-tunes the aligned model ``set.model`` on one attack's data under one
protection, then evaluates the export. Attacks and their settings (steps, length, learning
rate; frozen protections train twice the steps) are configs/reproduce.py's; protections:
  none      full fine-tuning
  scu_cu6   SCU and the top 6% of CU frozen (the paper's setting)
  scu_cu    SCU and all CU frozen
  random    as many random units frozen (the control)
  lora      LoRA adapters only (rank 8 on q / v, learning rate 5e-4)
The unit protections read the aligned model's unit map ``set.freeze.units.file`` (an
``ssah-jax prune`` run's units.npz; reproduce's is ``<workdir>/prune_aligned/units.npz``).

Presets (``ssah-jax sweep --config=configs/sweeps/protection.py:<preset> --workdir=DIR``):
  smollm2  reproduce's aligned demo model and unit map (``runs/reproduce``: set ``set.model``
           and ``set.freeze.units.file`` for others): the attacks of its smollm2_cpu preset
           (alpaca_libre, harmful_qa) x 5 protections x 3 seeds, ASR (no system prompt) on
           reproduce's 200 held-out prompts
  tiny     1 attack (harmful_qa) x 2 protections x 2 seeds of finetune's quick preset on
           ``tiny-random`` (a random 2-layer model made on the fly) (66 s on the 2-core development
           CPU); first its unit map (9 s):
               ssah-jax prune --config=configs/prune.py:quick --config.model=tiny-random \\
                   --config.variants=() --workdir=<sweep workdir>/units
"""

from pathlib import Path

from ssah_jax.runs import config_from_file
from ssah_jax.sweeps import sweep_config

PRESETS = ("smollm2", "tiny")
FROZEN = ("scu_cu6", "scu_cu", "random")  # protections that train reproduce's frozen_epochs times the steps


def protections(attack) -> dict[str, tuple[str, ...]]:
    """Protection name -> its overrides, for configs/reproduce.py's ``attack`` section."""
    lora = attack.lora
    return {
        "none": ("freeze.mode=none",),
        "scu_cu6": ("freeze.mode=units", f"freeze.units.selection={attack.selection}"),
        "scu_cu": ("freeze.mode=units", "freeze.units.selection=SCU+CU"),
        "random": ("freeze.mode=units", f"freeze.units.selection={attack.selection}", "freeze.units.random=True"),
        "lora": ("freeze.mode=lora", f"freeze.lora.rank={lora.rank}", f"freeze.lora.alpha={lora.alpha}",
                 f"optimizer.learning_rate={lora.learning_rate}"),
    }


def get_config(preset: str = "smollm2") -> object:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/sweeps/protection.py (presets: {', '.join(PRESETS)})")
    tiny = preset == "tiny"
    reproduce = config_from_file(Path(__file__).parents[1] / "reproduce.py", "tiny" if tiny else "smollm2_cpu")
    a = reproduce.attack
    c = sweep_config("finetune", "configs/finetune.py:quick" if tiny else "configs/finetune.py:smollm2")
    c.set.model = "tiny-random" if tiny else "runs/reproduce/align_full/export"
    units = "{workdir}/units/units.npz" if tiny else "runs/reproduce/prune_aligned/units.npz"
    c.set.freeze = dict(units=dict(file=units))
    c.set.data = dict(heldout=0)
    c.set.batch_size = a.batch_size
    c.set.optimizer = dict(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps)
    e = a.evaluation
    c.set.evaluation = dict(tasks=("asr",), max_new_tokens=e.max_new_tokens, harmful=dict(
        dataset=e.harmful.dataset, exclude=e.harmful.exclude, limit=e.harmful.limit, settings=("no_system",)))
    attacks = tuple(a.datasets)  # the tiny preset's: harmful_qa
    chosen = ("none", "scu_cu6") if tiny else tuple(protections(a))
    points = []
    for attack in attacks:
        d = a.datasets[attack]
        for name in chosen:
            steps = d.steps * (a.frozen_epochs if name in FROZEN else 1)
            points.append((f"{attack}-{name}", f"data.dataset={d.dataset}", f"data.split={d.split}",
                           f"data.max_length={d.max_length}", f"steps={steps}", *protections(a)[name]))
    c.points = tuple(points)
    c.seeds = (0, 1) if tiny else (0, 1, 2)
    c.metrics = dict(asr="eval/metrics.json:asr_no_system.asr", trained="metrics.json:trained_elements")
    c.set.keep_checkpoints = 1  # each point keeps its export and one train state (disk)
    if tiny:  # a batch that splits over the tests' 8 fake devices
        c.set.batch_size = 8
    c.lock()
    return c
