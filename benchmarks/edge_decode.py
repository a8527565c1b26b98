"""llama.cpp decode speed of the Shakti sizes next to same-shape stand-ins (the paper's Figure 6).

    python -m benchmarks.edge_decode [--models ...] [--quants q4_0 q8_0] [--threads 2]

Random-weight models (speed does not depend on the values) written as GGUF by our converter;
SmolLM2-360M and Qwen2.5-0.5B are stand-ins with their published shapes. Greedy decode of 128
tokens after a 64-token prompt, one token per llama.cpp call, median of 3 runs, all in one
process on this CPU. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.edge_models import STAND_INS, machine, model_config, random_gguf
from shakti_jax.export import llama_runtime
from shakti_jax.model_stats import summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shakti_100m", "shakti_250m", "shakti_500m", *STAND_INS])
    parser.add_argument("--quants", nargs="+", default=["q4_0", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shakti_bench_edge"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp (llama-cpp-python) on {machine()}, {args.threads} threads; {time.strftime('%Y-%m-%d')}\n")
    print("| model | params | quant | file MB | decode tok/s |")
    print("|---|---|---|---|---|")
    for name in args.models:
        cfg = model_config(name)
        params = summary(cfg)["total_params"]
        for quant in args.quants:
            path = random_gguf(name, quant, args.workdir)
            llm = llama_runtime.load(path, n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads)
            prompt = [1] + np.random.default_rng(0).integers(10, 2000, args.prompt_len - 1).tolist()
            speeds = [llama_runtime.decode_tokens_per_sec(llm, prompt, args.new_tokens)
                      for _ in range(args.repeats)]
            llm.close()
            print(f"| {name} | {params / 1e6:.0f}M | {quant} | {path.stat().st_size / 1e6:,.0f} | "
                  f"{statistics.median(speeds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
