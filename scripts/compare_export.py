"""Check an exported HF directory (e.g. a finetune run's ``export/``): transformers (torch, CPU)
and our model load it, and greedy decoding of chat prompts gives the same tokens.

    python scripts/compare_export.py runs/finetune/export [--new-tokens 48]

Prints each prompt's answer and whether the two agree; exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about autumn.",
    "Explain what a neural network is in one paragraph.",
)


def greedy_pairs(export: str, prompts=PROMPTS, new_tokens: int = 48) -> list[tuple[str, list[int], list[int]]]:
    """``(prompt, our token ids, transformers' token ids)`` per prompt, both without the final
    end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM

    from ssah_jax.checkpoints import load_model
    from ssah_jax.data import encode_prompt
    from ssah_jax.generation import generate_ids

    ours, tokenizer = load_model(export)
    reference = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    our_ids = generate_ids(ours, tokenizer, list(prompts), max_new_tokens=new_tokens)
    pairs = []
    for prompt, row in zip(prompts, our_ids):
        ids = torch.as_tensor(encode_prompt(tokenizer, prompt).ids[None], dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        if theirs and theirs[-1] == tokenizer.eos_token_id:
            theirs = theirs[:-1]
        pairs.append((prompt, row, theirs))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an HF directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    from ssah_jax.checkpoints import load_tokenizer

    tokenizer = load_tokenizer(args.export)
    pairs = greedy_pairs(args.export, new_tokens=args.new_tokens)
    for prompt, ours, theirs in pairs:
        verdict = "same" if ours == theirs else "DIFFERENT"
        print(f"[{verdict}] {prompt}\n  ours:         {tokenizer.decode(ours)!r}")
        if ours != theirs:
            print(f"  transformers: {tokenizer.decode(theirs)!r}")
    same = sum(o == t for _, o, t in pairs)
    print(f"{same} of {len(pairs)} greedy answers ({args.new_tokens} new tokens) identical to transformers'")
    sys.exit(0 if same == len(pairs) else 1)


if __name__ == "__main__":
    main()
