"""The typed core's figures: scanned vs looped layers, remat memory, compile-once generation.

    python -m benchmarks.core [--quick]

In one process, on whatever devices are local (a CPU here):
1. shakti_100m train-step time with layers under lax.scan vs a Python loop over the same
   stacked params (target: within 5%);
2. shakti_500m train-step compile time, scan vs loop (target: scan at most a third);
3. the AOT memory analysis of the shakti_500m step at seq 2048 (batch 1, bf16) with
   remat=full vs none (target: at least 40% less temporary memory);
4. a repeated `Generator` call with the same shapes vs the first (target: at least 5x faster).
`--quick` runs the same code paths at tiny sizes (a smoke test, not figures).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from benchmarks.train_throughput import lm_step, measure_training
from shakti_jax.config import get_config
from shakti_jax.generate import Generator, random_model


def step_times(model: str, batch: int, seq_len: int, steps: int, rounds: int = 2
               ) -> dict[str, float]:
    """Best of `rounds` alternating measurements of each mode (`steps` timed steps each)."""
    times: dict[str, list[float]] = {"scan": [], "loop": []}
    for _ in range(rounds):
        for mode in times:
            times[mode].append(measure_training(model, batch=batch, seq_len=seq_len, steps=steps,
                                                dtype="float32", scan_layers=mode == "scan")["step_time"])
    return {mode: min(t) for mode, t in times.items()}


def compile_seconds(model: str, batch: int, seq_len: int, **overrides) -> float:
    """Tracing + lowering + XLA compilation of the train step (what build_step measures)."""
    cfg = get_config(model, dropout_rate=0.0, **overrides)
    return lm_step(cfg, batch, seq_len).compile_seconds


def temp_bytes(model: str, batch: int, seq_len: int, remat: str) -> int:
    cfg = get_config(model, dropout_rate=0.0, dtype="bfloat16", remat=remat)
    return lm_step(cfg, batch, seq_len).compiled.memory_analysis().temp_size_in_bytes


def generate_seconds(model: str, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    generator = Generator(*random_model(model))
    prompts = np.random.default_rng(0).integers(4, 500, size=(2, prompt_len)).tolist()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        generator(prompts, max_new_tokens=new_tokens)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    small, large = ("tiny", "tiny_sparse") if args.quick else ("shakti_100m", "shakti_500m")
    seq = 64 if args.quick else 2048
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    times = step_times(small, 1, 64 if args.quick else 512, 2 if args.quick else 5)
    print(f"1. {small} step (batch 1 x {64 if args.quick else 512}, f32): scan "
          f"{times['scan'] * 1e3:,.0f} ms, loop {times['loop'] * 1e3:,.0f} ms, "
          f"scan/loop {times['scan'] / times['loop']:.3f}", flush=True)
    compiles = {mode: compile_seconds(large, 1, 256, scan_layers=mode == "scan")
                for mode in ("scan", "loop")}
    print(f"2. {large} step compile (batch 1 x 256, f32): scan {compiles['scan']:.1f} s, loop "
          f"{compiles['loop']:.1f} s, scan/loop {compiles['scan'] / compiles['loop']:.2f}",
          flush=True)
    temps = {remat: temp_bytes(large, 1, seq, remat) for remat in ("none", "full")}
    print(f"3. {large} step temporaries (batch 1 x {seq}, bf16): remat=none "
          f"{temps['none'] / 2**30:.2f} GiB, remat=full {temps['full'] / 2**30:.2f} GiB, "
          f"{1 - temps['full'] / temps['none']:.0%} less", flush=True)
    for name in dict.fromkeys(("tiny", small)):
        first, second = generate_seconds(name, 32 if args.quick else 128, 16 if args.quick else 32)
        print(f"4. {name} Generator, 2 prompts: first call {first:.2f} s (compiles), second "
              f"{second:.3f} s, {first / second:.1f}x faster", flush=True)


if __name__ == "__main__":
    main()
