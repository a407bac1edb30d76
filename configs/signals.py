"""Config for ``ssah-jax signals``: explicit safety signals (Li & Kim, ICML 2025) against plain
and augmented safety alignment, on one model, in stages, into one report.

Stages (``stages``; each resumes, a finished one is kept):
  contrast         the unaligned model's answers to benign prompts that sound harmful (reproduce's
                   contrast stage, ``contrast``): the ``contrast`` component of ``align.dataset``
  compliant        the unaligned model's answers to the alignment's harmful prompts (``compliant``):
                   the ``compliant`` component of ``signal.compliant`` and ``pretrain.dataset``; run
                   only where one names it
  pretrain_signal  signal pre-training (``pretrain``; run only with pretrain.steps > 0): align_signal
                   starts its [CLS] and head from it
  align_sft        plain safety alignment: full-parameter SFT on ``align`` (reproduce's align_full data and steps)
  align_augmented  the same, plus the deep-alignment augmentation of Qi et al. 2024 (``augment``)
  align_signal     the same data and steps with the explicit safety signal trained alongside (``signal``)
  eval_sft, eval_augmented
                   attacks (direct with / without the safety system prompt, prefilling with each k
                   of evaluation.prefill.tokens, the decoding sweep) and costs (over-refusal, MMLU,
                   SST-2, GSM8K, perplexity) of the two baselines (``evaluation``)
  eval_signal      the signal model under each schedule of ``decoding.schedules`` (one run each, in
                   eval_signal/<schedule>; the log-likelihood tasks, which no schedule changes,
                   only under the first)
  classifier       p(malicious) of held-out harmful vs benign prompts and of XSTest unsafe vs safe:
                   AUROC, accuracy at the threshold
  attack           reproduce's fine-tuning attacks (``attack.datasets``, each once per seed of
                   ``attack.seeds``) on each aligned model, then its ASR (the signal model attacked
                   in its weights, deployed with its trained signal): attack/<model>/<attack>/seed<k>
  report           ``report_dir``/REPORT.md with the paper's numbers beside ours, plots, verdicts

Presets (``--config=configs/signals.py:<preset>``):
  smollm2_cpu  the demo model on a 2-core CPU, small evaluation sets (stage times: docs/results/signals.md)
  gpu          the demo model on one GPU: reproduce's GPU alignment, larger sets, bfloat16
  tiny         a smoke test of the wiring on ``tiny-random`` (a random 2-layer model made on the fly;
               its answers are noise): a few steps and prompts per stage (76 s on the 2-core
               development CPU)
  llama2_7b_8gpu, llama3_8b_8gpu, llama2_7b_v5e16, llama3_8b_v5e16
               the papers' models at full size, as configs/reproduce.py's presets of these names
"""

from pathlib import Path

from ml_collections import ConfigDict

from ssah_jax.runs import config_from_file, set_values

HERE = Path(__file__).parent
# the first is the default
PRESETS = ("smollm2_cpu", "gpu", "tiny", "llama2_7b_8gpu", "llama3_8b_8gpu", "llama2_7b_v5e16",
           "llama3_8b_v5e16")
# never evaluated on: the alignment's and the harmful attack's prompts (configs/reproduce.py's)
TRAINED_HARMFUL = "safety_refusals_short,bianchi_safety,harmful_qa:100"
HELDOUT_HARMFUL = "advbench:100,harmbench_standard:100"  # 200 prompts, as configs/reproduce.py's


def get_config(preset: str = "smollm2_cpu") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/signals.py (presets: {', '.join(PRESETS)})")
    large = preset.startswith("llama")  # configs/finetune.py's preset of the same name trains
    gpu = preset == "gpu" or large
    c = ConfigDict()
    # the unaligned model: a registered name (the demo model; tiny-random: made on the fly), an HF
    # directory or hub id, a .gguf
    c.model = "tiny-random" if preset == "tiny" else "smollm2-135m-instruct"
    c.dtype = "bfloat16" if gpu else "float32"  # evaluation; training uses finetune.compute_dtype
    # where every stage but training runs (training: finetune.mesh, over every host's devices):
    # this host's devices as copies of the model (data) x FSDP x tensor parallel; -1 takes the
    # rest (the GPU presets: data=-1, a copy per device). Only speed and memory: tensor must
    # divide the heads, kv heads, vocabulary and MLP width
    c.mesh = ConfigDict(dict(data=-1 if gpu else 1, fsdp=1, tensor=1))
    c.data_dir = ""  # empty: $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data (ssah-jax data fetch)
    c.seed = 0  # every stage's seed (the attacks add their own, attack.seeds)
    c.stages = ("all",)  # or a subset, e.g. --config.stages=align_signal,eval_signal
    # REPORT.md and its plots: <workdir>/report when empty; the CPU preset writes the committed
    # results (experiments/results/signals_smollm2, relative to the checkout)
    c.report_dir = (str(HERE.parent / "experiments" / "results" / "signals_smollm2") if preset == "smollm2_cpu"
                    else "")
    c.jax_cache = True  # persistent compilation cache in <workdir>/jax_cache
    # A workdir of `ssah-jax reproduce` (finished or not; relative to the working directory, as
    # --workdir): its finished stages of the same identity as one of ours (the contrast data, and
    # align_full = align_sft: same data, steps and seed) are copied instead of computed again;
    # "" or a missing directory: none. The CPU preset reads the reproduce workdir of
    # docs/commands/reproduce.md.
    c.reuse = "runs/reproduce" if preset == "smollm2_cpu" else ""

    # The alignment of configs/reproduce.py (align_full): harmful prompts -> refusals (labelled
    # malicious) and benign instructions (benign), rendered in the model's chat template
    reproduce = config_from_file(HERE / "reproduce.py", preset if large else "smollm2_gpu" if gpu else
                                 "tiny" if preset == "tiny" else "smollm2_cpu")
    # align_*: reproduce's align_full data and SFT settings (configs/reproduce.py's align, but ru_epochs)
    c.align = ConfigDict({k: v for k, v in reproduce.align.items() if k != "ru_epochs"})
    c.contrast = reproduce.contrast  # the contrast stage (configs/reproduce.py's)
    c.signal = ConfigDict(dict(
        head="linear",  # linear | mlp, on [CLS]'s final hidden state
        lam=0.1,  # L_sft + lam * L_cls (the paper: 0.1, or 0.01)
        malicious=("bianchi_safety", "safety_refusals_short"),  # align.dataset components labelled 1
        # The head starts from a linear probe on the unaligned model's [CLS] states (its L2 chosen
        # on align.heldout), then trains alongside at the alignment's learning rate. A head from
        # scratch stays near chance at that rate (AUROC 0.42 on held-out prompts,
        # experiments/results/signals_smollm2 of 97f2324); at 30x it learned on one CPU (0.89, the
        # report of 9ada4a3) and not on another with the same code and config (0.69): the outcome
        # hung on the trajectory of 56 small batches. The probe is a convex fit.
        probe=True,
        lr_scale=1.0,  # the head's learning rate, times the alignment's
        # > 0: [CLS] also learns the views of the decoding's later checks (rule 1 and this many
        # rule-2 windows, of decoding.r1 / r2 answer tokens; configs/finetune.py's signal.recheck_*)
        recheck_windows=0,
        # harmful prompts with compliant answers for the classifier alone (a dataset spec; its
        # component "compliant" is the compliant stage's answers, e.g. "compliant")
        compliant="",
        benign="",  # benign prompts of other shapes for the classifier alone, e.g. "gsm8k@train:200,mmlu@dev"
    ))
    # the compliant stage (run when signal.compliant or pretrain.dataset names "compliant"): the
    # unaligned model's own answers to the alignment's harmful prompts (refusals are left out
    # where they are used)
    c.compliant = ConfigDict(dict(prompts="bianchi_safety:160"))
    c.compliant.generate = config_from_file(HERE / "generate.py", "gpu" if gpu else "smollm2", drop=(
        "model", "dtype", "prompts", "prompts_file", "prompts_dataset", "mesh"))
    set_values(c.compliant.generate, {"max_new_tokens": 64, "batch_size": 64 if gpu else 16})
    # pretrain_signal (steps > 0): signal pre-training of the unaligned model's [CLS] and head on
    # labelled text ([CLS] sees every token; the [CLS]-only loss, the model frozen), where
    # align_signal then starts from; malicious: the dataset's components labelled unsafe
    c.pretrain = ConfigDict(dict(
        steps=0, dataset="compliant,harmful_qa:-100,alpaca_libre:260", malicious=("compliant", "harmful_qa"),
        lam=1.0, lr_scale=30.0,  # the [CLS]-only loss: lam only scales it; the head's rate, times align's
    ))
    # align_augmented: the deep-alignment augmentation of Qi et al. 2024 added to align's data
    c.augment = ConfigDict(dict(
        # the last `count` harmful_qa records (the attack takes the first ones): answers starting
        # with k ~ U[1, max_tokens] harmful tokens, then the refusal
        dataset="harmful_qa", count=100, max_tokens=40,
        refusal="I'm sorry, but I cannot continue with this. I can't help with requests that could cause harm.",
    ))
    c.decoding = ConfigDict(dict(
        schedules=("each", "first", "periodic", "annealing"),  # the first also runs the log-likelihood tasks
        # a check is malicious when p(malicious) > threshold; period: steps between checks (periodic,
        # annealing); what [CLS] sees: the first r1 answer tokens after a malicious first check, else the
        # latest r2, and r3 past a benign-to-malicious turn; tau: malicious checks in a row that refuse
        # (strategic decoding: ssah_jax.signals.decoding)
        threshold=0.5, period=10, r1=10, r2=10, r3=10, tau=3,
    ))
    # eval_*: an ssah-jax evaluate config without its model keys (the signal's are decoding's)
    c.evaluation = config_from_file(HERE / "evaluate.py", "gpu" if gpu else "smollm2",
                                    drop=("model", "dtype", "data_dir", "signal", "mesh"))
    set_values(c.evaluation, {
        "tasks": ("asr", "prefill", "sweep", "overrefusal", "mmlu", "sst2", "gsm8k", "perplexity"),
        "max_new_tokens": 32, "harmful.dataset": HELDOUT_HARMFUL,
        "harmful.exclude": TRAINED_HARMFUL, "harmful.limit": 0,
        # every held-out AdvBench prompt (its targets are the prefixes): 159
        "prefill.dataset": "advbench", "prefill.limit": 0, "prefill.tokens": (5, 10, 20, 40),
        # the decoding attack of Huang et al. 2023 on the held-out set (its own benchmark,
        # MaliciousInstruct, chose the alignment recipe: a validation set)
        "sweep.dataset": HELDOUT_HARMFUL, "sweep.limit": 0, "sweep.temperatures": (0.7, 1.0),
        "sweep.top_ps": (0.9,), "overrefusal.limit": 100, "mmlu.limit": 200, "sst2.limit": 200,
        "gsm8k.limit": 30, "gsm8k.max_new_tokens": 192, "perplexity.limit": 100,
    })
    c.classifier = ConfigDict(dict(
        harmful_limit=0,  # the held-out harmful prompts of evaluation.harmful (0: all)
        benign="alpaca_instructions",  # benign prompts never trained on: its last ones
        benign_limit=96,
        xstest=True,  # also XSTest's unsafe vs safe prompts
        batch_size=8,  # prompts per forward pass
    ))
    # reproduce's fine-tuning attacks, seeds and their evaluation (the same attacks on every method:
    # ``ssah-jax compare`` sets these models beside reproduce's protections)
    r = reproduce.attack
    # the attack stage: the fine-tuning attacks on each aligned model
    c.attack = ConfigDict(dict(datasets=r.datasets, seeds=r.seeds, batch_size=r.batch_size,
                               learning_rate=r.learning_rate, warmup_steps=r.warmup_steps))
    c.attack.evaluation = r.evaluation
    with c.attack.evaluation.unlocked():
        del c.attack.evaluation["signal"]  # each attack run's evaluation sets its own
    # Every training run starts from this configs/finetune.py config
    c.finetune = config_from_file(HERE / "finetune.py", preset if large else "gpu" if gpu else "smollm2")
    if large:
        c.model = c.finetune.model

    if gpu:
        set_values(c.evaluation, {"harmful.dataset": "advbench,harmbench_standard", "prefill.limit": 0,
                                  "sweep.limit": 0, "sweep.temperatures": (0.5, 0.7, 1.0),
                                  "sweep.top_ps": (0.7, 0.9, 1.0), "overrefusal.limit": 0, "mmlu.limit": 0,
                                  "sst2.limit": 0, "gsm8k.limit": 0, "gsm8k.max_new_tokens": 256,
                                  "perplexity.limit": 500, "max_new_tokens": 64})
        set_values(c, {"classifier.benign_limit": 512, "classifier.batch_size": 64,
                       "evaluation.sweep.dataset": "advbench,harmbench_standard"})
    elif preset == "smollm2_cpu":
        c.evaluation.batch_size = c.attack.evaluation.batch_size  # reproduce's CPU evaluation batch
    elif preset == "tiny":
        set_values(c, {
            "align.max_length": 128, "augment.count": 4, "decoding.schedules": ("each", "periodic"),
            "classifier.harmful_limit": 4, "classifier.benign_limit": 4, "attack.seeds": (0,),
            "finetune.eval_batch_size": 2, "finetune.log_every": 1,
        })
        small = {"max_new_tokens": 2, "harmful.dataset": "advbench:2,harmbench_standard:2", "batch_size": 4}
        for section in (c.evaluation, c.attack.evaluation):
            set_values(section, small)
        set_values(c.evaluation, {"prefill.limit": 2, "prefill.tokens": (5, 10), "sweep.limit": 2,
                                  "sweep.temperatures": (1.0,), "overrefusal.limit": 2, "mmlu.limit": 4,
                                  "sst2.limit": 4, "gsm8k.limit": 2, "gsm8k.max_new_tokens": 2,
                                  "perplexity.limit": 2, "perplexity.max_length": 64})
    if preset.endswith("_v5e16"):  # a v5e host's 4 chips of 16 GB hold the bf16 weights split over heads
        set_values(c, {"mesh.data": 1, "mesh.tensor": 4})
        for section in (c.evaluation, c.attack.evaluation, c.classifier):  # (Llama-2-7B's: the 8 of its first runs)
            section.batch_size = 32 if preset.startswith("llama3") else 8
    c.lock()
    return c
