"""Reward model configs: `--config=experiments/reward.py:<size>` (or `smollm2`).

The transformer with a scalar value head (`model.value_head=True`), read at each reply's last
token and trained with the Bradley-Terry loss on preference pairs (every DPO source format
works). Starts from the LM named by `train.init_from` (SFT, an import such as SmolLM2) with a
fresh head; empty: random init (tests). Default data: the hh-rlhf harmless pairs, 10% held out
for `eval_accuracy` (pair accuracy) and `eval_margin`. `smollm2`: the model comes from
`train.init_from` (an import workdir of SmolLM2-135M-Instruct), sized for a CPU run.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.dpo import get_config as dpo_config


def get_config(size: str = "tiny"):
    c = dpo_config("tiny" if size == "smollm2" else size)
    tiny = size == "tiny"
    del c.dpo
    c.stage = "reward"
    if size == "smollm2":
        c.model = ConfigDict({"dtype": "float32", "param_dtype": "float32", "dropout_rate": 0.0,
                              "remat": "none"})
        c.train.init_from = "runs/smollm2"
        c.data.seq_len = 256
    c.model.value_head = True
    c.data.holdout_every = 10
    c.train.steps = 200 if tiny else 1_000
    c.train.eval_every = 50 if tiny else 200
    c.optim.lr = 1e-3 if tiny else 1e-5
    if size == "smollm2":
        c.train.update(steps=120, batch_size=4, eval_every=120, eval_batches=1_000)
        c.optim.update(lr=3e-5, warmup_steps=10, weight_decay=0.0)
    return c
