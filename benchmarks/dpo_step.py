"""DPO step time relative to an SFT step on the same rows, in one process.

    python -m benchmarks.dpo_step [--model tiny] [--pairs 8] [--seq_len 256] [--steps 5]

The SFT step trains on 2 x pairs rows; the DPO steps score the same rows as [chosen;
rejected] pairs, with the reference in memory (a second, frozen forward pass) or precomputed
(log-probs in the batch). Targets: at most 2.2x and 1.6x the SFT step.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from experiments.dpo import get_config as dpo_experiment
from shakti_jax.config import get_config
from shakti_jax.model import ModelDef
from shakti_jax.sharding import make_mesh
from shakti_jax.train import batches
from shakti_jax.train.optimizer import make_optimizer
from shakti_jax.train.step import build_step
from shakti_jax.train.tasks import Task
from shakti_jax.train.tasks.dpo import DPOTask


class _PairsTask(Task):
    """DPO's objective and reference state over given batches (no data files)."""

    rows_per_example = 2
    init_task_state = DPOTask.init_task_state
    task_state_shardings = DPOTask.task_state_shardings
    objective = DPOTask.objective

    def __init__(self, config, cfg, in_memory: bool):
        super().__init__(config, None, None, cfg)
        self.in_memory = in_memory
        if not in_memory:
            self.batch_schema = {**batches.TOKENS, **batches.REFERENCE_LOGPS}


def _time(task: Task, cfg, batch, batch_size: int, steps: int) -> float:
    built = build_step(task, ModelDef.from_config(cfg), make_optimizer(task.config.optim, 1000),
                       make_mesh(data=1, fsdp=-1), batch_size=batch_size)
    step, state = built.train, built.init()
    batch = built.global_batch(batch)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    cfg = get_config(args.model, dtype=args.dtype, dropout_rate=0.0)
    config = dpo_experiment("tiny")
    config.data.seq_len = args.seq_len
    rows, T = 2 * args.pairs, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, size=(rows, T + 1)).astype(np.int32)
    mask = np.zeros((rows, T), np.float32)
    mask[:, T // 2:] = 1  # the reply half of each row
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((rows, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()}
    precomputed = {**batch, "ref_chosen": rng.normal(-100, 5, args.pairs).astype(np.float32),
                   "ref_rejected": rng.normal(-100, 5, args.pairs).astype(np.float32)}
    sft = _time(Task(config, None, None, cfg), cfg, batch, rows, args.steps)
    memory = _time(_PairsTask(config, cfg, True), cfg, batch, args.pairs, args.steps)
    pre = _time(_PairsTask(config, cfg, False), cfg, precomputed, args.pairs, args.steps)
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {args.dtype}, "
          f"{time.strftime('%Y-%m-%d')}; {args.model}, {args.pairs} pairs = {rows} rows x {T}\n")
    print("| step | time | vs SFT |")
    print("|---|---|---|")
    for name, t in (("SFT", sft), ("DPO, in-memory reference", memory),
                    ("DPO, precomputed reference", pre)):
        print(f"| {name} | {t * 1e3:,.1f} ms | {t / sft:.2f}x |")


if __name__ == "__main__":
    main()
