"""Pretraining: packed documents, next-token loss; eval: loss, perplexity, bits per byte."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from data_pipelines.pipeline import eval_batches, open_sources, train_batches
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.model import ModelDef
from shakti_jax.train.losses import lm_loss_sums
from shakti_jax.train.step import Objective
from shakti_jax.train.tasks.base import Task


class PretrainTask(Task):
    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        data = config.data
        self.sources = open_sources(list(data.sources))
        self.eval_sources = open_sources(list(data.eval_sources)) if data.eval_sources else None
        self._byte_lengths = token_byte_lengths(tokenizer)

    @property
    def _holdout_every(self) -> int:
        return 0 if self.eval_sources else self.config.data.holdout_every

    def _align(self) -> int:
        """Documents start on layout-block boundaries in models with block-sparse layers."""
        cfg = self.model_config
        return cfg.sparse.block_size if "block_sparse" in cfg.layer_kinds else 1

    def train_dataset(self, batch_size, process_index, process_count):
        data = self.config.data
        return train_batches(self.sources, self.tokenizer, batch_size=batch_size, seed=data.seed,
                             holdout_every=self._holdout_every, num_threads=data.num_threads,
                             align=self._align(), **self._common(process_index, process_count))

    def eval_datasets(self, batch_size, process_index, process_count):
        if not self.eval_sources and not self.config.data.holdout_every:
            return {}
        return {"held_out": eval_batches(self.eval_sources or self.sources, self.tokenizer,
                            batch_size=batch_size, holdout_every=self._holdout_every,
                            align=self._align(), **self._common(process_index, process_count))}

    def eval_objective(self, model_def: ModelDef) -> Objective:
        """The LM loss plus the UTF-8 bytes the targets stand for, summed on device, so bits
        per byte add up over every process's (different) documents."""
        byte_lengths_V = jnp.asarray(self._byte_lengths, jnp.float32)

        def objective(params, task_state, mb, key):
            logits = model_def.apply(params, mb["inputs"], mb["positions"], mb["segment_ids"])
            nll, z, count = lm_loss_sums(logits, mb["targets"], mb["loss_mask"])
            n_bytes = jnp.sum(byte_lengths_V[mb["targets"]] * mb["loss_mask"])
            return nll, {"loss": nll, "bytes": n_bytes}, count

        return objective

    def eval_summary(self, sums, count):
        out = super().eval_summary(sums, count)
        out["eval_bits_per_byte"] = sums["loss"] / (math.log(2) * max(sums["bytes"], 1.0))
        return out


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (special tokens 0): `Tokenizer.byte_lengths`."""
    return tokenizer.byte_lengths()
