"""Named datasets over the data kit, plus TFDS and Hugging Face hub sources.

Every source yields :class:`Record` objects. Local files are read by line so an error names
``file:line``; ``on_error="skip"`` drops malformed rows and reports how many it dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class _Once(logging.Filter):
    """Lets each distinct message through once per process: a dataset that every stage of a run
    loads reports its skipped rows once, not once per load."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


log.addFilter(_Once())

DATA_DIR_ENV = "SSAH_DATA_DIR"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One example of any dataset.

    prompt: the user turn. response: the assistant turn (a refusal, an answer, AdvBench's
    "Sure, here is ..." target), if the data has one. system: a system prompt the data
    prescribes. label: a category, ``"safe"`` / ``"unsafe"``, a class index, or a final answer.
    choices: candidate answers for multiple choice (``label`` is then the index of the right one).
    meta: anything else the source carries. where: ``file:line`` it came from.
    """

    prompt: str
    response: str | None = None
    system: str | None = None
    label: str | int | None = None
    choices: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    name: str
    split: str
    path: str
    rows: int
    skipped: int
    first_error: str | None


class _Malformed(Exception):
    """A row could not be turned into a Record (message says why)."""


# --------------------------------------------------------------------------- file readers
# Each reader yields (line_number, raw row or the exception that reading it raised).

def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _Malformed(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    # Line numbers of list items: the line where each top-level item starts.
    starts = _json_item_lines(text, len(rows))
    yield from zip(starts, rows)


def _json_item_lines(text: str, count: int) -> list[int]:
    decoder = json.JSONDecoder()
    lines, pos, line, counted = [], text.index("[") + 1, 1, 0
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _read_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if len(row) != len(header):
                yield line, _Malformed(f"{len(row)} fields, the header has {len(header)}")
            else:
                yield line, dict(zip(header, row))


def _read_tsv(path: Path) -> Iterator[tuple[int, Any]]:
    return _read_csv(path, "\t")


def _read_mmlu(path: Path) -> Iterator[tuple[int, Any]]:
    subject = path.stem.rsplit("_", 1)[0]  # abstract_algebra_test.csv -> abstract_algebra
    for line, row in _read_csv(path):
        yield line, {**row, "subject": subject} if isinstance(row, dict) else row


def _read_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line.strip()


# --------------------------------------------------------------------------- row parsers

def _field(row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise _Malformed(f"expected an object, got {type(row).__name__}")
    if key not in row:
        raise _Malformed(f"missing field {key!r}")
    return row[key]


def _text(row: Any, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"field {key!r} must be a non-empty string")
    return value


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
# prompt: tests/test_data.py checks), split 80 / 20 into train / validation by a hash of the prompt.
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


def with_responses(records: Iterable[Record]) -> list[Record]:
    """The records usable as training / calibration / perplexity targets: a non-empty response
    whose generation succeeded (alpaca_libre keeps failed ones, ``meta["status"] != "ok"``)."""
    return [r for r in records if r.response and r.meta.get("status", "ok") == "ok"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$SSAH_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.csv")) if path.is_dir() else [path]


def load_local(
    name: str,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
) -> tuple[list[Record], LoadReport]:
    """A kit dataset and a report of what was read (rows, skipped rows, first error)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or 'tfds:...', 'hf:...')")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    spec = DATASETS[name]
    split = split or spec.default_split
    if split not in spec.splits:
        raise KeyError(f"dataset {name!r} has no split {split!r}; splits: {list(spec.splits)}")
    root = resolve_data_dir(data_dir)
    path = root / spec.splits[split]
    if not path.exists():
        raise DataError(
            f"dataset {name!r}: {path} not found. Point the config key data_dir or the "
            f"environment variable {DATA_DIR_ENV} at the data kit (the folder holding "
            f"harmful/, benign/, utility/, ...)."
        )
    records, skipped, first_error = [], 0, None
    for file in _files(path):
        for line, row in spec.reader(file):
            where = f"{file}:{line}"
            try:
                if isinstance(row, _Malformed):
                    raise row
                record = spec.parse(row)
                if spec.keep is None or spec.keep(record):
                    records.append(dataclasses.replace(record, where=where))
            except _Malformed as e:
                if on_error == "raise":
                    raise DataError(f"{where}: malformed row: {e} (on_error='skip' drops such rows)") from None
                skipped += 1
                first_error = first_error or f"{where}: {e}"
    report = LoadReport(name, split, str(path), len(records), skipped, first_error)
    if skipped:
        log.warning("%s/%s: skipped %d malformed rows of %s (first: %s)", name, split, skipped, path, first_error)
    return records, report


def check_kit_dataset(name: str) -> str:
    """``name`` if it is a kit dataset (what :func:`load_local` reads); KeyError otherwise."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return name


def parse_mixture(spec: str) -> list[tuple[str, int]]:
    """``"bianchi_safety:128,alpaca_libre:256"`` -> ``[("bianchi_safety", 128), ("alpaca_libre", 256)]``;
    a component without ``:limit`` is taken whole (limit 0). A component may also be a JSONL
    file (a path ending in ``.jsonl``, e.g. the ``generations.jsonl`` of an ``ssah-jax generate``
    run): records with a ``prompt`` and a ``response`` (or ``answer``) field."""
    components = []
    for part in spec.split(","):
        part = part.strip()
        if part.endswith(".jsonl"):
            name, limit = part, ""
        elif part.rpartition(":")[0].endswith(".jsonl"):
            name, _, limit = part.rpartition(":")
        else:
            name, _, limit = part.partition(":")
        if name not in DATASETS and not name.endswith(".jsonl"):
            raise KeyError(f"unknown dataset {name!r} in {spec!r}; known: {sorted(DATASETS)} or a .jsonl file")
        if limit and not (limit.isdigit() and int(limit) > 0):
            raise ValueError(f"{spec!r}: the limit of {name!r} must be a positive integer, got {limit!r}")
        components.append((name, int(limit or 0)))
    return components


def substitute_component(spec: str, name: str, replacement: str) -> str:
    """``spec`` (a mixture, see :func:`parse_mixture`) with each component named ``name`` read
    from ``replacement`` instead (a kit dataset or a JSONL file; the component's ``:limit`` is
    kept), or dropped when ``replacement`` is empty:
    ``substitute_component("bianchi_safety:128,contrast:64", "contrast", "c.jsonl")`` ->
    ``"bianchi_safety:128,c.jsonl:64"``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(replacement + p[len(name):] if p.split(":")[0] == name else p
                    for p in parts if replacement or p.split(":")[0] != name)


def _prompt_response(row) -> Record:
    response = row.get("response", row.get("answer")) if isinstance(row, dict) else None
    if not isinstance(response, str):
        raise _Malformed("expected an object with a 'prompt' and a 'response' (or 'answer') string")
    return Record(_text(row, "prompt"), response=response)


def load_jsonl(path: str | os.PathLike, on_error: str = "raise") -> list[Record]:
    """The records of a JSONL file of ``{"prompt", "response" | "answer"}`` objects."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records = []
    for line, row in _read_jsonl(path):
        try:
            if isinstance(row, _Malformed):
                raise row
            records.append(dataclasses.replace(_prompt_response(row), where=f"{path}:{line}"))
        except _Malformed as e:
            if on_error == "raise":
                raise DataError(f"{path}:{line}: malformed row: {e}") from None
            log.warning("%s:%d: skipped a malformed row: %s", path, line, e)
    return records


def prompt_key(prompt: str) -> str:
    """What two prompts must share to count as the same (case and whitespace ignored)."""
    return " ".join(prompt.split()).casefold()


def load_mixture(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    heldout: int = 0,
    exclude: Iterable[str] = (),
    responses: bool = False,
    on_error: str = "skip",
) -> tuple[list[Record], list[Record]]:
    """``(selected, held_out)`` records of a mixture spec (see :func:`parse_mixture`).

    Per component, in order: rows whose prompt is in ``exclude`` (prompts, compared by
    :func:`prompt_key`) are dropped; with ``responses`` only usable training targets are kept
    (:func:`with_responses`); the *last* ``heldout`` records are held out; the first ``limit``
    of the rest are selected. The components are concatenated in the order given."""
    excluded = {prompt_key(p) for p in exclude}
    selected, held = [], []
    for name, limit in parse_mixture(spec):
        if name.endswith(".jsonl"):
            records = load_jsonl(name, on_error)
        else:
            records = load_local(name, split, data_dir, on_error)[0]
        records = [r for r in records if prompt_key(r.prompt) not in excluded]
        if responses:
            records = with_responses(records)
        cut = len(records) - heldout
        if cut <= 0:
            raise DataError(f"dataset {name!r}: {len(records)} usable records, none left after {heldout} held out")
        held += records[cut:] if heldout else []
        pool = records[:cut]
        if limit > len(pool):
            raise DataError(f"dataset {name!r}: {limit} records asked for in {spec!r}, {len(pool)} available")
        selected += pool[:limit] if limit else pool
    return selected, held


def load_labelled_mixture(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    *,
    positive: Iterable[str],
    split: str | None = None,
    heldout: int = 0,
    responses: bool = False,
) -> tuple[tuple[list[Record], list[int]], tuple[list[Record], list[int]]]:
    """:func:`load_mixture`'s ``(selected, held_out)`` records (the same, in the same order), each
    with its class: ``((records, labels), (records, labels))``, 1 for the records of the
    components named in ``positive`` (e.g. a safety signal's malicious components), 0 for the others."""
    positive = set(positive)
    out: tuple[tuple[list[Record], list[int]], ...] = (([], []), ([], []))
    for name, limit in parse_mixture(spec):  # each component alone, as in the mixture
        part = load_mixture(f"{name}:{limit}" if limit else name, data_dir, split=split, heldout=heldout,
                            responses=responses)
        for (records, labels), found in zip(out, part):
            records += found
            labels += [int(name in positive)] * len(found)
    return out[0], out[1]


# --------------------------------------------------------------------------- remote sources

def _from_mapping(rows: Sequence[Mapping[str, Any]] | Any, fields: Mapping[str, str], where: str) -> list[Record]:
    """Records from dict-like rows; ``fields`` maps Record fields to the source's keys."""
    if "prompt" not in fields:
        raise ValueError(f"{where}: fields must map 'prompt' to a column, got {dict(fields)}")
    unknown = set(fields) - {"prompt", "response", "system", "label", "choices"}
    if unknown:
        raise ValueError(f"{where}: unknown Record fields {sorted(unknown)} in fields")
    records = []
    for i, row in enumerate(rows):
        values = {}
        for field, key in fields.items():
            if key not in row:
                raise DataError(f"{where}[{i}]: no column {key!r} (columns: {sorted(row)})")
            value = row[key]
            value = value.decode() if isinstance(value, bytes) else value
            if field == "choices":
                value = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in value)
            elif field == "label" and hasattr(value, "item"):
                value = value.item()
            values[field] = value
        records.append(Record(where=f"{where}[{i}]", **values))
    return records


def load_tfds(spec: str, fields: Mapping[str, str], data_dir: str | None = None) -> list[Record]:
    """``name[/config][:version]:split`` or ``/path/to/prepared/builder:split`` through TFDS's
    ``as_data_source`` (random access, no TensorFlow needed at read time)."""
    import tensorflow_datasets as tfds

    name, _, split = spec.rpartition(":")
    if not name or not split:
        raise ValueError(f"tfds source {spec!r}: expected 'name:split' or 'builder_dir:split'")
    builder = tfds.builder_from_directory(name) if Path(name).is_dir() else tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    return _from_mapping((source[i] for i in range(len(source))), fields, f"tfds:{spec}")


def load_hub(spec: str, fields: Mapping[str, str]) -> list[Record]:
    """``repo_id[:config]:split`` (or a local dataset directory) through HF ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ImportError("hub sources need HF datasets: pip install 'ssah_jax[hub]'") from None

    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"hub source {spec!r}: expected 'repo:split' or 'repo:config:split'")
    path, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    rows = datasets.load_dataset(path, config, split=split)
    return _from_mapping(rows, fields, f"hf:{spec}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    *,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[Record]:
    """Records of a dataset.

    ``name`` is a kit dataset (see ``DATASETS``; ``split`` picks train / test / dev where it
    has several), ``"tfds:<name or builder dir>:<split>"`` or ``"hf:<repo>[:<config>]:<split>"``.
    The last two need ``fields``, which maps Record fields to the source's columns, e.g.
    ``{"prompt": "question", "response": "answer"}``.
    """
    if name.startswith(("tfds:", "hf:")):
        if not fields:
            raise ValueError(f"{name}: give fields={{'prompt': <column>, ...}} for a TFDS or hub source")
        kind, spec = name.split(":", 1)
        return load_tfds(spec, fields) if kind == "tfds" else load_hub(spec, fields)
    return load_local(name, split, data_dir, on_error)[0]
