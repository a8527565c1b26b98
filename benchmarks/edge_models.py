"""Shared setup of the edge benchmarks: a tokenizer on the embedded corpus and random-weight
models written as GGUF, including same-shape stand-ins for other small models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flax import nnx

from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.tokenizer import train_tokenizer
from shakti_jax.config import ModelConfig, get_config
from shakti_jax.export import canonicalize, model_params, write_gguf
from shakti_jax.model import Transformer

# Random-weight stand-ins with the published shapes (llama architecture, tied embeddings;
# Qwen2.5's q/k/v biases are left out, which changes no matmul shape).
STAND_INS = {
    "smollm2_360m": get_config("shakti_250m").replace(
        name="smollm2_360m", vocab_size=49152, num_layers=32, d_model=960, num_heads=15,
        num_kv_heads=5, head_dim=64, ffn_dim=2560, max_seq_len=8192),
    "qwen2.5_0.5b": get_config("shakti_250m").replace(
        name="qwen2.5_0.5b", vocab_size=151936, num_layers=24, d_model=896, num_heads=14,
        num_kv_heads=2, head_dim=64, ffn_dim=4864, max_seq_len=32768, rope_theta=1e6),
}


def model_config(name: str) -> ModelConfig:
    return STAND_INS[name] if name in STAND_INS else get_config(name)


def tokenizer(workdir: Path, vocab_size: int = 2048) -> Path:
    """A sentencepiece model trained once on the embedded corpus (padded to each model's vocab)."""
    path = workdir / "tokenizer.model"
    if not path.exists():
        corpus = write_default_corpus(workdir / "corpus.txt")
        train_tokenizer([corpus], vocab_size, workdir / "tokenizer")
    return path


def random_gguf(name: str, quant: str, workdir: Path) -> Path:
    """A random-init model of `name` as a GGUF file of `quant` (written once)."""
    path = workdir / f"{name}-{quant}.gguf"
    if not path.exists():
        cfg = model_config(name).replace(dropout_rate=0.0)
        canon, _ = canonicalize(cfg, model_params(Transformer(cfg, nnx.Rngs(0))), tokenizer(workdir),
                                rope_pairing="interleaved")
        write_gguf(canon, path, quant)
    return path


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a child process; raises if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {child.stderr.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def machine() -> str:
    cores = os.cpu_count()
    return f"{os.uname().machine}, {cores} cores, python {sys.version.split()[0]}"


__all__ = ["STAND_INS", "machine", "model_config", "random_gguf", "run_measured", "tokenizer"]
