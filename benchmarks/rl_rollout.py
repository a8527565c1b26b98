"""RL rollout throughput vs the standalone generator on the same shapes (a script, not a test)

    python -m benchmarks.rl_rollout [--workdir rl_rollout] [--steps 8] [--algorithm grpo]

In one process: the tiny RL recipe (`experiments/rl.py:tiny`: 8 prompts x 8 replies, prompt
bucket 96, up to 16 new tokens) runs `--steps` updates on the trainer's mesh; its logged
`rollout_tokens_per_sec` (generated tokens / sampling seconds, per rollout) and
`rollout_compiles` (generator buckets + jitted scoring passes) are read back. Then the
trained checkpoint's params go to a standalone `Generator` on one device, which samples the
same prompts with the same settings `--repeats` times after a warm-up call. Prints the
table recorded in docs/benchmarks.md: rollouts after the first vs standalone, the ratio
(target: RL within 1.5x), the compile counts, and the update step's time beside.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from data_pipelines.pipeline import SkippedRecords
from data_pipelines.tokenizer import Tokenizer, small_default_tokenizer
from experiments.rl import get_config
from shakti_jax.config import ModelConfig
from shakti_jax.generate import Generator, Sampling
from shakti_jax.model import ModelDef
from shakti_jax.train.checkpoint import load_params
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.tasks import make_task
from shakti_jax.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("rl_rollout"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--algorithm", choices=("grpo", "ppo"), default="grpo")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = small_default_tokenizer(args.workdir)  # the test suite's

    c = get_config(f"tiny,{args.algorithm}")
    c.data.tokenizer = str(tokenizer)
    c.data.sources = (f"jsonl:{SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.train.update(steps=args.steps, log_every=c.rl.updates_per_rollout, eval_every=10**6,
                   checkpoint_every=args.steps, progress_bar=False)
    run = args.workdir / args.algorithm
    Trainer(c, run).run()
    rows = [r for r in read_metrics(run) if "rollout_tokens_per_sec" in r]
    in_rl = [r["rollout_tokens_per_sec"] for r in rows[1:]]  # the first rollout compiles
    compiles = sorted({int(r["rollout_compiles"]) for r in rows})

    cfg = ModelConfig.from_dict(c.model.to_dict())
    model_def = ModelDef.from_config(cfg)
    task = make_task(c, Tokenizer.load(tokenizer), SkippedRecords(), cfg)
    params = load_params(run).params
    prompts = [task.prompts[i]["ids"] for i in range(c.train.batch_size) for _ in range(c.rl.group_size)]
    generator = Generator(model_def, params)
    rates = []
    for seed in range(args.repeats + 1):
        start = time.perf_counter()
        out = generator(prompts, max_new_tokens=c.rl.max_new_tokens, sampling=Sampling(c.rl.temperature),
                        eos_id=task.eos_id, seed=seed, prompt_bucket=c.rl.max_prompt_len)
        seconds = time.perf_counter() - start
        if seed:  # seed 0 compiles
            rates.append((sum(len(t) for t in out.tokens) + sum(out.stopped)) / seconds)
    rl_rate, alone = float(np.median(in_rl)), float(np.median(rates))
    step_time = float(np.median([r["step_time"] for r in rows[1:]]))
    print(f"{jax.device_count()} device(s) ({jax.devices()[0].platform}); {len(prompts)} rows, prompt bucket "
          f"{c.rl.max_prompt_len}, {c.rl.max_new_tokens} new tokens, {args.algorithm}")
    print("| path | generated tokens/s (median) | compiles |")
    print("|---|---|---|")
    print(f"| RL rollouts 2..{len(rows)} on the trainer's params | {rl_rate:,.0f} | {compiles} "
          f"(constant: {len(compiles) == 1}) |")
    print(f"| standalone Generator, {args.repeats} calls | {alone:,.0f} | {len(generator.compiled_buckets)} bucket |")
    print(f"standalone / RL = {alone / rl_rate:.2f}x (target <= 1.5x); trainer step {step_time * 1e3:.0f} ms (rollout included), "
          f"rollout {np.median([r['rollout_seconds'] for r in rows[1:]]):.2f} s (sampling + rewards + scoring)")


if __name__ == "__main__":
    main()
