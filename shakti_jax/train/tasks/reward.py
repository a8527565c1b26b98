"""Reward model: the transformer's value head read at each reply's last token, trained with
the Bradley-Terry loss on preference pairs (the DPO sources and formats).

Per pair, with scores r_c, r_r of the chosen and rejected conversations:
  loss = -log sigmoid(r_c - r_r); accuracy = [r_c > r_r]; margin = r_c - r_r.
Rows are whole sequences (prompt + reply + end of turn, `data.seq_len` tokens at most), so
the score sees the reply's final token. Needs `model.value_head=True`; from a plain LM
checkpoint (`train.init_from`) the head starts fresh. `convert --format hf` writes the result
as a sequence-classification folder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.config import ConfigError
from shakti_jax.model import ModelDef
from shakti_jax.train.batches import Field
from shakti_jax.train.step import Objective
from shakti_jax.train.tasks.dpo import PairTask

SCHEMA = {"tokens": Field(jnp.int32, ("rows", "seq")), "positions": Field(jnp.int32, ("rows", "seq")),
          "segment_ids": Field(jnp.int32, ("rows", "seq")), "last": Field(jnp.int32, ("rows",))}


class RewardTask(PairTask):
    batch_schema = SCHEMA

    def __init__(self, config, tokenizer, skipped, model_config):
        if not model_config.value_head:
            raise ConfigError("stage=reward needs a value head: set model.value_head=True")
        super().__init__(config, tokenizer, skipped, model_config)

    def objective(self, model_def: ModelDef) -> Objective:
        def objective(params, task_state, mb, key):
            values_BT = model_def.values(params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                         dropout_key=key)
            scores = jnp.take_along_axis(values_BT, mb["last"][:, None], axis=1)[:, 0]
            pairs = scores.shape[0] // 2
            chosen, rejected = scores[:pairs], scores[pairs:]
            margin = chosen - rejected
            per_pair = -jax.nn.log_sigmoid(margin)
            sums = {"loss": per_pair.sum(), "accuracy": (margin > 0).astype(jnp.float32).sum(),
                    "margin": margin.sum(), "score_chosen": chosen.sum(), "score_rejected": rejected.sum()}
            return per_pair.sum(), sums, jnp.asarray(pairs, jnp.float32)

        return objective

    def train_dataset(self, batch_size, process_index, process_count):
        return self._reward_rows(batch_size, process_index, process_count, "train", self.config.data.seed)

    def eval_datasets(self, batch_size, process_index, process_count):
        if not self.config.data.holdout_every:
            return {}
        return {name: self._reward_rows(batch_size, process_index, process_count, "eval", None, source=s)
                for s, name in enumerate(self.names)}

    def _reward_rows(self, batch_size, process_index, process_count, part, seed, source=None):
        ds = self._dataset(batch_size, process_index, process_count, part, seed, source=source,
                           seq_len=self.config.data.seq_len - 1)
        return ds.map(to_reward_rows)


def to_reward_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A pair batch (inputs / targets, `seq_len - 1` wide) -> whole sequences `seq_len` wide,
    with each row's last real index."""
    tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
    lengths = batch["lengths"]
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return {"tokens": np.where(real, tokens, 0).astype(np.int32),
            "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy(),
            "segment_ids": real.astype(np.int32), "last": (lengths - 1).astype(np.int32)}
