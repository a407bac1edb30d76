"""Config for ``ssah-jax compare``: one comparison of the defences of ``ssah-jax reproduce`` and
``ssah-jax signals`` under the same attacks, from their reports (it trains and evaluates
nothing, and needs neither workdir).

Methods: no protection, SSAH freezing (SCU + top 6% CU, SCU + all CU), the random-units
control and LoRA (reproduce's attack runs); plain SFT, safety data augmentation and the explicit
safety signal (signals' models and attack runs). Attacks: reproduce's fine-tuning attacks with
its seeds (signals runs the same ones on its models), and the prefilling attack (signals'
``evaluation.prefill.tokens``). ``reproduce`` and ``signals`` are report directories (a
pipeline's ``config.report_dir``, or ``<workdir>/report``): the ``config.json`` and
``numbers.json`` each run writes beside its ``REPORT.md``. Both runs must share the model, the
alignment recipe and the attacks (a difference is refused, naming the keys).

Presets (``--config=configs/compare.py:<preset>``):
  smollm2  the committed reports of the smollm2_cpu presets (experiments/results/smollm2 and
           experiments/results/signals_smollm2); writes the committed experiments/results/compare
  tiny     for tests: set ``reproduce`` and ``signals`` to report directories
"""

from pathlib import Path

from ml_collections import ConfigDict

RESULTS = Path(__file__).parent.parent / "experiments" / "results"
PRESETS = ("smollm2", "tiny")  # the first is the default


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/compare.py (presets: {', '.join(PRESETS)})")
    smollm2 = preset == "smollm2"
    c = ConfigDict()
    # the report directory of an `ssah-jax reproduce` run (not of a maker-aligned model)
    c.reproduce = str(RESULTS / "smollm2") if smollm2 else ""
    # the report directory of an `ssah-jax signals` run of the same model and attacks
    c.signals = str(RESULTS / "signals_smollm2") if smollm2 else ""
    # REPORT.md, compare.png and numbers.json: <workdir>/report when empty
    c.report_dir = str(RESULTS / "compare") if smollm2 else ""
    c.lock()
    return c
