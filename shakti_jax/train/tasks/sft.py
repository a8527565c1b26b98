"""SFT: packed conversations, loss on assistant tokens; eval: held-out answer loss per source.

Several `data.sources` are sampled by their `weight=` (a 3:1 mixture gives three examples of
the first per one of the second, in expectation); each source holds out its own
every-`data.holdout_every`-th record, and each gets its own held-out metrics."""

from __future__ import annotations

from data_pipelines.pipeline import sft_batches
from data_pipelines.records import RECORD_KINDS, load_conversations
from data_pipelines.sources import SourceSpec
from shakti_jax.train.tasks.base import Task, source_names


class SFTTask(Task):
    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        specs = list(config.data.sources)
        self.sources = [(spec, load_conversations(spec)) for spec in specs]
        self.weights = [SourceSpec.parse(spec, kinds=RECORD_KINDS).weight for spec in specs]
        self.names = source_names(specs)

    def _dataset(self, sources, weights, batch_size, process_index, process_count, part):
        data = self.config.data
        return sft_batches(sources, self.tokenizer, batch_size=batch_size,
                           seed=data.seed if part == "train" else None,
                           holdout_every=data.holdout_every, part=part,
                           num_threads=data.num_threads, weights=weights,
                           **self._common(process_index, process_count))

    def train_dataset(self, batch_size, process_index, process_count):
        return self._dataset(self.sources, self.weights, batch_size, process_index, process_count, "train")

    def eval_datasets(self, batch_size, process_index, process_count):
        if not self.config.data.holdout_every:
            return {}
        return {name: self._dataset([source], None, batch_size, process_index, process_count, "eval")
                for name, source in zip(self.names, self.sources)}
