"""Config for ``ssah-jax generate``: answer prompts with a model.

Presets (``--config=configs/generate.py:<preset>``):
  smollm2  the demo model on CPU, fp32, 128 new tokens (default)
  quick    the demo model, 16 new tokens: a smoke test (20 s on the 2-core development CPU)
  gpu      the demo model in bfloat16, batch 64 (one GPU)
"""

from ml_collections import ConfigDict

from ssah_jax.runs import set_values

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
)
# name -> the keys it sets; the first is the default
PRESETS = {
    "smollm2": {},
    "quick": {"max_new_tokens": 16},
    "gpu": {"dtype": "bfloat16", "batch_size": 64, "mesh.data": -1},
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
    c.prompts = DEFAULT_PROMPTS  # used when prompts_file is empty
    c.prompts_file = ""  # text file (one prompt per line) or JSONL with a "prompt" field
    # or the prompts of a kit dataset or mixture ("benign_contrast:224"; the kit is
    # $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data: ssah-jax data fetch), used when set; generations.jsonl then serves as
    # training data (a mixture component "<workdir>/generations.jsonl")
    c.prompts_dataset = ""
    c.system_prompt = ""  # empty: none
    c.answer_prefix = ""  # prefilling attack: force the answer to start with this
    c.max_new_tokens = 128  # the length of each answer, at most
    c.temperature = 0.0  # 0: greedy
    c.top_k = 0  # 0: off
    c.top_p = 1.0  # 1.0: off
    c.seed = 0  # sampling seed (each batch draws from seed + its first prompt's index)
    c.batch_size = 8  # prompts decoded together; only speed and memory
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/generate.py (presets: {', '.join(PRESETS)})")
    set_values(c, PRESETS[preset])
    c.lock()
    return c
