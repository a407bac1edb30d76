"""Config for ``ssah-jax compare``: one comparison of the defences of ``ssah-jax reproduce`` and
``ssah-jax signals`` under the same attacks, from their finished workdirs (it trains and
evaluates nothing).

Methods: no protection, SSAH freezing (SCU + top 6% CU, SCU + all CU), the random-units
control and LoRA (reproduce's attack runs); plain SFT, safety data augmentation and the explicit
safety signal (signals' models and attack runs). Attacks: reproduce's fine-tuning attacks with
its seeds (signals runs the same ones on its models), and the prefilling attack (signals'
``evaluation.prefill.tokens``). Both workdirs must share the model, the alignment recipe and
the attacks (a difference is refused, naming the keys).

Presets (``--config=configs/compare.py:<preset>``):
  smollm2  runs/reproduce and runs/signals of the smollm2_cpu presets; writes the committed
           experiments/results/compare
  tiny     for tests: set ``reproduce`` and ``signals`` to finished workdirs
"""

from pathlib import Path

from ml_collections import ConfigDict

HERE = Path(__file__).parent
PRESETS = ("smollm2", "tiny")  # the first is the default


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/compare.py (presets: {', '.join(PRESETS)})")
    c = ConfigDict()
    c.reproduce = "runs/reproduce"  # a finished `ssah-jax reproduce` workdir (not a maker-aligned model)
    c.signals = "runs/signals"  # a finished `ssah-jax signals` workdir of the same model and attacks
    # REPORT.md, compare.png and numbers.json: <workdir>/report when empty
    c.report_dir = str(HERE.parent / "experiments" / "results" / "compare") if preset == "smollm2" else ""
    c.lock()
    return c
