"""Online RL (GRPO, PPO): each rollout samples replies from the policy being trained, scores
them, and becomes `rl.updates_per_rollout` optimizer steps of the shared trainer.

A rollout, on the trainer's mesh and params (no copy of the weights to a separate sampler):
1. `train.batch_size` prompts from the data iterator (checkpointed like any other stage),
   each sampled `rl.group_size` times by the compile-once `Generator` at a fixed prompt
   bucket (`rl.max_prompt_len`) and reply budget (`rl.max_new_tokens`), seeded by
   (`train.seed`, rollout number): a resumed run samples the same replies;
2. rewards from `rl.rewards` (`shakti_jax.train.rewards`) on the decoded replies;
3. one jitted pass over the rows: the policy's log-probs of the sampled tokens (the "old"
   log-probs of the clipped ratio; their largest distance from the sampler's own log-probs is
   logged as `logp_mismatch`), the reference's (the starting params, kept in the task state),
   and for PPO the value head's values; then GRPO's group advantages or PPO's KL-shaped
   rewards, GAE and whitening (`shakti_jax.train.rl`).
The step's objective is the clipped surrogate (+ beta k3 KL for GRPO, + vf_coef x the clipped
value loss for PPO) as a mean over sampled tokens. Held-out prompts (every
`data.holdout_every`-th) are answered at `rl.eval_temperature` at every eval: `eval_reward`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.chat import render_prompt
from data_pipelines.errors import DataError
from data_pipelines.pipeline import records_dataset
from data_pipelines.records import load_prompts
from shakti_jax.config import ConfigError
from shakti_jax.generate import Generator, Sampling
from shakti_jax.model import ModelDef
from shakti_jax.train import batches
from shakti_jax.train.batches import Field
from shakti_jax.train.rewards import parse_rewards, score_replies
from shakti_jax.train.rl import (ALGORITHMS, clipped_policy_loss, clipped_value_loss, gae,
                                 group_advantages, k3_kl, kl_penalty_rewards, token_logps, whiten)
from shakti_jax.train.step import Objective
from shakti_jax.train.tasks.base import Task

PER_TOKEN = ("old_logps", "ref_logps", "advantages")
PPO_PER_TOKEN = ("old_values", "returns")


class RLTask(Task):
    def __init__(self, config, tokenizer, skipped, model_config):
        super().__init__(config, tokenizer, skipped, model_config)
        rl, train = config.rl, config.train
        if rl.algorithm not in ALGORITHMS:
            raise ConfigError(f"rl.algorithm={rl.algorithm!r}: must be one of {ALGORITHMS}")
        for key in ("group_size", "max_prompt_len", "max_new_tokens", "updates_per_rollout", "eval_prompts"):
            if isinstance(rl[key], bool) or not isinstance(rl[key], int) or rl[key] < 1:
                raise ConfigError(f"rl.{key}={rl[key]!r}: must be a positive integer")
        if rl.algorithm == "grpo" and rl.group_size < 2:
            raise ConfigError(f"rl.group_size={rl.group_size}: GRPO compares at least 2 replies per prompt")
        if rl.algorithm == "ppo" and not model_config.value_head:
            raise ConfigError("rl.algorithm='ppo' needs a value head: set model.value_head=True")
        if config.data.seq_len < rl.max_prompt_len + rl.max_new_tokens:
            raise ConfigError(f"data.seq_len={config.data.seq_len}: must be >= rl.max_prompt_len + "
                              f"rl.max_new_tokens = {rl.max_prompt_len + rl.max_new_tokens}")
        mu = rl.updates_per_rollout
        for key in ("steps", "checkpoint_every"):
            if train[key] % mu:
                raise ConfigError(f"train.{key}={train[key]}: must be a multiple of rl.updates_per_rollout={mu} "
                                  f"(a checkpoint falls between rollouts, so a resumed run samples the same replies)")
        if not rl.temperature > 0:
            raise ConfigError(f"rl.temperature={rl.temperature!r}: must be > 0 (the policy is softmax(logits / T))")
        if jax.process_count() > 1:
            raise ConfigError("stage=rl runs on one process (multi-host rollouts are not built)")
        if config.get("lora") and config.lora.get("targets"):
            raise ConfigError("stage=rl with lora.targets is not supported yet (the reference would be the base)")
        self.rl = rl
        self.rows_per_example = rl.group_size
        self.sources = parse_rewards(tuple(rl.rewards), tokenizer)
        self.eos_id = tokenizer.eot_id if rl.chat else tokenizer.eos_id
        self.prompts, self.bad_prompts = self._load_prompts(list(config.data.sources))
        extra = PER_TOKEN + (PPO_PER_TOKEN if rl.algorithm == "ppo" else ())
        self.batch_schema = {**batches.TOKENS, **{k: Field(jnp.float32, ("rows", "seq")) for k in extra}}
        self.generator: Generator | None = None
        self._cached: dict | None = None
        self._stats: dict[str, float] = {}

    # -- prompts --------------------------------------------------------------------------
    def _load_prompts(self, specs: list[str]) -> tuple[list[dict], int]:
        """Every usable prompt as {ids, fields, where}; a bad or too long one raises
        (data.bad_records=error) or is counted and dropped (skip)."""
        prompts, bad = [], 0
        limit = self.rl.max_prompt_len
        for spec in specs:
            for record in load_prompts(spec):
                problem = record.problem
                if not problem:
                    ids = self._encode(record.messages)
                    if len(ids) > limit:
                        problem = f"prompt of {len(ids)} tokens exceeds rl.max_prompt_len={limit}"
                if problem:
                    if self.config.data.bad_records == "error":
                        raise DataError(f"{record.where}: {problem}")
                    bad += 1
                    continue
                text = record.messages[-1][1]
                prompts.append({"ids": ids, "fields": {**record.fields, "prompt": text}, "where": record.where})
        if not prompts:
            raise DataError(f"data.sources {specs}: no usable prompt ({bad} skipped)")
        return prompts, bad

    def _encode(self, messages) -> list[int]:
        if self.rl.chat:
            return render_prompt(self.tokenizer, messages)
        text = "\n".join(content for _, content in messages)
        return self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos)

    def _indices(self, part: str, seed: int | None, process_index: int, process_count: int):
        ds, _ = records_dataset([("prompts", list(range(len(self.prompts))))], self.config.data.holdout_every,
                                part, seed, process_index, process_count)
        return ds

    def train_dataset(self, batch_size, process_index, process_count):
        ds = self._indices("train", self.config.data.seed, process_index, process_count)
        return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)

    def eval_datasets(self, batch_size, process_index, process_count):
        return {}  # held-out prompts are answered by `online_eval`, not scored as batches

    # -- state and objective --------------------------------------------------------------
    def init_task_state(self, params):
        return {"reference": jax.tree.map(jnp.copy, params)}

    def task_state_shardings(self, param_shardings, replicated):
        return {"reference": param_shardings}

    def objective(self, model_def: ModelDef) -> Objective:
        rl = self.rl
        ppo = rl.algorithm == "ppo"

        def objective(params, task_state, mb, key):
            args = (params, mb["inputs"], mb["positions"], mb["segment_ids"])
            if ppo:
                logits, values = model_def.logits_and_values(*args, dropout_key=key)
            else:
                logits = model_def.apply(*args, dropout_key=key)
            logps, entropy = token_logps(logits, mb["targets"], rl.temperature)
            mask = mb["loss_mask"]
            policy, clipped = clipped_policy_loss(logps, mb["old_logps"], mb["advantages"], mask, rl.clip_eps)
            kl = jnp.sum(k3_kl(logps, mb["ref_logps"]) * mask)
            sums = {"policy_loss": policy, "kl": kl, "entropy": jnp.sum(entropy * mask),
                    "clip_fraction": clipped}
            if ppo:
                sums["value_loss"] = clipped_value_loss(values, mb["old_values"], mb["returns"], mask,
                                                        rl.value_clip)
                total = policy + rl.vf_coef * sums["value_loss"]
            else:
                total = policy + rl.beta * kl
            return total, {"loss": total, **sums}, jnp.sum(mask)

        return objective

    # -- rollouts -------------------------------------------------------------------------
    def next_batch(self, iterator, step_index: int, state, built) -> dict[str, np.ndarray]:
        """A new rollout every `rl.updates_per_rollout` steps (the same one in between)."""
        mu = self.rl.updates_per_rollout
        if step_index % mu == 0 or self._cached is None:
            indices = [int(i) for i in next(iterator)]
            self._cached = self.rollout(indices, step_index // mu, built.model_params(state.params),
                                        state.task_state["reference"], built.model_def)
        return self._cached

    def _generator(self, model_def: ModelDef, policy: dict) -> Generator:
        if self.generator is None:
            self.generator = Generator(model_def, policy)
            rl = self.rl

            def score(policy, reference, batch):
                args = (batch["inputs"], batch["positions"], batch["segment_ids"])
                if rl.algorithm == "ppo":
                    logits, values = model_def.logits_and_values(policy, *args)
                else:
                    logits, values = model_def.apply(policy, *args), None
                old, _ = token_logps(logits, batch["targets"], rl.temperature)
                ref, _ = token_logps(model_def.apply(reference, *args), batch["targets"], rl.temperature)
                return old, ref, values

            def advantages(old, ref, values, scores, mask):
                if rl.algorithm == "grpo":
                    adv_PG = group_advantages(scores.reshape(-1, rl.group_size), rl.scale_rewards)
                    return adv_PG.reshape(-1)[:, None] * mask, None
                rewards = kl_penalty_rewards(old, ref, scores, mask, rl.beta)
                adv, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
                return (whiten(adv, mask) if rl.whiten else adv), returns

            self._score, self._advantages = jax.jit(score), jax.jit(advantages)
        self.generator.params = policy
        return self.generator

    def _sample(self, model_def, policy, prompts, sampling: Sampling, seed: int):
        generator = self._generator(model_def, policy)
        start = time.perf_counter()
        out = generator([p["ids"] for p in prompts], max_new_tokens=self.rl.max_new_tokens,
                        sampling=sampling, eos_id=self.eos_id, seed=seed,
                        prompt_bucket=self.rl.max_prompt_len)
        seconds = time.perf_counter() - start
        replies = [self.tokenizer.decode(t) for t in out.tokens]
        sequences = [p["ids"] + t + ([self.eos_id] if s else []) for p, t, s in zip(prompts, out.tokens, out.stopped)]
        return out, replies, sequences, seconds

    def _scores(self, prompts, replies, sequences, wheres):
        return score_replies(self.sources, [p["fields"] for p in prompts], replies, sequences,
                             self.config.data.seq_len + 1, wheres)

    def rollout(self, indices: list[int], rollout_index: int, policy: dict, reference: dict,
                model_def: ModelDef) -> dict[str, np.ndarray]:
        """Sample, score and lay out one rollout as the step's batch (see the module docstring)."""
        rl, T = self.rl, self.config.data.seq_len
        start = time.perf_counter()
        prompts = [self.prompts[i] for i in indices for _ in range(rl.group_size)]
        sampling = Sampling(rl.temperature, rl.top_k, rl.top_p)
        out, replies, sequences, gen_seconds = self._sample(
            model_def, policy, prompts, sampling, self.config.train.seed * 1_000_003 + rollout_index)
        G = rl.group_size
        wheres = [f"prompt {i // G} ({p['where']}), reply {i % G}" for i, p in enumerate(prompts)]
        scores, parts = self._scores(prompts, replies, sequences, wheres)
        batch = _rows(prompts, sequences, T)
        old, ref, values = self._score(policy, reference, {k: batch[k] for k in batches.TOKENS})
        mask = batch["loss_mask"]
        adv, returns = self._advantages(old, ref, values, jnp.asarray(scores, jnp.float32), mask)
        batch.update(old_logps=np.asarray(old), ref_logps=np.asarray(ref), advantages=np.asarray(adv))
        if rl.algorithm == "ppo":
            batch.update(old_values=np.asarray(values), returns=np.asarray(returns))
        mismatch = 0.0
        for row, (p, lp) in enumerate(zip(prompts, out.logprobs)):
            start_at = len(p["ids"]) - 1
            recomputed = batch["old_logps"][row, start_at:start_at + len(lp)]
            mismatch = max(mismatch, float(np.max(np.abs(recomputed - np.asarray(lp))))) if lp else mismatch
        generated = sum(len(t) for t in out.tokens) + sum(out.stopped)
        self._stats = {"reward_mean": float(np.mean(scores)), "reward_std": float(np.std(scores)),
                       **{f"reward/{k}": float(np.mean(v)) for k, v in parts.items() if len(parts) > 1},
                       "response_length": generated / len(prompts),
                       "stopped_fraction": float(np.mean(out.stopped)),
                       "rollout_tokens_per_sec": generated / gen_seconds,
                       "rollout_seconds": time.perf_counter() - start,
                       "logp_mismatch": mismatch, "skipped_prompts": float(self.bad_prompts),
                       "rollout_compiles": float(len(self.generator.compiled_buckets)
                                                 + self._score._cache_size() + self._advantages._cache_size())}
        return batch

    def log_metrics(self) -> dict[str, float]:
        return dict(self._stats)

    @property
    def has_online_eval(self) -> bool:
        return bool(self.config.data.holdout_every)

    def online_eval(self, model_def: ModelDef, params: dict) -> dict[str, float]:
        """Held-out prompts (the first `rl.eval_prompts`) answered once each at
        `rl.eval_temperature`: mean / std reward and reply length."""
        if not self.config.data.holdout_every:
            return {}
        ds = self._indices("eval", None, 0, 1)
        prompts = [self.prompts[int(ds[i])] for i in range(min(len(ds), self.rl.eval_prompts))]
        if not prompts:
            return {}
        sampling = Sampling(self.rl.eval_temperature, self.rl.top_k, self.rl.top_p)
        out, replies, sequences, _ = self._sample(model_def, params, prompts, sampling, seed=12345)
        wheres = [f"held-out prompt {i} ({p['where']})" for i, p in enumerate(prompts)]
        scores, _ = self._scores(prompts, replies, sequences, wheres)
        return {"eval_reward": float(np.mean(scores)), "eval_reward_std": float(np.std(scores)),
                "eval_response_length": float(np.mean([len(t) for t in out.tokens]))}


def _rows(prompts: list[dict], sequences: list[list[int]], T: int) -> dict[str, np.ndarray]:
    """Right-padded LM rows of prompt + reply (+ EOS): targets are the next tokens, and the
    loss mask covers the sampled ones."""
    R = len(sequences)
    out = {"inputs": np.zeros((R, T), np.int32), "targets": np.zeros((R, T), np.int32),
           "loss_mask": np.zeros((R, T), np.float32), "segment_ids": np.zeros((R, T), np.int32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy()}
    for row, (p, seq) in enumerate(zip(prompts, sequences)):
        n = len(seq) - 1
        out["inputs"][row, :n] = seq[:-1]
        out["targets"][row, :n] = seq[1:]
        out["segment_ids"][row, :n] = 1
        out["loss_mask"][row, len(p["ids"]) - 1:n] = 1.0
    return out


def rl_defaults() -> Any:
    """The `rl` config section with its defaults (experiments/rl.py sets the recipes)."""
    from ml_collections import ConfigDict

    return ConfigDict({
        "algorithm": "grpo", "rewards": ("keyword:the",), "group_size": 4,
        "max_prompt_len": 64, "max_new_tokens": 32, "chat": True,
        "temperature": 1.0, "top_k": 0, "top_p": 1.0,  # sampling of rollouts
        "updates_per_rollout": 1, "clip_eps": 0.2, "beta": 0.04, "scale_rewards": True,
        "gamma": 1.0, "lam": 0.95, "value_clip": 0.2, "vf_coef": 0.1, "whiten": True,  # PPO
        "eval_prompts": 16, "eval_temperature": 1.0})
