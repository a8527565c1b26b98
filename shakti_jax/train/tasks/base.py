"""What every task provides to the trainer, with the defaults most tasks keep."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import grain
import numpy as np
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from data_pipelines.pipeline import SkippedRecords
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ModelConfig
from shakti_jax.model import ModelDef
from shakti_jax.train import batches
from shakti_jax.train.losses import lm_loss_sums
from shakti_jax.train.step import Objective


@dataclasses.dataclass
class PrepareContext:
    """What a task's pre-pass (run once before training) may use."""

    model_def: ModelDef
    params: dict  # the starting params (sharded)
    workdir: Path
    start_digest: str  # identifies the starting params (init_from workdir + step, or the seed)
    log: Callable[[str], None]


class Task:
    """Data and objective of one stage; `rows_per_example` token rows per batch example."""

    batch_schema: batches.Schema = batches.TOKENS
    rows_per_example = 1

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer, skipped: SkippedRecords,
                 model_config: ModelConfig):
        self.config, self.tokenizer, self.skipped = config, tokenizer, skipped
        self.model_config = model_config

    def batch_sizes(self, batch_size: int) -> dict[str, int]:
        """Sizes of the schema's dims for a global batch of `batch_size` examples."""
        return {"rows": batch_size * self.rows_per_example, "pairs": batch_size,
                "seq": self.config.data.seq_len}

    def _common(self, process_index: int, process_count: int) -> dict[str, Any]:
        data = self.config.data
        return dict(seq_len=data.seq_len, bad_records=data.bad_records, skipped=self.skipped,
                    process_index=process_index, process_count=process_count)

    # -- state and objective --------------------------------------------------------------
    def init_task_state(self, params: dict) -> dict:
        """Extra state carried in the TrainState (and checkpointed) next to the params."""
        return {}

    def task_state_shardings(self, param_shardings: dict, replicated: NamedSharding) -> dict:
        return {}

    def objective(self, model_def: ModelDef) -> Objective:
        """Next-token NLL over masked targets (+ z-loss); count = target tokens."""
        z_loss = self.config.optim.z_loss

        def objective(params, task_state, mb, key):
            logits = model_def.apply(params, mb["inputs"], mb["positions"], mb["segment_ids"],
                                     dropout_key=key)
            nll, z, count = lm_loss_sums(logits, mb["targets"], mb["loss_mask"])
            return nll + z_loss * z, {"loss": nll, "z_loss": z}, count

        return objective

    def eval_objective(self, model_def: ModelDef) -> Objective:
        return self.objective(model_def)

    def prepare(self, ctx: PrepareContext) -> None:
        """A pre-pass before the first step (e.g. DPO's reference log-probs); none by default."""

    def next_batch(self, iterator, step_index: int, state, built) -> dict[str, np.ndarray]:
        """This process's rows for step `step_index` (0-based) given the current train state and
        the built step: the data iterator's next batch, or (online RL) a rollout of the policy."""
        return next(iterator)

    def log_metrics(self) -> dict[str, float]:
        """Host-side metrics of the latest batch, logged with the step's (RL rollout stats)."""
        return {}

    has_online_eval = False

    def online_eval(self, model_def: ModelDef, params: dict) -> dict[str, float]:
        """Held-out metrics computed from the model's params outside the eval step (RL's
        held-out rewards); `has_online_eval` says whether there are any."""
        return {}

    # -- data -----------------------------------------------------------------------------
    def train_dataset(self, batch_size: int, process_index: int, process_count: int
                      ) -> grain.IterDataset:
        raise NotImplementedError

    def eval_datasets(self, batch_size: int, process_index: int, process_count: int
                      ) -> dict[str, grain.IterDataset]:
        """Held-out batches by source name (metrics per source when there are several);
        empty when the config holds nothing out."""
        raise NotImplementedError

    def eval_summary(self, sums: dict[str, float], count: float) -> dict[str, float]:
        loss = sums["loss"] / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}



def source_names(specs) -> list[str]:
    """A short unique name per data source spec: its file name without suffixes."""
    names = []
    for spec in specs:
        path = spec.partition(":")[2].partition("?")[0].rstrip("/")
        name = Path(path).name.split(".")[0] or path
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names
