"""SFT: packed conversations, loss on assistant tokens; eval: held-out answer loss."""

from __future__ import annotations

from data_pipelines.pipeline import sft_batches
from data_pipelines.records import load_conversations
from shakti_jax.train.tasks.base import Task


class SFTTask(Task):
    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        self.sources = [(spec, load_conversations(spec)) for spec in config.data.sources]

    def _dataset(self, batch_size, process_index, process_count, part):
        data = self.config.data
        return sft_batches(self.sources, self.tokenizer, batch_size=batch_size,
                           seed=data.seed if part == "train" else None,
                           holdout_every=data.holdout_every, part=part,
                           num_threads=data.num_threads,
                           **self._common(process_index, process_count))

    def train_dataset(self, batch_size, process_index, process_count):
        return self._dataset(batch_size, process_index, process_count, "train")

    def eval_dataset(self, batch_size, process_index, process_count):
        if not self.config.data.holdout_every:
            return None
        return self._dataset(batch_size, process_index, process_count, "eval")
