"""Online RL configs: `--config=experiments/rl.py:<size>[,ppo]` (GRPO unless `ppo`).

`train.batch_size` prompts per rollout, each answered `rl.group_size` times by the policy;
`train.steps` counts optimizer updates (`rl.updates_per_rollout` per rollout). Rewards
(`rl.rewards`, see shakti_jax/train/rewards.py) are Python functions of the reply
(`keyword:WORD`, `arithmetic`, `python:MODULE:FUNCTION`), reward models (`model:WORKDIR`, a
stage=reward checkpoint on the policy's tokenizer) or weighted sums (`*W`). The reference
for the KL term is the starting policy. Default prompts: the hh-rlhf harmless prompts, every
10th held out for `eval_reward`.

Recipes: `tiny` (tests and the CPU demo: the reward is 1 when the reply contains "the",
which about 5% of a random tiny model's replies do), `shakti_100m` (after SFT; the paper's RLHF on UltraFeedback-style
pairs: train a reward model with experiments/reward.py first and point `rl.rewards` at it),
`smollm2` (the imported SmolLM2-135M-Instruct; `train.init_from` an import workdir).
"""

from __future__ import annotations

from experiments.sft import get_config as sft_config
from shakti_jax.train.tasks.rl import rl_defaults

_SHARED = "../shared/data"


def get_config(spec: str = "tiny"):
    size, _, algorithm = spec.partition(",")
    algorithm = algorithm or "grpo"
    c = sft_config("tiny" if size == "smollm2" else size)
    tiny = size == "tiny"
    c.stage = "rl"
    if size == "smollm2":  # the model comes from train.init_from (an import workdir)
        c.model = {"dtype": "float32", "param_dtype": "float32", "dropout_rate": 0.0, "remat": "none"}
    c.model.dropout_rate = 0.0
    c.model.value_head = algorithm == "ppo"
    c.data.sources = (f"jsonl:{_SHARED}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.data.holdout_every = 10
    c.data.bad_records = "skip"  # prompts longer than rl.max_prompt_len are counted, not fatal
    c.rl = rl_defaults()
    c.rl.algorithm = algorithm
    c.rl.rewards = ("keyword:the",) if tiny else ("model:reward_model",)
    c.rl.group_size = 8  # PPO: independent samples (its advantages come from the value head)
    c.rl.updates_per_rollout = 1 if algorithm == "grpo" else 2
    c.rl.max_prompt_len = 96 if tiny else 256
    c.rl.max_new_tokens = 16 if tiny else 128
    c.rl.beta = 0.04 if algorithm == "grpo" else 0.05
    c.data.seq_len = c.rl.max_prompt_len + c.rl.max_new_tokens
    c.train.batch_size = 8 if tiny else 32  # prompts per rollout
    c.train.steps = 60 if tiny else 500
    c.train.log_every = 5 if tiny else 10
    c.train.eval_every = 20 if tiny else 50
    c.train.checkpoint_every = 20 if tiny else 100
    c.optim.lr = 2e-3 if tiny else 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0 if tiny else 10
    return c
