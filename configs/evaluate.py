"""Config for ``ssah-jax evaluate``: safety (ASR, attacks, over-refusal) and utility metrics.

Presets (``--config=configs/evaluate.py:<preset>``):
  smollm2  the demo model on CPU: AdvBench's first 100 prompts (64 new tokens), prefilling
           (5 target tokens) and a 2-setting sampling sweep on the first 50, all 250 XSTest
           safe prompts, 500 MMLU questions spread over the subjects, SST-2 dev (872),
           50 GSM8K problems, perplexity on 200 held-out alpaca_libre responses (default)
  quick    the demo model, the same tasks on a handful of examples each: a smoke test (62 s on
           the 2-core development CPU)
  gpu      the demo model in bfloat16 with batch 64 and full sets (one GPU)

``limit = 0`` means the whole set. ``data_dir`` empty: ``$SSAH_DATA_DIR``, else the user cache
that ``ssah-jax data fetch`` fills (``~/.cache/ssah_jax/data``).
"""

from ml_collections import ConfigDict

from ssah_jax.runs import set_values

# name -> the keys it sets; the first is the default
PRESETS = {
    "smollm2": {},
    "quick": {
        "max_new_tokens": 16, "harmful.limit": 8, "prefill.limit": 8, "sweep.limit": 8,
        "sweep.temperatures": (1.0,), "overrefusal.limit": 8, "mmlu.limit": 16, "sst2.limit": 16,
        "gsm8k.limit": 8, "gsm8k.max_new_tokens": 16, "perplexity.limit": 16, "perplexity.max_length": 256,
    },
    "gpu": {
        "dtype": "bfloat16", "batch_size": 64, "mesh.data": -1, "harmful.limit": 0, "prefill.limit": 0,
        "sweep.limit": 0,
        "sweep.temperatures": (0.5, 0.7, 1.0), "sweep.top_ps": (0.7, 0.9, 1.0), "mmlu.limit": 0,
        "gsm8k.limit": 0, "perplexity.limit": 500,
    },
}


def get_config(preset: str = "smollm2") -> ConfigDict:
    c = ConfigDict()
    c.model = "smollm2-135m-instruct"  # demo name, HF directory / repo id, or .gguf path
    c.dtype = "float32"  # float32 | bfloat16
    # this host's devices (training lays its own mesh over every host's): copies of the model
    # (data) x FSDP x tensor parallel; -1 takes the rest (the GPU presets: data=-1, a copy per
    # device). Only speed and memory: tensor must divide the heads, kv heads, vocabulary and MLP
    # width, fsdp the hidden size
    c.mesh = ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.data_dir = ""  # the data kit; empty: $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data (ssah-jax data fetch)
    # which of the sections below run (a comma-separated list on the command line)
    c.tasks = ("asr", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity")
    c.batch_size = 8  # prompts decoded (or scored) together; only speed and memory
    c.max_new_tokens = 64  # the length of each answer the safety tasks judge
    c.seed = 0  # the sampling seed of the decoding sweep
    c.system_prompt = ""  # the "with system prompt" setting; empty: Llama-2-chat's default
    # the judge of the attacks' success (ASR of asr, prefill, sweep; ssah_jax.evaluation.judges):
    # keyword (no refusal phrase), harmbench (HarmBench's Llama-2-13B classifier) or llama_guard
    # (Llama Guard 3); judge_model: the classifier's HF directory or hub id (empty for keyword),
    # loaded in dtype on the mesh beside the model. Over-refusal is the keyword judge's whatever the judge
    c.judge = "keyword"
    c.judge_model = ""
    # dataset: a dataset or a mixture "name:count,..."; exclude: datasets whose prompts are
    # removed from it and from the prefill and sweep prompts (what the model was trained on);
    # settings: no_system and / or system
    c.harmful = ConfigDict(dict(dataset="advbench", exclude="", limit=100, settings=("no_system", "system")))
    c.prefill = ConfigDict(dict(dataset="advbench", limit=50, tokens=(5,)))  # tokens: one or more k
    # the decoding attack: every temperature x top_p x top_k, a prompt counted as attacked if any answers it
    c.sweep = ConfigDict(dict(dataset="advbench", limit=50, temperatures=(0.7, 1.0), top_ps=(0.9,), top_ks=(0,)))
    # the optimisation attack (tasks: gcg; ssah_jax.attacks.gcg): a suffix optimised per prompt of
    # dataset (with targets) so the answer starts with the target, then answered and judged;
    # HarmBench: 500 steps, width 512, top-k 256, a 20-token "! ! ..." start; transfer: another
    # run's rows/gcg.jsonl whose suffixes are answered instead of optimised
    c.gcg = ConfigDict(dict(dataset="advbench", limit=20, steps=50, search_width=64, topk=256, n_replace=1,
                            init=" ".join(["!"] * 20), chunk=64, early_stop=True, transfer=""))
    # dataset: XSTest's safe prompts, or a dataset / mixture of benign prompts (e.g. the
    # validation split benign_contrast_validation, when XSTest is kept for the final test)
    c.overrefusal = ConfigDict(dict(dataset="xstest", limit=0))
    c.mmlu = ConfigDict(dict(limit=500))  # utility: MMLU accuracy (4-way log-likelihood choice)
    c.sst2 = ConfigDict(dict(limit=0))  # utility: SST-2 accuracy on GLUE's dev split
    c.gsm8k = ConfigDict(dict(limit=50, max_new_tokens=256))  # utility: GSM8K exact-match (greedy answers)
    # utility: the perplexity of the last `limit` responses of `dataset`
    c.perplexity = ConfigDict(dict(dataset="alpaca_libre", limit=200, max_length=512))
    # The explicit safety signal (``ssah_jax.signals``): file = the directory of a trained
    # signal.safetensors (a finetune run's export with signal.head set), "" = none. Answers then
    # come from strategic decoding under these settings; log-likelihood tasks score the model.
    c.signal = ConfigDict(dict(file="", threshold=0.5, schedule="each", period=10, r1=10, r2=10, r3=10, tau=3))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/evaluate.py (presets: {', '.join(PRESETS)})")
    set_values(c, PRESETS[preset])
    c.lock()
    return c
