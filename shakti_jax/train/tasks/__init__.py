"""Training stages as tasks. A task owns its data, batch schema, objective, extra state and
pre-passes; the trainer loop names none of them. Adding a stage means adding a task file and
one entry here."""

from __future__ import annotations

from ml_collections import ConfigDict

from data_pipelines.pipeline import SkippedRecords
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.train.tasks.base import PrepareContext, Task
from shakti_jax.train.tasks.dpo import DPOTask
from shakti_jax.train.tasks.pretrain import PretrainTask
from shakti_jax.train.tasks.reward import RewardTask
from shakti_jax.train.tasks.rl import RLTask
from shakti_jax.train.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {"pretrain": PretrainTask, "sft": SFTTask, "dpo": DPOTask,
                                "reward": RewardTask, "rl": RLTask}

__all__ = ["PrepareContext", "TASKS", "Task", "make_task"]


def make_task(config: ConfigDict, tokenizer: Tokenizer, skipped: SkippedRecords,
              model_config: ModelConfig) -> Task:
    stage = config.get("stage", "pretrain")
    if stage not in TASKS:
        raise ConfigError(f"stage={stage!r}: must be one of {tuple(TASKS)}")
    return TASKS[stage](config, tokenizer, skipped, model_config)
