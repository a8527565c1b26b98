"""The demo behind `make demo`: everything on an embedded default, no downloads.

1. harvest the default corpus (docstrings of the installed Python standard library),
2. train a Llama-style sentencepiece tokenizer on it,
3. build the tiny Shakti model, print its parameter breakdown, sample from the random init,
4. pretrain it on the corpus for a few minutes on CPU with the sharded trainer (the same
   `shakti_jax.train` code path as every size), showing the loss falling,
5. fine-tune it (SFT, loss on answers only) on embedded instructions: "What does
   module.function do?" -> the function's docstring summary, showing the held-out answer loss,
6. align it with DPO on embedded preference pairs (the right summary against another
   function's), showing the held-out reward accuracy,
7. answer held-out questions before and after, and check that cached generation reproduces
   the no-cache reference token for token,
8. convert the final checkpoint to GGUF (F32, Q8_0, Q4_0) with the size table, and answer the
   same questions in llama.cpp (when the `edge` extra is installed): the F32 file must give the
   JAX model's greedy answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from data_pipelines.default_corpus import (default_instructions, default_preference_pairs,
                                           write_default_corpus)
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from experiments.dpo import get_config as dpo_config
from experiments.pretrain import get_config as pretrain_config
from experiments.sft import get_config as sft_config
from shakti_jax.config import ModelConfig
from shakti_jax.convert import convert, plan, table
from shakti_jax.export import ExportError
from shakti_jax.generate import Generator, Sampling
from shakti_jax.info import render
from shakti_jax.model_stats import summary
from shakti_jax.model import ModelDef
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

PROMPTS = ["Return the number of", "The default value is"]


def _samples(generator: Generator, tok: Tokenizer, max_new_tokens: int, label: str) -> list[list[int]]:
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    greedy = generator(prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
    sampled = generator(prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
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
    parser.add_argument("--steps", type=int, default=1200, help="pretraining steps")
    parser.add_argument("--sft_steps", type=int, default=300)
    parser.add_argument("--dpo_steps", type=int, default=60)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    corpus = write_default_corpus(workdir / "default_corpus.txt")
    print(f"[1/8] default corpus: {corpus} ({corpus.stat().st_size:,} bytes) "
          f"in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    model_path = train_tokenizer([corpus], args.vocab_size, workdir / "tokenizer")
    tok = Tokenizer.load(model_path)
    sample_text = "split_digits: 2026-11-22, tabs\tand  spaces"
    ids = tok.encode(sample_text)
    print(f"[2/8] tokenizer: {model_path} ({tok.vocab_size} pieces) in {time.perf_counter() - t0:.1f}s")
    print(f"      {sample_text!r} -> {len(ids)} tokens, round trip exact: {tok.decode(ids) == sample_text}")

    config = pretrain_config("tiny")
    config.model.vocab_size = tok.vocab_size
    config.data.sources = (f"text:{corpus}",)
    config.data.tokenizer = str(model_path)
    config.train.steps = args.steps
    config.train.eval_every = config.train.checkpoint_every = max(args.steps // 5, 1)
    config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps // 10)
    model_def = ModelDef.from_config(ModelConfig.from_dict(config.model.to_dict()))
    print("[3/8] model:\n      " + render(summary(model_def.config)).replace("\n", "\n      "))
    _samples(Generator(model_def, model_def.init(config.train.seed)), tok, args.max_new_tokens,
             "before training (random init)")

    run_dir = workdir / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always shows a run from scratch
    print(f"[4/8] pretraining {args.steps} steps of {config.train.batch_size} x "
          f"{config.data.seq_len} tokens into {run_dir}")
    t0 = time.perf_counter()
    Trainer(config, run_dir).run()
    rows = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    for row in rows:
        train = f"train loss {row['loss']:.3f}, " if "loss" in row else ""
        print(f"      step {row['step']:4d}: {train}held-out loss {row['eval_loss']:.3f} "
              f"({row['eval_bits_per_byte']:.2f} bits/byte)")
    print(f"      {time.perf_counter() - t0:.0f}s, {rows[-1]['tokens_per_sec']:,.0f} tokens/s, "
          f"MFU {rows[-1]['mfu']:.1%} of this CPU's measured matmul rate")
    if not rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 1.0:
        raise SystemExit("the held-out loss did not fall during pretraining")

    questions = _finetuning_data(workdir)
    held_out = [q for i, q in enumerate(questions) if i % 10 == 9][:2]
    print("      answers of the pretrained model:")
    _answers(_generator(run_dir), tok, held_out, args.max_new_tokens)

    sft_dir = workdir / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft = _stage_config(sft_config("tiny"), config, run_dir, args.sft_steps,
                        f"jsonl:{workdir / 'instructions.jsonl'}?format=prompt_completion")
    sft.data.seq_len = 128
    print(f"[5/8] SFT {args.sft_steps} steps on {len(questions)} embedded instructions "
          f"(loss on answers only, every 10th held out)")
    Trainer(sft, sft_dir).run()
    evals = [r for r in read_metrics(sft_dir) if "eval_loss" in r]
    print(f"      held-out answer loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}")
    print("      answers after SFT:")
    _answers(_generator(sft_dir), tok, held_out, args.max_new_tokens)

    dpo_dir = workdir / "dpo"
    shutil.rmtree(dpo_dir, ignore_errors=True)
    dpo = _stage_config(dpo_config("tiny"), config, sft_dir, args.dpo_steps,
                        f"jsonl:{workdir / 'preferences.jsonl'}?format=pairs")
    dpo.data.seq_len = 128
    print(f"[6/8] DPO {args.dpo_steps} steps (beta {dpo.dpo.beta}, in-memory reference)")
    Trainer(dpo, dpo_dir).run()
    evals = [r for r in read_metrics(dpo_dir) if "eval_rewards/accuracy" in r]
    print(f"      held-out reward accuracy {evals[0]['eval_rewards/accuracy']:.2f} -> "
          f"{evals[-1]['eval_rewards/accuracy']:.2f}, margin "
          f"{evals[0]['eval_rewards/margin']:.3f} -> {evals[-1]['eval_rewards/margin']:.3f}")

    loaded = load_params(dpo_dir)
    print(f"[7/8] answers of the final model (checkpoint step {loaded.step}):")
    final = Generator(loaded.model_def, loaded.params)
    greedy = _answers(final, tok, held_out, args.max_new_tokens)
    prompts = [_chat_prompt(tok, q["prompt"]) for q in held_out]
    reference = final(prompts, max_new_tokens=args.max_new_tokens,
                      eos_id=tok.chat_token_ids["<|end|>"], use_cache=False)
    print(f"      cached == no-cache reference: {greedy == reference.tokens}")
    if greedy != reference.tokens:
        raise SystemExit("cached generation disagrees with the no-cache reference")
    _export(dpo_dir, workdir / "export", tok, prompts, greedy, args.max_new_tokens)


def _export(checkpoint: Path, out_dir: Path, tok: Tokenizer, prompts, jax_answers, max_new_tokens: int) -> None:
    print(f"[8/8] edge export of {checkpoint} into {out_dir}")
    jobs = plan([checkpoint], "gguf", ["f32", "q8_0", "q4_0"], out_dir)
    results = convert(jobs, "gguf", progress=False)
    print("      " + table(results).replace("\n", "\n      "))
    try:
        from shakti_jax.export import llama_runtime
        runtimes = {r.job.quant: llama_runtime.load(r.job.out) for r in results}
    except ExportError as err:
        print(f"      (not run in llama.cpp: {err})")
        return
    end = tok.chat_token_ids["<|end|>"]
    for quant in ("f32", "q4_0"):
        answers = [llama_runtime.greedy(runtimes[quant], p, max_new_tokens, end) for p in prompts]
        print(f"      llama.cpp {quant}: " + "; ".join(repr(tok.decode(a)) for a in answers))
        if quant == "f32":
            print(f"      llama.cpp f32 greedy == JAX greedy: {answers == jax_answers}")
            if answers != jax_answers:
                raise SystemExit("llama.cpp disagrees with the JAX model on the F32 export")


def _finetuning_data(workdir: Path) -> list[dict[str, str]]:
    questions = default_instructions()
    for name, rows in (("instructions", questions), ("preferences", default_preference_pairs())):
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def _stage_config(stage, pretrain, init_from: Path, steps: int, source: str):
    stage.model = pretrain.model
    stage.data.tokenizer = pretrain.data.tokenizer
    stage.data.sources = (source,)
    stage.train.init_from = str(init_from)
    stage.train.steps = steps
    stage.train.eval_every = stage.train.checkpoint_every = steps
    stage.optim.warmup_steps = max(steps // 20, 1)
    return stage


def _chat_prompt(tok: Tokenizer, question: str) -> list[int]:
    chat = tok.chat_token_ids
    return [tok.bos_id, chat["<|user|>"], *tok.encode(question), chat["<|end|>"],
            chat["<|assistant|>"]]


def _generator(workdir: Path) -> Generator:
    loaded = load_params(workdir)
    return Generator(loaded.model_def, loaded.params)


def _answers(generator: Generator, tok: Tokenizer, questions, max_new_tokens: int) -> list[list[int]]:
    prompts = [_chat_prompt(tok, q["prompt"]) for q in questions]
    out = generator(prompts, max_new_tokens=max_new_tokens, eos_id=tok.chat_token_ids["<|end|>"])
    for q, ids in zip(questions, out.tokens):
        print(f"        {q['prompt']!r} -> {tok.decode(ids)!r}  (reference: {q['completion']!r})")
    return out.tokens


if __name__ == "__main__":
    main()
