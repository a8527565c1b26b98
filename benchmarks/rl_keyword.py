"""GRPO and PPO learning a verifiable reward on CPU: the tiny RL recipe's curves (a script,
not a test)

    python -m benchmarks.rl_keyword [--workdir rl_keyword] [--steps 40] [--word the]

The tiny recipe (`experiments/rl.py:tiny` and `tiny,ppo`: a random-init tiny policy, the
hh-rlhf harmless prompts, 8 prompts x 8 replies of up to 16 tokens per rollout, reward 1 when
the reply contains `--word`), trained on the default mesh of this machine with the shared
trainer, once per algorithm. Reads each run's metrics.jsonl and writes `rl_keyword.png`
(held-out reward, KL to the reference, response length vs step) and `rl_keyword.json` under
the workdir; prints the table recorded in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_pipelines.atomic import write_atomic
from data_pipelines.tokenizer import small_default_tokenizer
from experiments.rl import get_config
from shakti_jax import plots
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(algorithm: str, workdir: Path, tokenizer: Path, args) -> dict:
    c = get_config(f"tiny,{algorithm}")
    c.data.tokenizer = str(tokenizer)
    c.data.sources = (f"jsonl:{SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.rl.rewards = (f"keyword:{args.word}",)
    c.rl.eval_prompts = 64
    c.train.update(steps=args.steps, log_every=2, eval_every=max(2, args.steps // 8),
                   checkpoint_every=args.steps, progress_bar=False)
    c.optim.lr = args.lr
    start = time.perf_counter()
    if not list(workdir.glob("checkpoints/*")):
        Trainer(c, workdir).run()
    rows = read_metrics(workdir)
    steps = [r for r in rows if "reward_mean" in r]
    evals = [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r]
    return {"algorithm": algorithm, "seconds": round(time.perf_counter() - start, 1),
            "eval_reward": evals, "kl": [(r["step"], r["kl"]) for r in steps],
            "reward_mean": [(r["step"], r["reward_mean"]) for r in steps],
            "response_length": [(r["step"], r["response_length"]) for r in steps],
            "logp_mismatch_max": max(r["logp_mismatch"] for r in steps),
            "rollout_compiles": sorted({r["rollout_compiles"] for r in steps}),
            "rollout_tokens_per_sec": steps[-1]["rollout_tokens_per_sec"]}


def plot(results: list[dict], path: Path, word: str) -> None:
    fig, axes = plots.new(3, width=4.0)
    titles = {"eval_reward": f'held-out reward (reply contains "{word}")',
              "kl": "KL to the reference (k3, per token)", "response_length": "response length (tokens)"}
    for ax, (key, title) in zip(axes, titles.items()):
        plots.curves(ax, {r["algorithm"].upper(): tuple(zip(*r[key])) for r in results}, title=title,
                     xlabel="optimizer step", marker="o" if key == "eval_reward" else None)
    plots.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("rl_keyword"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--word", default="the")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = small_default_tokenizer(args.workdir)  # the test suite's
    results = [run(a, args.workdir / a, tokenizer, args) for a in ("grpo", "ppo")]
    write_atomic(args.workdir / "rl_keyword.json", json.dumps(results, indent=1).encode())
    plot(results, args.workdir / "rl_keyword.png", args.word)
    print("| algorithm | held-out reward: start -> end (best) | final KL | max logp mismatch |"
          " rollout compiles | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rewards = [v for _, v in r["eval_reward"]]
        print(f"| {r['algorithm'].upper()} | {rewards[0]:.3f} -> {rewards[-1]:.3f} ({max(rewards):.3f}) "
              f"| {r['kl'][-1][1]:.3f} | {r['logp_mismatch_max']:.1e} | {r['rollout_compiles']} "
              f"| {r['seconds']} |")


if __name__ == "__main__":
    main()
