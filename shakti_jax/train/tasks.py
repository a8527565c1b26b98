"""Training stages as tasks: what data a stage reads, its objective, and its evaluation.

One trainer loop serves every stage; `config.stage` picks the task:
  pretrain  packed documents, next-token loss; eval: loss, perplexity, bits per byte
  sft       packed conversations, loss on assistant tokens; eval: held-out answer loss
  dpo       preference pairs as [chosen; rejected] rows; eval: reward accuracy and margins
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data_pipelines.pipeline import (SkippedRecords, dpo_batches, eval_batches, open_sources,
                                     sft_batches, train_batches)
from data_pipelines.records import load_conversations, load_pairs
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ConfigError
from shakti_jax.train.dpo import LOSSES
from shakti_jax.train.step import BATCH_KEYS, ModelParts, Objective, dpo_objective, lm_objective

STAGES = ("pretrain", "sft", "dpo")
REFERENCES = ("memory", "precomputed")


class Task:
    """Data and objective of one stage; `rows_per_example` rows per batch element."""

    rows_per_example = 1
    uses_reference_params = False

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer, skipped: SkippedRecords):
        self.config, self.tokenizer, self.skipped = config, tokenizer, skipped

    def _common(self, process_index: int, process_count: int) -> dict[str, Any]:
        data = self.config.data
        return dict(seq_len=data.seq_len, bad_records=data.bad_records, skipped=self.skipped,
                    process_index=process_index, process_count=process_count)

    def batch_layout(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Global shapes and dtypes of a model batch of `batch_size` examples."""
        shape = (batch_size * self.rows_per_example, self.config.data.seq_len)
        return {k: (shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}

    def host_sums(self, local: dict[str, np.ndarray]) -> dict[str, float]:
        """Extra evaluation sums computed on the host from a local batch."""
        return {}

    def eval_summary(self, sums: dict[str, float], count: float) -> dict[str, float]:
        loss = sums["loss"] / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def objective(self, parts: ModelParts) -> Objective:
        return lm_objective(parts, self.config.optim.z_loss)


class PretrainTask(Task):
    def __init__(self, config, tokenizer, skipped, sources=None):
        super().__init__(config, tokenizer, skipped)
        data = config.data
        self.sources = sources or open_sources(list(data.sources))
        self.eval_sources = open_sources(list(data.eval_sources)) if data.eval_sources else None
        self._byte_lengths = token_byte_lengths(tokenizer)

    def train_dataset(self, batch_size: int, process_index: int, process_count: int):
        data = self.config.data
        return train_batches(self.sources, self.tokenizer, batch_size=batch_size, seed=data.seed,
                             holdout_every=0 if self.eval_sources else data.holdout_every,
                             num_threads=data.num_threads,
                             **self._common(process_index, process_count))

    def eval_dataset(self, batch_size: int, process_index: int, process_count: int):
        data = self.config.data
        return eval_batches(self.eval_sources or self.sources, self.tokenizer,
                            batch_size=batch_size,
                            holdout_every=0 if self.eval_sources else data.holdout_every,
                            **self._common(process_index, process_count))

    def host_sums(self, local):
        return {"bytes": float((self._byte_lengths[local["targets"]] * local["loss_mask"]).sum())}

    def eval_summary(self, sums, count):
        out = super().eval_summary(sums, count)
        out["eval_bits_per_byte"] = sums["loss"] / (math.log(2) * max(sums["bytes"], 1.0))
        return out


class SFTTask(Task):
    def __init__(self, config, tokenizer, skipped):
        super().__init__(config, tokenizer, skipped)
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
        return self._dataset(batch_size, process_index, process_count, "eval")


class DPOTask(Task):
    rows_per_example = 2

    def __init__(self, config, tokenizer, skipped):
        super().__init__(config, tokenizer, skipped)
        dpo = config.dpo
        if dpo.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={dpo.loss!r}: must be one of {LOSSES}")
        if dpo.reference not in REFERENCES:
            raise ConfigError(f"dpo.reference={dpo.reference!r}: must be one of {REFERENCES}")
        if not dpo.beta > 0:
            raise ConfigError(f"dpo.beta={dpo.beta!r}: must be > 0")
        if len(config.data.sources) != 1:
            raise ConfigError("data.sources: DPO reads exactly one preference source")
        self.pairs = load_pairs(config.data.sources[0])
        self.uses_reference_params = dpo.reference == "memory"
        self.reference_table: np.ndarray | None = None  # [pairs, 2] when precomputed

    def _dataset(self, batch_size, process_index, process_count, part, seed, drop_remainder=True):
        return dpo_batches(self.pairs, self.tokenizer, batch_size=batch_size, seed=seed,
                           holdout_every=self.config.data.holdout_every, part=part,
                           drop_remainder=drop_remainder,
                           **self._common(process_index, process_count))

    def train_dataset(self, batch_size, process_index, process_count):
        ds = self._dataset(batch_size, process_index, process_count, "train", self.config.data.seed)
        return ds if self.uses_reference_params else ds.map(self.attach_reference)

    def eval_dataset(self, batch_size, process_index, process_count):
        ds = self._dataset(batch_size, process_index, process_count, "eval", None)
        return ds if self.uses_reference_params else ds.map(self.attach_reference)

    def all_pairs_dataset(self, batch_size: int, part: str) -> grain.IterDataset:
        """Every usable pair of `part` once, in order (for precomputing reference log-probs)."""
        return self._dataset(batch_size, 0, 1, part, None, drop_remainder=False)

    def attach_reference(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = self.reference_table[batch["index"]]
        return {**batch, "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}

    def batch_layout(self, batch_size):
        layout = super().batch_layout(batch_size)
        if not self.uses_reference_params:
            layout.update(ref_chosen=((batch_size,), jnp.float32),
                          ref_rejected=((batch_size,), jnp.float32))
        return layout

    def objective(self, parts):
        dpo = self.config.dpo
        return dpo_objective(parts, beta=dpo.beta, loss=dpo.loss,
                             label_smoothing=dpo.label_smoothing)

    def eval_summary(self, sums, count):
        return {f"eval_{k}": v / count for k, v in sums.items()}


def make_task(config: ConfigDict, tokenizer: Tokenizer, skipped: SkippedRecords,
              sources=None) -> Task:
    stage = config.get("stage", "pretrain")
    if stage == "pretrain":
        return PretrainTask(config, tokenizer, skipped, sources)
    if stage == "sft":
        return SFTTask(config, tokenizer, skipped)
    if stage == "dpo":
        return DPOTask(config, tokenizer, skipped)
    raise ConfigError(f"stage={stage!r}: must be one of {STAGES}")


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (byte pieces 1, control and chat tokens 0)."""
    lengths = np.zeros(tokenizer.vocab_size, np.int64)
    special = set(tokenizer.chat_token_ids.values()) | {tokenizer.bos_id, tokenizer.eos_id,
                                                         tokenizer.pad_id, tokenizer.unk_id}
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if i in special:
            continue
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths
