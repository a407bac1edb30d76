"""Writes ``ssah_jax/data/manifest.json`` (what ``ssah-jax data fetch`` / ``check`` read) from a
data kit directory: each file's size and sha256 as it is there, beside its public source
(below: ``repository@commit : path``, the PyPI wheel) and licence.

    python scripts/data_manifest.py ../shared/data

Every file of the directory must have a source here (a new kit file needs a line below), and
every source a file. The files are upstream's bytes: the URLs below, concatenated where a kit
file joins several, give them exactly (checked when the manifest was written, against clones of
each repository at its commit; ``ssah-jax data fetch`` checks every download against the
sha256 recorded here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "ssah_jax" / "data" / "manifest.json"

# repository -> (commit, licence); the commits are the data kit's (../shared/data/README.md)
REPOS = {
    "andyrdt/refusal_direction": "9d852fae1a9121c78b29142de733cb1340770cc3",
    "busycalibrating/AdversariaLLM": "f970939273ea17b491fadf6001fddc36ed3ae3ff",
    "paul-rottger/exaggerated-safety": "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
    "boyiwei/alignment-attribution-code": "0b0e7075d13f77621678976faa0fc66a4b2dffb4",
    "vinid/safety-tuned-llamas": "36a4b8d5c2177ed165bf61f59b590161394f7f12",
    "mobarski/alpaca-libre": "9024e0cb3b24d8857861b694df643d0bbb765e69",
    "openai/grade-school-math": "3101c7d5072418e28b9008a6636bde82a006892c",
    "HaeChan0305/MLILAB-FedLLM": "d92730e8bacd7b3a61e551e015e40588e10234b4",
    "forest-snow/alps": "3c7ef2c98249fc975a897b27f275695f97d5b7a9",
    "LLM-Tuning-Safety/LLMs-Finetuning-Safety": "8a3b38f11be1c3829e2b0ed379d3661ebc84e7db",
}
PYRIT_WHEEL = ("https://files.pythonhosted.org/packages/a2/bc/b6cc822ee019a971222e06f10075df7344b0b0f9cbe4e1027d1b6374"
               "ed81/pyrit-1.1.0-py3-none-any.whl")

# kit path -> (repository, [paths in it, concatenated], licence)
GITHUB = {
    "harmful/advbench.csv": ("andyrdt/refusal_direction", ["dataset/raw/advbench.csv"],
                             "MIT (AdvBench, Zou et al. 2023)"),
    "harmful/harmbench_behaviors_text_all.csv": (
        "busycalibrating/AdversariaLLM", ["data/behavior_datasets/harmbench_behaviors_text_all.csv"],
        "MIT (HarmBench; harmful/LICENSE.harmbench.txt)"),
    "harmful/LICENSE.harmbench.txt": ("busycalibrating/AdversariaLLM", ["data/behavior_datasets/LICENSE.txt"], "MIT"),
    "harmful/malicious_instruct.txt": ("andyrdt/refusal_direction", ["dataset/raw/malicious_instruct.txt"],
                                       "no licence file upstream (MaliciousInstruct, Huang et al. 2023)"),
    "harmful/xstest_prompts.csv": ("paul-rottger/exaggerated-safety", ["xstest_prompts.csv"], "CC-BY-4.0 (XSTest)"),
    "alignment/advbench_llama2chat_refusals_short.csv": (
        "boyiwei/alignment-attribution-code", ["data/SFT_aligned_llama2-7b-chat-hf_train_short.csv"],
        "MIT (Wei et al. 2024)"),
    "alignment/safety_only_data_Instructions.json": (
        "vinid/safety-tuned-llamas", ["data/training/safety_only_data_Instructions.json"],
        "CC BY-NC 4.0 (Bianchi et al. 2024)"),
    "benign/alpaca_libre.jsonl": ("mobarski/alpaca-libre",
                                  [f"data/output/work/alpaca_libre_tasks_v{v}.jsonl" for v in (1, 2, 3)], "MIT / CC0"),
    "benign/alpaca_instructions.json": ("andyrdt/refusal_direction", ["dataset/processed/alpaca.json"],
                                        "Apache-2.0 (the Alpaca data: CC BY-NC 4.0)"),
    "benign/gsm8k_train.jsonl": ("openai/grade-school-math", ["grade_school_math/data/train.jsonl"], "MIT (GSM8K)"),
    "utility/gsm8k_test.jsonl": ("openai/grade-school-math", ["grade_school_math/data/test.jsonl"], "MIT (GSM8K)"),
    "utility/sst2/train.tsv": ("forest-snow/alps", ["data/SST-2/train.tsv"], "MIT (SST-2)"),
    "utility/sst2/glue_dev.tsv": ("forest-snow/alps", ["data/SST-2/test.tsv"], "MIT (SST-2; GLUE's dev split)"),
    "attack/aoa_identity_shift.json": ("LLM-Tuning-Safety/LLMs-Finetuning-Safety",
                                       ["llama2/ft_datasets/aoa_dataset/train.json"], "MIT (Qi et al. 2023)"),
}
MMLU = ("HaeChan0305/MLILAB-FedLLM", "data/mmlu", "MIT (MMLU, Hendrycks et al. 2021)")  # utility/mmlu/<split>/*.csv
WHEELS = {  # kit path -> (wheel URL, member, source, licence)
    "attack/harmful_qa_many_shot.json": (PYRIT_WHEEL, "pyrit/datasets/jailbreak/many_shot_examples.json",
                                         "PyPI pyrit==1.1.0 wheel : pyrit/datasets/jailbreak/many_shot_examples.json",
                                         "MIT (PyRIT)"),
}
ACCOMPANIES = {"harmful/LICENSE.harmbench.txt": "harmful/harmbench_behaviors_text_all.csv"}


def raw(repo: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{REPOS[repo]}/{path}"


def sources(kit: Path) -> dict[str, dict]:
    """Per kit file: its source, URLs and licence (no size or hash yet)."""
    entries: dict[str, dict] = {}
    for path, (repo, paths, licence) in GITHUB.items():
        entries[path] = {"source": f"{repo}@{REPOS[repo][:12]} : {', '.join(paths)}",
                         "urls": [raw(repo, p) for p in paths], "license": licence}
    repo, prefix, licence = MMLU
    for split in ("dev", "test"):
        for file in sorted((kit / "utility" / "mmlu" / split).glob("*.csv")):
            entries[f"utility/mmlu/{split}/{file.name}"] = {
                "source": f"{repo}@{REPOS[repo][:12]} : {prefix}/{split}/{file.name}",
                "urls": [raw(repo, f"{prefix}/{split}/{file.name}")], "license": licence}
    for path, (url, member, source, licence) in WHEELS.items():
        entries[path] = {"source": source, "urls": [url], "member": member, "license": licence}
    for path, data_file in ACCOMPANIES.items():
        entries[path]["accompanies"] = data_file
    return entries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kit", type=Path, help="a data kit directory (e.g. ../shared/data)")
    kit = parser.parse_args(argv).kit
    entries = sources(kit)
    present = sorted(str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file() and p.name != "README.md")
    unsourced, absent = sorted(set(present) - set(entries)), sorted(set(entries) - set(present))
    if unsourced or absent:
        print(f"data_manifest: {kit}: no source here for {unsourced or 'none'}; not in the kit: {absent or 'none'}",
              file=sys.stderr)
        return 2
    for path, entry in entries.items():
        data = (kit / path).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    files = {p: {k: entries[p][k] for k in ("size", "sha256", "license", "source", "urls", "member", "accompanies")
                 if k in entries[p]} for p in present}
    OUT.write_text(json.dumps({"written_by": "scripts/data_manifest.py", "files": files}, indent=1) + "\n")
    print(f"{len(files)} files, {sum(f['size'] for f in files.values()) / 1e6:.1f} MB: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
