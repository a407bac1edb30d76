"""Config for ``ssah-jax finetune``: supervised fine-tuning (response-only loss) with a freeze
setting, orbax checkpoints (re-running the command resumes) and an HF export.

Presets (``--config=configs/finetune.py:<preset>``):
  smollm2  the CPU preset: the demo model, 60 steps of batch 4 on alpaca_libre (256 tokens),
           held-out response loss on 64 examples every 20 steps, full fine-tuning
  quick    the demo model, a smoke test: 6 steps of batch 4 (128 tokens), 8 held-out examples (90 s
           on the 2-core development CPU)
  gpu      one GPU: bfloat16 compute (float32 master weights), batch 32, 1,000 steps
  llama2_7b_8gpu, llama3_8b_8gpu    the papers' models (Llama-2-7B-Chat, Llama-3-8B-Instruct: the
           hub id, or set ``model`` to your HF directory) on one 8 x 80 GB GPU host: 1,000 steps of
           8 x 2048 tokens, bfloat16 compute, FSDP over the 8 GPUs, scanned layers, remat ``dots``
  llama2_7b_v5e16, llama3_8b_v5e16  the same on a TPU v5e-16 slice (16 chips of 16 GB, 4 hosts:
           scripts/launch_tpu_pod.sh): 16 x 2048 tokens, FSDP over the 16 chips, remat ``full``
           (the settings ``ssah-jax plan`` says fit; docs/commands/plan.md)

``freeze.mode``:
  none        every parameter trains
  units       the units of ``freeze.units.selection`` in the unit map ``freeze.units.file``
              (an ``ssah-jax prune`` run's ``units.npz``) are frozen, e.g. ``SCU+CU:0.06``
              (SCU and the top 6% of CU, the paper's setting) or ``SCU+CU``;
              ``freeze.units.random=True`` freezes as many random units instead (the control)
  only_units  only the selected units train (e.g. ``RU``: the alignment budget)
  layers      the decoder layers ``freeze.layers`` ("i-j", inclusive) are frozen
  lora        the base model is frozen; LoRA adapters train and are merged into the export
  all         the whole model is frozen: only the safety signal trains (needs ``signal.head``;
              ``signal.cls_only`` sets it)
``freeze.groups``: any of ``embeddings``, ``norms``, ``head`` to freeze (the others train);
with ``only_units`` list all three to train nothing but the units.

``model_layout`` (how the trained model runs its layers; ``ssah_jax.models.Layout``):
  scan   False (default): one module per layer, a loop unrolled by jit: fastest on CPU and for
         small models such as the demo. True: the layers stacked on a ``layers`` axis and run
         by ``lax.scan``: compile time and program size independent of depth, for models of
         1B parameters and more on GPU / TPU. Masks, LoRA and the export are the same either
         way (built and saved in the unrolled layout); a workdir keeps the layout it started
         with (its checkpoints hold it).
  remat  none (default) | full | dots | dots_no_batch: which activations the backward pass
         recomputes instead of keeping (none: fastest; full: least memory; dots: keep matmul
         outputs, the usual choice for a large model that does not fit otherwise;
         dots_no_batch: keep only the weight matmuls). Speed and memory only: a run may resume
         with another value.
"""

from pathlib import Path

from ml_collections import ConfigDict

from ssah_jax.runs import config_from_file, set_values

LLAMA2_7B, LLAMA3_8B = "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Meta-Llama-3-8B-Instruct"
_LARGE = {"steps": 1000, "compute_dtype": "bfloat16", "data.heldout": 256, "data.max_length": 2048,
          "optimizer.warmup_steps": 50, "log_every": 10, "eval_every": 200, "checkpoint_every": 200,
          "model_layout.scan": True}
_8GPU = {**_LARGE, "batch_size": 8, "eval_batch_size": 8, "model_layout.remat": "dots"}
_V5E16 = {**_LARGE, "batch_size": 16, "eval_batch_size": 16, "model_layout.remat": "full"}

# name -> the keys it sets; the first is the default
PRESETS = {
    "smollm2": {},
    "quick": {"steps": 6, "batch_size": 4, "data.limit": 48, "data.heldout": 8, "data.max_length": 128,
              "optimizer.warmup_steps": 1, "log_every": 1, "eval_every": 3, "checkpoint_every": 2},
    "gpu": {"steps": 1000, "batch_size": 32, "compute_dtype": "bfloat16", "data.heldout": 256,
            "data.max_length": 512, "optimizer.warmup_steps": 50, "log_every": 10, "eval_every": 200,
            "eval_batch_size": 32, "checkpoint_every": 200},
    "llama2_7b_8gpu": {**_8GPU, "model": LLAMA2_7B},
    "llama3_8b_8gpu": {**_8GPU, "model": LLAMA3_8B},
    "llama2_7b_v5e16": {**_V5E16, "model": LLAMA2_7B},
    "llama3_8b_v5e16": {**_V5E16, "model": LLAMA3_8B},
}


def get_config(preset: str = "smollm2") -> ConfigDict:
    c = ConfigDict()
    c.model = "smollm2-135m-instruct"  # demo name, HF directory / repo id, .gguf, or a finetune workdir
    c.data_dir = ""  # empty: $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data (ssah-jax data fetch)
    c.seed = 0  # data order and LoRA initialisation
    c.data = ConfigDict(dict(
        # a dataset, or a mixture "name:count,name:count" (a component without a count: all of it)
        dataset="alpaca_libre",
        split="",  # empty: each dataset's first split
        limit=0,  # training examples in all (0: all but the held-out ones)
        heldout=64,  # each dataset's last examples, never trained on
        max_length=256,  # tokens per example (prompt and response in the chat template), longer ones cut
        system_prompt="",  # a system message rendered into every example ("": none)
    ))
    c.steps = 60  # optimizer steps (each of batch_size examples)
    c.batch_size = 4  # global, in examples
    c.accum_steps = 1  # micro-batches per step
    c.compute_dtype = "float32"  # float32 | bfloat16 (the master weights stay float32)
    # AdamW; schedule: cosine | linear | constant, after warmup_steps of linear warm-up, down to
    # end_fraction x learning_rate; clip_norm: the global gradient norm clipped to it (0: off)
    c.optimizer = ConfigDict(dict(
        learning_rate=2e-5, schedule="cosine", warmup_steps=6, end_fraction=0.0,
        weight_decay=0.0, clip_norm=1.0,
    ))
    c.freeze = ConfigDict(dict(
        mode="none",  # none | units | only_units | layers | lora | all
        # mode=units / only_units: the unit map (an ssah-jax prune run's units.npz), the kinds selected
        # from it, and random=True for as many random units instead (the control)
        units=ConfigDict(dict(file="", selection="SCU+CU:0.06", random=False)),
        layers="",  # "i-j" for mode=layers
        groups=(),  # embeddings / norms / head to freeze
        # mode=lora: the adapters' rank, scale alpha and target projections (raise the learning rate)
        lora=ConfigDict(dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))),
    ))
    # The explicit safety signal (Li & Kim 2025): "" (none) | linear | mlp head on a [CLS] slot,
    # trained with L_sft + lam * L_cls; malicious: the data.dataset components labelled 1;
    # lr_scale: the [CLS] embedding's and head's updates scaled (a fresh head on the model's
    # raw final states learns slowly at a fine-tuning learning rate); probe: start the head from a
    # linear probe on the unaligned model's [CLS] states of the training prompts, its L2 chosen on
    # the held-out examples (ssah_jax/signals/probe.py; needs data.heldout > 0);
    # recheck_windows > 0: [CLS] also learns the views the decoding's later checks get (rule 1:
    # the query and the first recheck_r1 answer tokens, labelled as the example; rule 2:
    # recheck_windows windows of recheck_r2 answer tokens, labelled by the answer: harmful
    # compliance 1, benign answers and refusals 0); compliant: a dataset spec of harmful prompts
    # with harmful compliant answers, learned by the classifier alone (label 1, no LM loss; the
    # answers the keyword judge calls refusals are dropped);
    # phase: sft (alignment: [CLS] sees the query) | pretrain (signal pre-training: [CLS] sees
    # every token, no token sees it); cls_only: the [CLS] loss alone and the model frozen whole
    # (no LM loss on harmful text; only the [CLS] embedding and head train); benign: a dataset
    # spec of benign prompts of other shapes the classifier also learns (label 0, no LM loss,
    # added after the class balance, and in the probe's fit), e.g. "gsm8k@train:200,mmlu@dev";
    # init: a directory with a signal.safetensors to start [CLS] and the head from (a signal
    # pre-training run's export; the probe, if on, refits the head's output layer on it); "": fresh
    c.signal = ConfigDict(dict(head="", lam=0.1, malicious=("bianchi_safety", "safety_refusals_short"),
                               lr_scale=1.0, probe=False, recheck_windows=0, recheck_r1=10, recheck_r2=10,
                               compliant="", phase="sft", cls_only=False, benign="", init=""))
    # Deep-alignment augmentation (Qi et al. 2024): the last `count` records of a harmful
    # question -> answer dataset, each answer cut after k ~ U[1, max_tokens] tokens and turned
    # into the refusal (only the refusal is learned); "" = none
    c.augment = ConfigDict(dict(
        dataset="", count=100, max_tokens=40,
        refusal="I'm sorry, but I cannot continue with this. I can't help with requests that could cause harm.",
    ))
    c.model_layout = ConfigDict(dict(scan=False, remat="none"))  # see the module docstring
    # After training, an ``ssah-jax evaluate`` of the export into <workdir>/eval (configs/evaluate.py's
    # keys, of its preset of the same name or gpu, but model, data_dir and signal.file: the export,
    # with its signal when signal.head is set); tasks empty = none
    c.evaluation = config_from_file(Path(__file__).with_name("evaluate.py"),
                                    preset if preset in ("smollm2", "quick") else "gpu", drop=("model", "data_dir"))
    with c.evaluation.unlocked():
        del c.evaluation.signal["file"]
    c.evaluation.tasks = ()
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the remaining devices (FSDP by default)
    c.log_every = 5  # steps between recorded training metrics (the metrics log, TensorBoard)
    c.eval_every = 20  # held-out loss (also before the first and after the last step)
    c.eval_batch_size = 8  # held-out examples scored together; only speed and memory
    c.checkpoint_every = 20  # steps between checkpoints (a killed run resumes from the last)
    c.keep_checkpoints = 2  # how many of the latest checkpoints stay on disk
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/finetune.py (presets: {', '.join(PRESETS)})")
    set_values(c, PRESETS[preset])
    c.lock()
    return c
