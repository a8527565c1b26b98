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
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.dpo import get_config as dpo_experiment
from shakti_jax.config import get_config
from shakti_jax.sharding import make_mesh
from shakti_jax.train.optimizer import make_optimizer
from shakti_jax.train.step import (ModelParts, dpo_objective, init_train_state, lm_objective,
                                   make_train_step)
from shakti_jax.train.trainer import train_state_layout


def _time(parts, tx, schedule, objective, batch, with_reference: bool, steps: int) -> float:
    mesh = make_mesh(data=1, fsdp=-1)
    shardings, _ = train_state_layout(parts, tx, mesh, 0, with_reference)
    state = jax.jit(lambda: init_train_state(parts, tx, 0, with_reference=with_reference),
                    out_shardings=shardings)()
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    step = jax.jit(make_train_step(parts, tx, schedule, objective),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                   donate_argnums=0)
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
    parts = ModelParts.build(cfg, seed=0)
    tx, schedule = make_optimizer(dpo_experiment("tiny").optim, 1000)
    rows, T = 2 * args.pairs, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, size=(rows, T + 1)).astype(np.int32)
    mask = np.zeros((rows, T), np.float32)
    mask[:, T // 2:] = 1  # the reply half of each row
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((rows, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()}
    dpo = dict(beta=0.1, loss="sigmoid", label_smoothing=0.0)
    precomputed = {**batch, "ref_chosen": rng.normal(-100, 5, args.pairs).astype(np.float32),
                   "ref_rejected": rng.normal(-100, 5, args.pairs).astype(np.float32)}
    sft = _time(parts, tx, schedule, lm_objective(parts), batch, False, args.steps)
    memory = _time(parts, tx, schedule, dpo_objective(parts, **dpo), batch, True, args.steps)
    pre = _time(parts, tx, schedule, dpo_objective(parts, **dpo), precomputed, False, args.steps)
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
