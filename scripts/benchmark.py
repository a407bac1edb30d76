"""Benchmarks against transformers + torch on the same machine, in one run.

    python scripts/benchmark.py generate [--batch 8] [--new-tokens 128] [--repeats 3]

``generate``: batched greedy decoding of the demo model (same GGUF, same chat prompts, both
forced to produce exactly ``--new-tokens`` tokens per row); prints tokens/s for ours and for
transformers' ``generate`` and the ratio. Compilation is timed separately (first call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Tell me a story about a dragon.", "What is the capital of France?",
    "Explain photosynthesis.", "Write a poem about the sea.", "How do computers work?",
    "Give me a recipe for pancakes.", "What is machine learning?", "Describe the water cycle.",
]


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_floor(model, batch: int) -> dict:
    """Decoding reads every weight once per step: bytes / measured bandwidth is a floor."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB, far beyond any cache
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    seconds = _timed(lambda: total(big).block_until_ready(), 5)
    bandwidth = big.nbytes / seconds
    floor_s = weight_bytes / bandwidth
    return {
        "weight_bytes_per_step": weight_bytes,
        "measured_read_bandwidth_gb_s": bandwidth / 1e9,
        "floor_ms_per_step": 1e3 * floor_s,
        "max_tokens_per_s_at_floor": batch / floor_s,
    }


def bench_generate(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from ssah_jax import runs
    from ssah_jax.checkpoints import demo_gguf_path, load_model
    from ssah_jax.generation import generate_tokens, left_pad, render_prompts

    dtype = runs.DTYPES[args.dtype]
    path = demo_gguf_path()
    model, tokenizer = load_model(str(path), dtype)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    texts = render_prompts(tokenizer, prompts)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = left_pad(encoded, max(map(len, encoded)), tokenizer.pad_token_id)
    graphdef, state = nnx.split(model)

    def ours():
        out = generate_tokens(
            graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
            jnp.float32(1e-6), jnp.int32(0), jnp.float32(1.0),
            jnp.asarray([-1], jnp.int32),  # no stop token: exactly new_tokens per row
            jnp.int32(tokenizer.pad_token_id), max_new_tokens=args.new_tokens, sample=False,
        )
        return np.asarray(out)

    compile_s = _timed(ours, 1)
    ours_s = _timed(ours, args.repeats)

    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, args.dtype)
    ).eval()
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)

    def theirs():
        with torch.no_grad():
            return reference.generate(
                input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )

    theirs()  # warm-up
    theirs_s = _timed(theirs, args.repeats)
    tokens = args.batch * args.new_tokens
    return {
        "benchmark": "generate",
        "model": path.name,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_tokens_padded": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "ours_tokens_per_s": tokens / ours_s,
        "transformers_tokens_per_s": tokens / theirs_s,
        "speedup": theirs_s / ours_s,
        "ours_first_call_s_with_compile": compile_s,
        "ours_ms_per_step": 1e3 * ours_s / args.new_tokens,
        "transformers_ms_per_step": 1e3 * theirs_s / args.new_tokens,
        **memory_floor(model, args.batch),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generate"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    result = {"generate": bench_generate}[args.what](args)
    print(f"ours:         {result['ours_tokens_per_s']:8.1f} tokens/s")
    print(f"transformers: {result['transformers_tokens_per_s']:8.1f} tokens/s")
    print(f"ratio:        {result['speedup']:8.2f}x  ({result['batch']} x {result['new_tokens']} new tokens, "
          f"{result['dtype']}; {result['machine']})")
    print(f"memory floor: {result['floor_ms_per_step']:8.1f} ms/step = {result['max_tokens_per_s_at_floor']:.1f} "
          f"tokens/s ({result['weight_bytes_per_step'] / 1e6:.0f} MB of weights read per step at "
          f"{result['measured_read_bandwidth_gb_s']:.1f} GB/s measured)")
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Result written to {args.out}")


if __name__ == "__main__":
    main()
