"""Prefill and decode throughput of random-weight models, cached vs the no-cache reference.

    python -m benchmarks.decode [--models tiny shakti_100m] [--batches 1 8] [--repeats 3]

Prints a markdown table. Each figure is the median over repeats of the post-compile time
(compilation is excluded); the no-cache column recomputes the full forward per token in the
same process, so the speedup column is a same-machine ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from shakti_jax.generate import Generator, random_model


def measure(generator: Generator, batch: int, prompt_len: int, new_tokens: int, repeats: int,
            use_cache: bool):
    rng = np.random.default_rng(0)
    vocab = generator.model_def.config.vocab_size
    prompts = rng.integers(4, vocab, size=(batch, prompt_len)).tolist()
    runs = [generator(prompts, max_new_tokens=new_tokens, use_cache=use_cache)
            for _ in range(repeats)]
    return (statistics.median(r.prefill_tokens_per_sec for r in runs),
            statistics.median(r.decode_tokens_per_sec for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "shakti_100m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {args.dtype}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| model | batch | prefill tok/s | decode tok/s | no-cache decode tok/s | cache speedup |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        generator = Generator(*random_model(name, dtype=args.dtype))
        for batch in args.batches:
            prefill, decode = measure(generator, batch, args.prompt_len, args.new_tokens, args.repeats, True)
            _, reference = measure(generator, batch, args.prompt_len, args.new_tokens, 1, False)
            print(f"| {name} | {batch} | {prefill:,.0f} | {decode:,.1f} | {reference:,.1f} | "
                  f"{decode / reference:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
