"""Config for ``ssah-jax prune``: SSAH attribution, unit kinds and the pruning table (paper
Table 1): the dense model, minus its SCU, minus UCU, minus RU, and minus as many random units
as there are SCU (control).

Presets (``--config=configs/prune.py:<preset>``):
  smollm2  the demo model on a CPU (44 min on 2 cores: docs/results/pruning.md): 128 safety + 128
           utility calibration samples; ASR on 100 AdvBench prompts (32 new tokens, with and
           without the safety system prompt), 200 MMLU, 200 SST-2, perplexity on 100 held-out
           responses, for each of the five models
  quick    the demo model, a smoke test on a handful of examples (95 s on the 2-core development CPU)
  gpu      one GPU, bfloat16: 512 + 512 calibration samples, full ASR / MMLU / SST-2 sets,
           GSM8K (the 7B setting of the paper: set ``model`` to a Llama-2-7B-Chat directory)
  llama2_7b_8gpu, llama3_8b_8gpu, llama2_7b_v5e16, llama3_8b_v5e16
           ``gpu`` on the papers' models (the hub id, or set ``model`` to your HF directory); the
           v5e presets split the bf16 weights over a host's 4 chips (``mesh.tensor=4``) and score
           32 at a time and decode 32 (Llama-3-8B) or 8 (Llama-2-7B, as its first runs did) at a
           time (``ssah-jax plan`` shows each bill)

Fractions default to the paper's Llama-2-7B-Chat values (SCU 1.3%, UCU 13.3%, RU 14.8%).
``evaluation`` is an ``ssah-jax evaluate`` config (see configs/evaluate.py) without its model
keys; its ``tasks`` may be any of asr, mmlu, sst2, gsm8k, perplexity, overrefusal, prefill, sweep.
"""

from pathlib import Path

from ml_collections import ConfigDict

from ssah_jax.runs import config_from_file, set_values

# the first is the default
PRESETS = ("smollm2", "quick", "gpu", "llama2_7b_8gpu", "llama3_8b_8gpu", "llama2_7b_v5e16", "llama3_8b_v5e16")


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/prune.py (presets: {', '.join(PRESETS)})")
    c = ConfigDict()
    c.model = "smollm2-135m-instruct"  # demo name, HF directory / repo id, or .gguf path
    c.dtype = "float32"  # float32 | bfloat16
    # this host's devices (training lays its own mesh over every host's): copies of the model
    # (data) x FSDP x tensor parallel; -1 takes the rest (the GPU presets: data=-1, a copy per
    # device). Only speed and memory: tensor must divide the heads, kv heads, vocabulary and MLP
    # width, fsdp the hidden size
    c.mesh = ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.data_dir = ""  # empty: $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data (ssah-jax data fetch)
    c.seed = 0  # the random control's draw
    c.attribution = ConfigDict(dict(
        scorer="wifv",  # wifv | wanda | snip
        tokens="response",  # response | prompt | all
        batch_size=8,  # calibration samples per forward / backward pass
        max_length=256,  # tokens per calibration sample
        # snip: one layer's gradient at a time (Wei et al. 2024), a pass per layer: the same scores,
        # for a model whose sharded gradient does not fit beside it
        snip_by_layer=False,
        # safety samples: harmful prompts with refusals (limit: how many, 0: all)
        safety=ConfigDict(dict(dataset="safety_refusals_short", limit=128)),
        # utility samples are the first status-ok rows (evaluate's perplexity holds out the last)
        utility=ConfigDict(dict(dataset="alpaca_libre", limit=128)),
        # a directory where runs share their scores (those of the same model, dtype and settings:
        # a sweep's points, configs/sweeps/fractions.py); "" = each workdir's own scores/
        cache_dir="",
    ))
    # the models evaluated; empty: the unit map only (no table)
    c.variants = ("dense", "minus_SCU", "minus_UCU", "minus_RU", "minus_random")
    # each kind's fraction of the units (SCU taken first, then UCU, then RU); ranking: global (over
    # the model) | per_layer (within each layer's attention / MLP block); normalise: layer_mean (each
    # block's scores divided by their mean before ranking) | none
    c.kinds = ConfigDict(dict(scu=0.013, ucu=0.133, ru=0.148, ranking="global", normalise="layer_mean"))
    gpu = preset == "gpu" or preset.startswith("llama")
    # each variant's evaluation: an ssah-jax evaluate config (configs/evaluate.py) without its model keys
    c.evaluation = config_from_file(Path(__file__).with_name("evaluate.py"), "gpu" if gpu else "smollm2",
                                    drop=("model", "dtype", "data_dir", "mesh"))
    c.evaluation.tasks = ("asr", "mmlu", "sst2", "perplexity")
    if preset == "smollm2":
        set_values(c, {
            "evaluation.max_new_tokens": 32, "evaluation.mmlu.limit": 200, "evaluation.sst2.limit": 200,
            "evaluation.perplexity.limit": 100,
        })
    elif preset == "quick":
        set_values(c, {
            "attribution.safety.limit": 16, "attribution.utility.limit": 16, "attribution.max_length": 128,
            "evaluation.max_new_tokens": 8, "evaluation.harmful.limit": 8, "evaluation.mmlu.limit": 8,
            "evaluation.sst2.limit": 8, "evaluation.perplexity.limit": 8, "evaluation.perplexity.max_length": 128,
        })
    else:
        set_values(c, {
            "dtype": "bfloat16", "mesh.data": -1, "attribution.batch_size": 32, "attribution.safety.limit": 512,
            "attribution.utility.limit": 512, "evaluation.tasks": ("asr", "mmlu", "sst2", "gsm8k", "perplexity"),
        })
    if preset.startswith("llama"):
        c.model = config_from_file(Path(__file__).with_name("finetune.py"), preset).model
    if preset.endswith("_v5e16"):  # a v5e host's 4 chips of 16 GB hold the bf16 weights split over heads
        # (Llama-2-7B decodes the 8 of its first runs: the batch size determines sampled answers)
        set_values(c, {"mesh.data": 1, "mesh.tensor": 4, "attribution.batch_size": 32,
                       "evaluation.batch_size": 32 if preset.startswith("llama3") else 8})
    c.lock()
    return c
