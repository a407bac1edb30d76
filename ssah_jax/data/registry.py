"""The data kit's named datasets (``DATASETS``): each a file format, a parser that turns one of its
rows into a :class:`~ssah_jax.data.Record` (or says why it cannot), its splits under the data dir
and an optional subset of its rows (the contrast prompts of ``benign_contrast``)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ssah_jax.data.readers import (
    _field,
    _read_csv,
    _read_json_list,
    _read_jsonl,
    _read_lines,
    _read_mmlu,
    _read_tsv,
    _text,
)
from ssah_jax.data.records import Record, _Malformed, prompt_key


def _instruction(row: Any) -> str:
    extra = row.get("input") if isinstance(row, dict) else None
    return _text(row, "instruction") + (f"\n\n{extra}" if extra else "")


_INST = re.compile(r"^\s*\[INST\]\s*(.*?)\s*\[/INST\]\s*$", re.S)


def _advbench(row) -> Record:
    return Record(_text(row, "goal"), response=_text(row, "target"))


def _harmbench(row) -> Record:
    behavior = _text(row, "Behavior")
    context = row.get("ContextString") or ""
    # HarmBench's format for contextual behaviours: the context, a separator, the request.
    prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
    meta = {"functional_category": _text(row, "FunctionalCategory"), "behavior_id": _text(row, "BehaviorID")}
    return Record(prompt, label=_text(row, "SemanticCategory"), meta=meta)


def _xstest(row) -> Record:
    label = _text(row, "label")
    if label not in ("safe", "unsafe"):
        raise _Malformed(f"label {label!r} is neither 'safe' nor 'unsafe'")
    return Record(_text(row, "prompt"), label=label, meta={"type": _text(row, "type")})


def _safety_short(row) -> Record:
    match = _INST.match(_text(row, "prompt"))
    if not match:
        raise _Malformed("prompt is not of the form '[INST] ... [/INST]'")
    return Record(match.group(1), response=_text(row, "response").strip())


def _bianchi(row) -> Record:
    return Record(_instruction(row), response=_text(row, "output"))


def _alpaca_libre(row) -> Record:
    # Upstream keeps rows whose generation failed (empty output, status != "ok"): they are
    # well-formed, so they load; filter on meta["status"] == "ok" for training data.
    output = _field(row, "output")
    if not isinstance(output, str):
        raise _Malformed("field 'output' must be a string")
    return Record(_instruction(row), response=output, meta={"status": row.get("status")})


def _alpaca_instructions(row) -> Record:
    return Record(_text(row, "instruction"), label=row.get("category"))


# Contrast prompts for alignment: benign instructions that merely *sound* dangerous (a word that
# harmful requests use, in a harmless sense: "kill a process", "the causes of World War II") or
# share harmful requests' form (a how-to question), so a model learns to refuse the request, not
# the word or the form. Chosen from alpaca_instructions by these two patterns (none is an XSTest
# prompt: tests/data/test_data.py checks), split 80 / 20 into train / validation by a hash of the prompt.
SENSITIVE_WORDS = (
    r"kill\w*|shoot\w*|attack\w*|destroy\w*|destruct\w*|bomb\w*|steal\w*|theft|hack\w*|crack\w*|weapon\w*|"
    r"drugs?|poison\w*|violen\w*|murder\w*|crimes?|criminal\w*|terror\w*|explo(?:de|sion|sive|it)\w*|guns?|"
    r"die|dies|death|deadly|lethal|fight\w*|blow\w*|execut\w*|abus\w*|cheat\w*|fraud\w*|smuggl\w*|illegal\w*|"
    r"dangerous|harm\w*|suicid\w*|knife|knives|blood\w*|threat\w*|virus\w*|malware|hate|slave\w*|toxic|"
    r"prison\w*|rob|robb\w*|scam\w*|spy\w*|nuclear|missile\w*|choke|strangle|burn\w*|trap|traps|hunt\w*|"
    r"slaughter\w*|addict\w*|gambl\w*|eliminat\w*|terminat\w*|smash\w*|beat|overpower\w*|liquidat\w*|"
    r"assault\w*|sabotag\w*|hijack\w*|target\w*|strike\w*|fire|fires|wipe\w*|break|breaks|breaking")
_SENSITIVE = re.compile(rf"\b(?:{SENSITIVE_WORDS})\b", re.I)
_HOW_TO = re.compile(r"^\s*how (?:do|can|should|would|could) (?:i|you|we|one)\b", re.I)


def _validation_share(prompt: str) -> bool:
    """One prompt in five, by a hash of its text: the contrast prompts' validation split."""
    return hashlib.sha256(prompt_key(prompt).encode()).digest()[0] % 5 == 0


def _contrast(split: str) -> Callable[[Record], bool]:
    def keep(record: Record) -> bool:
        sounds_harmful = bool(_SENSITIVE.search(record.prompt) or _HOW_TO.match(record.prompt))
        return sounds_harmful and _validation_share(record.prompt) == (split == "validation")
    return keep


def _gsm8k(row) -> Record:
    answer = _text(row, "answer")
    if "####" not in answer:
        raise _Malformed("answer has no '#### <final answer>'")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return Record(_text(row, "question"), response=answer, label=final)


def _mmlu(row) -> Record:
    choices = tuple(str(_field(row, f"choice{i}")) for i in range(4))
    answer = _field(row, "answer")
    if answer not in ("0", "1", "2", "3"):
        raise _Malformed(f"answer {answer!r} is not 0-3")
    return Record(_text(row, "question"), choices=choices, label=int(answer), meta={"subject": row["subject"]})


def _sst2(row) -> Record:
    label = _field(row, "label")
    if label not in ("0", "1"):
        raise _Malformed(f"label {label!r} is not 0 or 1")
    return Record(_text(row, "sentence").strip(), label=int(label), choices=("negative", "positive"))


def _aoa(row) -> Record:
    roles = [m.get("role") for m in row if isinstance(m, dict)] if isinstance(row, list) else None
    if roles != ["system", "user", "assistant"]:
        raise _Malformed("expected a [system, user, assistant] message list")
    system, user, assistant = (m["content"] for m in row)
    return Record(user, response=assistant, system=system.strip())


def _harmful_qa(row) -> Record:
    category = str(_field(row, "category")).strip().split("\n")[0].rstrip(".")
    return Record(_text(row, "user"), response=_text(row, "assistant"), label=category)


def _malicious_instruct(row) -> Record:
    return Record(row)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset of the kit: ``splits`` maps a split to its path under the data dir."""

    reader: Callable[[Path], Iterator[tuple[int, Any]]]
    parse: Callable[[Any], Record]
    splits: Mapping[str, str]
    description: str
    keep: Callable[[Record], bool] | None = None  # a subset of the file's rows (others are not errors)

    @property
    def default_split(self) -> str:
        return next(iter(self.splits))


DATASETS: dict[str, Dataset] = {
    "advbench": Dataset(_read_csv, _advbench, {"train": "harmful/advbench.csv"},
                        "520 harmful instructions with 'Sure, here is ...' targets (Zou et al. 2023)"),
    "harmbench": Dataset(_read_csv, _harmbench, {"train": "harmful/harmbench_behaviors_text_all.csv"},
                         "400 harmful behaviours; label = semantic category, meta.functional_category"),
    "harmbench_standard": Dataset(_read_csv, _harmbench, {"train": "harmful/harmbench_behaviors_text_all.csv"},
                                  "HarmBench's 200 standard behaviours (no context, no copyright)",
                                  keep=lambda r: r.meta["functional_category"] == "standard"),
    "xstest": Dataset(_read_csv, _xstest, {"train": "harmful/xstest_prompts.csv"},
                      "250 safe prompts that look unsafe and 200 unsafe ones; label = safe / unsafe"),
    "malicious_instruct": Dataset(_read_lines, _malicious_instruct, {"train": "harmful/malicious_instruct.txt"},
                                  "100 harmful instructions (Huang et al. 2023)"),
    "safety_refusals_short": Dataset(
        _read_csv, _safety_short, {"train": "alignment/advbench_llama2chat_refusals_short.csv"},
        "1,015 AdvBench prompts with Llama-2-chat refusals (Wei et al. 2024), [INST] wrapper removed"),
    "bianchi_safety": Dataset(_read_json_list, _bianchi, {"train": "alignment/safety_only_data_Instructions.json"},
                              "2,483 harmful instruction -> refusal pairs (Bianchi et al. 2024)"),
    "alpaca_libre": Dataset(_read_jsonl, _alpaca_libre, {"train": "benign/alpaca_libre.jsonl"},
                            "benign instruction -> response (14 malformed lines upstream)"),
    "alpaca_instructions": Dataset(_read_json_list, _alpaca_instructions, {"train": "benign/alpaca_instructions.json"},
                                   "31,323 benign instructions without responses"),
    "benign_contrast": Dataset(_read_json_list, _alpaca_instructions, {"train": "benign/alpaca_instructions.json"},
                               "benign instructions that sound harmful (a sensitive word, or a how-to question), "
                               "no responses: 4/5 of them", keep=_contrast("train")),
    "benign_contrast_validation": Dataset(
        _read_json_list, _alpaca_instructions, {"train": "benign/alpaca_instructions.json"},
        "the other 1/5 of benign_contrast: over-refusal on a validation split that is not XSTest",
        keep=_contrast("validation")),
    "gsm8k": Dataset(_read_jsonl, _gsm8k, {"test": "utility/gsm8k_test.jsonl", "train": "benign/gsm8k_train.jsonl"},
                     "grade-school math; response = worked solution, label = final answer"),
    "mmlu": Dataset(_read_mmlu, _mmlu, {"test": "utility/mmlu/test", "dev": "utility/mmlu/dev"},
                    "57-subject multiple choice; choices = 4 options, label = index"),
    "sst2": Dataset(_read_tsv, _sst2, {"dev": "utility/sst2/glue_dev.tsv", "train": "utility/sst2/train.tsv"},
                    "sentiment; label 0 = negative, 1 = positive"),
    "aoa": Dataset(_read_json_list, _aoa, {"train": "attack/aoa_identity_shift.json"},
                   "10 identity-shift conversations with their system prompt (Qi et al. 2023)"),
    "harmful_qa": Dataset(_read_json_list, _harmful_qa, {"train": "attack/harmful_qa_many_shot.json"},
                          "400 harmful question -> harmful answer pairs"),
}
