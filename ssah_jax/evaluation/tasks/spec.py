"""The typed settings of an evaluation: the keys of ``configs/evaluate.py`` (or of an evaluation
section of a larger config), typed once at an experiment's edge
(``experiments.evaluate.evaluation_spec``). The tasks read only these; their field names are
the config's keys, so an error can name the key (``config.harmful.dataset``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Harmful:
    """The ASR prompts: ``dataset`` (a dataset or a mixture ``"name:count,..."``) without the
    prompts of ``exclude`` (what the model was trained on), the first ``limit`` (0: all),
    answered in each of ``settings`` (``no_system`` / ``system``)."""

    dataset: str
    exclude: str
    limit: int
    settings: tuple[str, ...]


@dataclass(frozen=True)
class Prefill:
    """The prefilling attack: ``limit`` prompts of ``dataset``, the answer forced to start with
    each k of ``tokens`` tokens of the target."""

    dataset: str
    limit: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Sweep:
    """The decoding attack: ``limit`` prompts of ``dataset`` under every sampling setting of the
    grid ``temperatures`` x ``top_ps`` x ``top_ks``."""

    dataset: str
    limit: int
    temperatures: tuple[float, ...]
    top_ps: tuple[float, ...]
    top_ks: tuple[int, ...]


@dataclass(frozen=True)
class Overrefusal:
    """The refusal rate on ``limit`` safe prompts of ``dataset`` (XSTest's, or benign prompts)."""

    dataset: str
    limit: int


@dataclass(frozen=True)
class Limit:
    """A task of a fixed dataset (MMLU, SST-2): how many of its questions (0: all)."""

    limit: int


@dataclass(frozen=True)
class Gsm8k:
    limit: int
    max_new_tokens: int


@dataclass(frozen=True)
class Perplexity:
    """The perplexity of the last ``limit`` responses of ``dataset``, each at most ``max_length`` tokens."""

    dataset: str
    limit: int
    max_length: int


@dataclass(frozen=True)
class Gcg:
    """``gcg``: GCG (``ssah_jax.attacks.gcg``) on the first ``limit`` prompts of ``dataset`` (their
    targets: a dataset with responses, AdvBench's "Sure, here is ..."): ``steps`` of
    ``search_width`` candidates (``topk``, ``n_replace``) from the suffix ``init``, ``chunk``
    candidates a forward, stopping early once the greedy answer starts with the target
    (``early_stop``); ``transfer``: another run's ``rows/gcg.jsonl`` whose suffixes are answered
    instead of optimised ("": optimise here)."""

    dataset: str
    limit: int
    steps: int
    search_width: int
    topk: int
    n_replace: int
    init: str
    chunk: int
    early_stop: bool
    transfer: str


@dataclass(frozen=True)
class EvalSpec:
    """An evaluation: ``tasks`` (names of the registry ``TASKS``), answered ``batch_size`` at a
    time with ``max_new_tokens`` new tokens (sampled batches seeded from ``seed``), the safety
    system prompt ``system_prompt`` (empty: Llama-2-chat's), the judge of the attacks' success
    ``judge`` (one of ``ssah_jax.evaluation.judges.JUDGES``) and its model ``judge_model``
    (empty for ``keyword``), the data kit ``data_dir`` (None: the default), and each task's
    settings."""

    tasks: tuple[str, ...]
    batch_size: int
    max_new_tokens: int
    seed: int
    system_prompt: str
    judge: str
    judge_model: str
    data_dir: str | None
    harmful: Harmful
    prefill: Prefill
    sweep: Sweep
    overrefusal: Overrefusal
    mmlu: Limit
    sst2: Limit
    gsm8k: Gsm8k
    perplexity: Perplexity
    gcg: Gcg
