"""The demo behind `make demo`: everything on an embedded default, no downloads.

1. harvest the default corpus (docstrings of the installed Python standard library),
2. train a Llama-style sentencepiece tokenizer on it,
3. build the tiny Shakti model, print its parameter breakdown, sample from the random init,
4. pretrain it on the corpus for a few minutes on CPU with the sharded trainer (the same
   `shakti_jax.train` code path as every size), showing the loss falling,
5. sample again from the trained checkpoint, and check that cached generation reproduces the
   no-cache reference token for token.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from experiments.pretrain import get_config as pretrain_config
from shakti_jax.config import ModelConfig
from shakti_jax.generate import Sampling, generate
from shakti_jax.info import render
from shakti_jax.model_stats import summary
from shakti_jax.train.checkpoint import load_model
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.step import ModelParts
from shakti_jax.train.trainer import Trainer

PROMPTS = ["Return the number of", "The default value is"]


def _samples(model, tok: Tokenizer, max_new_tokens: int, label: str) -> list[list[int]]:
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    greedy = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
    sampled = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                       sampling=Sampling(temperature=0.8, top_k=40, top_p=0.95), seed=1)
    print(f"      samples {label}:")
    for prompt, g, s in zip(PROMPTS, greedy.tokens, sampled.tokens):
        print(f"        greedy  {prompt!r} -> {tok.decode(g)!r}")
        print(f"        sampled {prompt!r} -> {tok.decode(s)!r}")
    return greedy.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out")
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    corpus = write_default_corpus(workdir / "default_corpus.txt")
    print(f"[1/5] default corpus: {corpus} ({corpus.stat().st_size:,} bytes) "
          f"in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    model_path = train_tokenizer([corpus], args.vocab_size, workdir / "tokenizer")
    tok = Tokenizer.load(model_path)
    sample_text = "split_digits: 2026-11-22, tabs\tand  spaces"
    ids = tok.encode(sample_text)
    print(f"[2/5] tokenizer: {model_path} ({tok.vocab_size} pieces) in {time.perf_counter() - t0:.1f}s")
    print(f"      {sample_text!r} -> {len(ids)} tokens, round trip exact: {tok.decode(ids) == sample_text}")

    config = pretrain_config("tiny")
    config.model.vocab_size = tok.vocab_size
    config.data.sources = (f"text:{corpus}",)
    config.data.tokenizer = str(model_path)
    config.train.steps = args.steps
    config.train.eval_every = config.train.checkpoint_every = max(args.steps // 5, 1)
    config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps // 10)
    parts = ModelParts.build(ModelConfig.from_dict(config.model.to_dict()), config.train.seed)
    print("[3/5] model:\n      " + render(summary(parts.cfg)).replace("\n", "\n      "))
    _samples(parts.model(parts.init_params(config.train.seed)), tok, args.max_new_tokens,
             "before training (random init)")

    run_dir = workdir / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always shows a run from scratch
    print(f"[4/5] pretraining {args.steps} steps of {config.train.batch_size} x "
          f"{config.data.seq_len} tokens into {run_dir}")
    t0 = time.perf_counter()
    Trainer(config, run_dir).run()
    rows = read_metrics(run_dir)
    shown = {rows[0]["step"], *(r["step"] for r in rows if "eval_loss" in r)}
    for row in (r for r in rows if r["step"] in shown):
        extra = (f", held-out loss {row['eval_loss']:.3f} ({row['eval_bits_per_byte']:.2f} bits/byte)"
                 if "eval_loss" in row else "")
        print(f"      step {row['step']:4d}: train loss {row['loss']:.3f}{extra}")
    print(f"      {time.perf_counter() - t0:.0f}s, {rows[-1]['tokens_per_sec']:,.0f} tokens/s, "
          f"MFU {rows[-1]['mfu']:.1%} of this CPU's measured matmul rate")
    if not rows[-1]["loss"] < rows[0]["loss"] - 1.0:
        raise SystemExit("the loss did not fall during pretraining")

    loaded = load_model(run_dir)
    print(f"[5/5] generation from checkpoint step {loaded.step}:")
    greedy = _samples(loaded.model, tok, args.max_new_tokens, "after training")
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    reference = generate(loaded.model, prompts, max_new_tokens=args.max_new_tokens,
                         eos_id=tok.eos_id, use_cache=False)
    print(f"      cached == no-cache reference: {greedy == reference.tokens}")
    if greedy != reference.tokens:
        raise SystemExit("cached generation disagrees with the no-cache reference")


if __name__ == "__main__":
    main()
