"""SmolLM2-135M-Instruct domain fine-tunes with QLoRA over its Q4_0 base (a script, not a test).

    python -m benchmarks.domain_qlora [--workdir domain_qlora] [--steps 40]
                                      [--domains healthcare finance legal] [--pubmedqa 100]

1. the SmolLM2 GGUF imported once as a workdir (the dense base),
2. per domain, `experiments/domain.py:smollm2,<domain>,qlora` (rank-16 adapters on all seven
   projections, the frozen base held as the Q4_0 blocks `convert --quant q4_0` writes): the
   held-out answer loss at step 0 and after `--steps` steps; for healthcare also PubMedQA
   accuracy (the evaluation harness, first `--pubmedqa` items) before and after,
3. for the first domain, the base exported as Q4_0 GGUF and the adapters as a LoRA GGUF, run
   together in llama.cpp on a held-out prompt: max |logit diff| vs the JAX model, and vs the
   numpy reference of the two files with llama.cpp's Q8_0 activation rounding
   (`tests/gguf_reference.py`), which separates the runtime's rounding from any layout error.
Reads ../shared/data; prints the numbers recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.import_model import smollm_gguf
from data_pipelines.tokenizer import Tokenizer
from experiments.demo_smollm2 import imported_smollm
from experiments.domain import get_config as domain_config
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def finetune(base: Path, domain: str, workdir: Path, steps: int, batch: int, seq_len: int) -> dict:
    config = domain_config(f"smollm2,{domain},qlora")
    config.train.update(init_from=str(base), steps=steps, batch_size=batch, eval_every=steps,
                        log_every=max(1, steps // 4), checkpoint_every=steps, eval_batches=4,
                        progress_bar=False)
    config.data.seq_len = seq_len
    start = time.perf_counter()
    Trainer(config, workdir).run()
    rows = [r for r in read_metrics(workdir) if "eval_loss" in r]
    times = [r["step_time"] for r in read_metrics(workdir) if "step_time" in r]
    return {"before": rows[0]["eval_loss"], "after": rows[-1]["eval_loss"],
            "step_time": float(np.median(times)), "seconds": time.perf_counter() - start}


def pubmedqa_accuracy(model: Path, items: int, out: Path) -> float:
    subprocess.run([sys.executable, "-m", "shakti_jax.eval", "--model", str(model), "--no_progress",
                    "--tasks", f"pubmedqa@{items}:{SHARED}/domain/pubmedqa_pqal.json",
                    "--max_len", "1024", "--out", str(out)], check=True, capture_output=True)
    task = json.loads(out.read_text())["tasks"]
    return next(iter(task.values()))["acc"]


def llama_cpp_agreement(base: Path, adapters: Path, root: Path) -> dict:
    """llama.cpp running the Q4_0 base + adapter GGUFs vs the JAX model and the numpy reference."""
    import llama_cpp

    from tests.gguf_reference import GGUFModel

    for args in (["--checkpoint", str(base), "--format", "gguf", "--quant", "q4_0",
                  "--out", str(root / "base-q4_0.gguf")],
                 ["--checkpoint", str(adapters), "--format", "lora", "--out", str(root / "adapter.gguf")]):
        subprocess.run([sys.executable, "-m", "shakti_jax.convert", "--no_progress", *args],
                       check=True, capture_output=True)
    loaded = load_params(adapters)
    tok = Tokenizer.load(loaded.tokenizer_path)
    record = json.loads((SHARED / "domain" / "pubmedqa_pqal.json").read_text())
    question = list(record.values())[9]["QUESTION"]  # every 10th record is held out: index 9
    ids = tok.encode(question)[:64]
    logits_jax = np.asarray(loaded.model_def.apply(loaded.params, np.asarray([ids], np.int32)))[0]
    llm = llama_cpp.Llama(model_path=str(root / "base-q4_0.gguf"), lora_path=str(root / "adapter.gguf"),
                          n_ctx=128, n_batch=128, n_ubatch=128, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    logits_llama = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    reference = GGUFModel(root / "base-q4_0.gguf", adapter=root / "adapter.gguf")
    return {"tokens": len(ids), "llama_vs_jax": float(np.abs(logits_llama - logits_jax).max()),
            "llama_vs_reference": float(np.abs(reference.logits(ids) - logits_llama).max()),
            "files_vs_jax": float(np.abs(reference.logits(ids, round_activations=False) - logits_jax).max()),
            "top1_agree": float(np.mean(logits_llama.argmax(-1) == logits_jax.argmax(-1))),
            "adapter_bytes": (root / "adapter.gguf").stat().st_size,
            "base_bytes": (root / "base-q4_0.gguf").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="domain_qlora")
    parser.add_argument("--domains", nargs="+", default=["healthcare", "finance", "legal"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--pubmedqa", type=int, default=100, help="PubMedQA items scored (0: skip)")
    args = parser.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    base = imported_smollm(root, smollm_gguf())
    print(f"{time.strftime('%Y-%m-%d')}: SmolLM2-135M-Instruct, QLoRA rank 16 on q,k,v,o,gate,up,down "
          f"over a Q4_0 base; {args.steps} steps of {args.batch} x {args.seq_len} tokens\n")
    print("| domain | held-out answer loss, step 0 -> end | step time | domain metric |")
    print("|---|---|---|---|")
    for domain in args.domains:
        workdir = root / f"{domain}-qlora"
        result = finetune(base, domain, workdir, args.steps, args.batch, args.seq_len)
        metric = "-"
        if domain == "healthcare" and args.pubmedqa:
            before = pubmedqa_accuracy(base, args.pubmedqa, root / "pubmedqa-base.json")
            after = pubmedqa_accuracy(workdir, args.pubmedqa, root / "pubmedqa-qlora.json")
            metric = f"PubMedQA acc (first {args.pubmedqa}) {before:.3f} -> {after:.3f}"
        print(f"| {domain} | {result['before']:.3f} -> {result['after']:.3f} | "
              f"{result['step_time']:.2f} s | {metric} |", flush=True)
    first = root / f"{args.domains[0]}-qlora"
    agreement = llama_cpp_agreement(base, first, root)
    print(f"\n{args.domains[0]} adapters in llama.cpp over the Q4_0 base ({agreement['tokens']} tokens): "
          f"max |logit diff| vs JAX {agreement['llama_vs_jax']:.2e} (top-1 agreement "
          f"{agreement['top1_agree']:.3f}); vs the numpy reference of the two files with "
          f"llama.cpp's activation rounding {agreement['llama_vs_reference']:.2e}; files vs JAX "
          f"without rounding {agreement['files_vs_jax']:.2e}; adapter {agreement['adapter_bytes'] / 2**20:.1f} "
          f"MiB next to a {agreement['base_bytes'] / 2**20:.1f} MiB base")


if __name__ == "__main__":
    main()
