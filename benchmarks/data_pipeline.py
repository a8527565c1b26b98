"""Data pipeline throughput against the training step's consumption on the same machine.

    python -m benchmarks.data_pipeline [--source SPEC] [--models tiny shakti_100m]

Tokenize + pack + batch tokens/s of `data_pipelines.pipeline.train_batches` (with a
tokenizer trained on the source first), next to the tokens/s that a training step of each
model consumes at the same batch shape (`benchmarks.train_throughput`), in one process.
The target is a ratio of at least 10.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.train_throughput import measure_training
from data_pipelines.pipeline import open_sources, train_batches
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from shakti_jax.train.workdir import write_corpus_sample

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/pretrain/tinyshakespeare.txt"


def pipeline_tokens_per_sec(sources, tokenizer: Tokenizer, batch: int, seq_len: int,
                            batches: int, threads: int) -> float:
    it = iter(train_batches(sources, tokenizer, batch_size=batch, seq_len=seq_len, seed=0,
                            num_threads=threads))
    next(it)  # start-up (threads, first documents) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * seq_len * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=f"text:{SHAKESPEARE}" if SHAKESPEARE.exists() else "default:")
    parser.add_argument("--models", nargs="+", default=["tiny", "shakti_100m"])
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sources = open_sources([args.source])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus_sample(sources, corpus)
        tokenizer = Tokenizer.load(train_tokenizer([corpus], args.vocab_size, Path(tmp) / "tok"))
    rate = pipeline_tokens_per_sec(sources, tokenizer, args.batch, args.seq_len, args.batches,
                                   args.threads)
    print(f"device: {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}; source {args.source}; batch {args.batch} x {args.seq_len}; "
          f"{args.threads} reader threads\n")
    print("| model | training consumes tok/s | pipeline tok/s | ratio |")
    print("|---|---|---|---|")
    for model in args.models:
        train = measure_training(model, batch=args.batch, seq_len=args.seq_len, steps=3,
                                 dtype="float32")
        print(f"| {model} | {train['tokens_per_sec']:,.0f} | {rate:,.0f} | "
              f"{rate / train['tokens_per_sec']:,.1f}x |", flush=True)


if __name__ == "__main__":
    main()
