"""SmolLM2-135M-Instruct domain fine-tunes with QLoRA over its Q4_0 base (a script, not a test).

    python -m benchmarks.domain_qlora [--workdir domain_qlora] [--steps 25]
                                      [--domains healthcare finance legal] [--pubmedqa 100]

1. the SmolLM2 GGUF imported once as a workdir (the dense base),
2. per domain, `experiments/domain.py:smollm2,<domain>,qlora` (rank-16 adapters on all seven
   projections, the frozen base held as the Q4_0 blocks `convert --quant q4_0` writes): the
   held-out answer loss at step 0 and after `--steps` steps; for healthcare also PubMedQA
   accuracy (the evaluation harness, first `--pubmedqa` items) before and after,
3. for the first domain, the base exported as Q4_0 GGUF and the adapters as a LoRA GGUF on a
   held-out item: the two files run by the numpy float64 forward (`tests/gguf_reference.py`)
   vs the JAX model (are the files the trained model?), and llama.cpp running them vs the
   JAX model, next to llama.cpp on the base file alone vs the JAX Q4_0 base (how far
   llama.cpp's own quantized arithmetic, which rounds activations to 8 bits, moves SmolLM2
   with no adapter involved).
Reads ../shared/data; prints the numbers recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
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


def _llama_cpp_logits(model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None,
                          n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    return logits


def _agreement(a_TV: np.ndarray, b_TV: np.ndarray) -> dict:
    """max |logit diff|, mean KL(a || b) of the next-token distributions, top-1 agreement."""
    logp_a = a_TV - np.logaddexp.reduce(a_TV, axis=-1, keepdims=True)
    logp_b = b_TV - np.logaddexp.reduce(b_TV, axis=-1, keepdims=True)
    return {"max_diff": float(np.abs(a_TV - b_TV).max()),
            "kl": float(np.mean(np.sum(np.exp(logp_a) * (logp_a - logp_b), axis=-1))),
            "top1": float(np.mean(a_TV.argmax(-1) == b_TV.argmax(-1)))}


def llama_cpp_agreement(base: Path, adapters: Path, root: Path) -> dict:
    """The Q4_0 base + adapter GGUFs: the files vs the JAX model (numpy reference over the
    files, float math), and llama.cpp running them vs the JAX model, next to llama.cpp on the
    base alone vs the JAX base (the runtime's own Q4_0 arithmetic, adapter-free)."""
    from shakti_jax.quant_base import dequantize_params, quantize_params
    from tests.gguf_reference import GGUFModel

    base_file, adapter_file = root / "base-q4_0.gguf", root / "adapter.gguf"
    for args in (["--checkpoint", str(base), "--format", "gguf", "--quant", "q4_0", "--out", str(base_file)],
                 ["--checkpoint", str(adapters), "--format", "lora", "--out", str(adapter_file)]):
        subprocess.run([sys.executable, "-m", "shakti_jax.convert", "--no_progress", *args],
                       check=True, capture_output=True)
    tuned, dense = load_params(adapters), load_params(base)
    tok = Tokenizer.load(tuned.tokenizer_path)
    record = list(json.loads((SHARED / "domain" / "pubmedqa_pqal.json").read_text()).values())[9]
    ids = tok.encode(record["QUESTION"] + "\n" + record["CONTEXTS"][0])[:128]  # a held-out item
    apply = lambda loaded, params: np.asarray(loaded.model_def.apply(params, np.asarray([ids], np.int32)))[0]  # noqa: E731
    tuned_jax = apply(tuned, tuned.params)
    base_jax = apply(dense, dequantize_params(quantize_params(dense.config, dense.params, "q4_0")))
    reference = GGUFModel(base_file, adapter=adapter_file).logits(ids, round_activations=False)
    return {"tokens": len(ids),
            "files_vs_jax": float(np.abs(reference - tuned_jax).max()),
            "tuned": _agreement(tuned_jax, _llama_cpp_logits(base_file, ids, adapter_file)),
            "base": _agreement(base_jax, _llama_cpp_logits(base_file, ids)),
            "adapter_bytes": adapter_file.stat().st_size, "base_bytes": base_file.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="domain_qlora")
    parser.add_argument("--domains", nargs="+", default=["healthcare", "finance", "legal"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=384)
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
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time (the import is reused)
        result = finetune(base, domain, workdir, args.steps, args.batch, args.seq_len)
        metric = "-"
        if domain == "healthcare" and args.pubmedqa:
            before = pubmedqa_accuracy(base, args.pubmedqa, root / "pubmedqa-base.json")
            after = pubmedqa_accuracy(workdir, args.pubmedqa, root / "pubmedqa-qlora.json")
            metric = f"PubMedQA acc (first {args.pubmedqa}) {before:.3f} -> {after:.3f}"
        print(f"| {domain} | {result['before']:.3f} -> {result['after']:.3f} | "
              f"{result['step_time']:.2f} s | {metric} |", flush=True)
    first = root / f"{args.domains[0]}-qlora"
    a = llama_cpp_agreement(base, first, root)
    print(f"\n{args.domains[0]} adapter ({a['adapter_bytes'] / 2**20:.1f} MiB) over the Q4_0 base "
          f"({a['base_bytes'] / 2**20:.1f} MiB), {a['tokens']} held-out tokens: the two files (numpy "
          f"float64 forward) vs the JAX model: max |logit diff| {a['files_vs_jax']:.2e}\n")
    print("| llama.cpp running | vs JAX | max abs logit diff | mean KL | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name, what, jax_side in (("base", "base-q4_0.gguf", "the Q4_0 base"),
                                 ("tuned", "base-q4_0.gguf + adapter.gguf", "the QLoRA model")):
        r = a[name]
        print(f"| {what} | {jax_side} | {r['max_diff']:.3f} | {r['kl']:.2e} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
