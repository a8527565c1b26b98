"""End-to-end check of the fine-tuning stages on real data (a script, not a timed test).

    python -m benchmarks.finetune_check [--workdir finetune_check] [--sft_steps 600] [--dpo_steps 300]

1. a sentencepiece tokenizer trained on PubMedQA and hh-rlhf text,
2. SFT of the tiny model (random init) on PubMedQA (question + abstract -> long answer),
   every 10th item held out: the held-out answer loss must fall,
3. DPO from that checkpoint on the hh-rlhf harmless pairs, every 10th pair held out: the
   held-out reward accuracy must end clearly above 50%.
Reads ../shared/data; prints the numbers recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from data_pipelines.records import load_conversations, load_pairs
from data_pipelines.tokenizer import train_tokenizer
from experiments.dpo import get_config as dpo_config
from experiments.sft import get_config as sft_config
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PUBMEDQA = f"json:{SHARED}/domain/pubmedqa_pqal.json?format=pubmedqa"
HH = f"jsonl:{SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh"


def _tokenizer(workdir: Path, vocab_size: int) -> Path:
    corpus = workdir / "tokenizer_corpus.txt"
    with corpus.open("w", encoding="utf-8") as f:
        for c in load_conversations(PUBMEDQA):
            f.writelines(text.replace("\n", " ") + "\n" for _, text in c.messages)
        for p in load_pairs(HH):
            if p.prompt:
                f.writelines(text.replace("\n", " ") + "\n" for _, text in p.prompt)
                f.write(p.chosen.replace("\n", " ") + "\n")
    return train_tokenizer([corpus], vocab_size, workdir / "tokenizer")


def _curve(workdir: Path, key: str) -> tuple[float, float]:
    rows = [r for r in read_metrics(workdir) if key in r]
    return rows[0][key], rows[-1][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="finetune_check")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--sft_steps", type=int, default=600)
    parser.add_argument("--dpo_steps", type=int, default=300)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tokenizer = _tokenizer(workdir, args.vocab_size)

    sft = sft_config("tiny")
    sft.model.vocab_size = args.vocab_size
    sft.data.tokenizer = str(tokenizer)
    sft.train.update(steps=args.sft_steps, eval_every=args.sft_steps // 4, eval_batches=13,
                     checkpoint_every=args.sft_steps, progress_bar=False)
    Trainer(sft, workdir / "sft").run()
    before, after = _curve(workdir / "sft", "eval_loss")
    print(f"SFT {args.sft_steps} steps on PubMedQA: held-out answer loss {before:.3f} -> {after:.3f}")

    dpo = dpo_config("tiny")
    dpo.model.vocab_size = args.vocab_size
    dpo.train.update(init_from=str(workdir / "sft"), steps=args.dpo_steps,
                     eval_every=args.dpo_steps // 3, eval_batches=29,
                     checkpoint_every=args.dpo_steps, progress_bar=False)
    Trainer(dpo, workdir / "dpo").run()
    rows = [r for r in read_metrics(workdir / "dpo") if "eval_rewards/accuracy" in r]
    curve = ", ".join(f"step {r['step']}: {r['eval_rewards/accuracy']:.3f}" for r in rows)
    print(f"DPO {args.dpo_steps} steps on hh-rlhf: held-out reward accuracy {curve}; "
          f"margin {rows[-1]['eval_rewards/margin']:.3f} over {29 * dpo.train.batch_size} pairs")


if __name__ == "__main__":
    main()
