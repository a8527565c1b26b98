"""Online RL and reward models: the losses against numpy float64, the sampler's log-probs
against the training forward's, GRPO learning a verifiable reward end to end on a sharded
tiny policy, resume with the same rollouts, PPO, the reward model stage, and bad rewards."""

from __future__ import annotations

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.pipeline import SkippedRecords
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.generate import Sampling
from shakti_jax.model import ModelDef
from shakti_jax.train import rl
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.rewards import RewardError
from shakti_jax.train.tasks import make_task
from shakti_jax.train.trainer import Trainer

RNG = np.random.default_rng(0)


# -- numpy float64 references (written from the formulas, loops where the maths has them) --
def np_group_advantages(r, scale):
    out = r - r.mean(axis=1, keepdims=True)
    return out / (r.std(axis=1, keepdims=True) + 1e-4) if scale else out


def np_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        running = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


def np_policy_loss(logp, old, adv, mask, eps):
    total = clipped = 0.0
    for b, t in zip(*np.nonzero(mask)):
        ratio = np.exp(logp[b, t] - old[b, t])
        a, c = ratio * adv[b, t], min(max(ratio, 1 - eps), 1 + eps) * adv[b, t]
        total += -min(a, c)
        clipped += c < a
    return total, clipped


def np_value_loss(v, old, ret, mask, eps):
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        vc = old[b, t] + min(max(v[b, t] - old[b, t], -eps), eps)
        total += 0.5 * max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2)
    return total


def _rollout_arrays(B=6, T=11):
    mask = np.zeros((B, T))
    for b in range(B):  # each row: a prompt, then a reply of 1..T-3 sampled tokens
        start = RNG.integers(1, 4)
        mask[b, start:start + RNG.integers(1, T - start)] = 1.0
    logp = -RNG.uniform(0.1, 3.0, (B, T))
    old = logp + RNG.normal(0, 0.3, (B, T))  # ratios on both sides of the clip range
    ref = logp + RNG.normal(0, 0.5, (B, T))
    values, returns = RNG.normal(0, 1, (B, T)), RNG.normal(0, 1, (B, T))
    old_values = values + RNG.normal(0, 0.3, (B, T))
    return mask, logp, old, ref, values, old_values, returns


def test_rl_losses_match_numpy_float64():
    mask, logp, old, ref, values, old_values, returns = _rollout_arrays()
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    close = lambda got, want: np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)  # noqa: E731

    rewards_PG = RNG.normal(0, 1, (3, 4))
    for scale in (True, False):
        close(rl.group_advantages(f32(rewards_PG), scale), np_group_advantages(rewards_PG, scale))

    scores = RNG.normal(0, 1, mask.shape[0])
    shaped = np.zeros_like(mask)
    for b in range(mask.shape[0]):
        idx = np.flatnonzero(mask[b])
        shaped[b, idx] = -0.05 * (old[b, idx] - ref[b, idx])
        shaped[b, idx[-1]] += scores[b]
    close(rl.kl_penalty_rewards(f32(old), f32(ref), f32(scores), f32(mask), 0.05), shaped)

    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, ret = rl.gae(f32(shaped), f32(values), f32(mask), gamma, lam)
        want_adv, want_ret = np_gae(shaped, values, mask, gamma, lam)
        close(adv, want_adv)
        close(ret, want_ret)

    m = mask.astype(bool)
    want_white = np.where(m, (want_adv - want_adv[m].mean()) / (want_adv[m].std() + 1e-8), 0.0)
    close(rl.whiten(f32(want_adv), f32(mask)), want_white)

    adv = RNG.normal(0, 1, mask.shape)
    loss, clipped = rl.clipped_policy_loss(f32(logp), f32(old), f32(adv), f32(mask), 0.2)
    want_loss, want_clipped = np_policy_loss(logp, old, adv, mask, 0.2)
    close(loss, want_loss)
    assert int(clipped) == want_clipped and 0 < want_clipped < mask.sum()  # both branches taken

    close(rl.clipped_value_loss(f32(values), f32(old_values), f32(returns), f32(mask), 0.2),
          np_value_loss(values, old_values, returns, mask, 0.2))
    close(rl.k3_kl(f32(logp), f32(ref)), np.exp(ref - logp) - (ref - logp) - 1)

    logits = RNG.normal(0, 2, (2, 5, 7))
    targets = RNG.integers(0, 7, (2, 5))
    got_logp, got_entropy = rl.token_logps(f32(logits), jnp.asarray(targets), 0.7)
    z = logits / 0.7
    logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
    close(got_logp, np.take_along_axis(logq, targets[..., None], -1)[..., 0])
    close(got_entropy, -(np.exp(logq) * logq).sum(-1))


# -- the task on a tiny model ----------------------------------------------------------------
def rl_config(tokenizer_path, shared_data, algorithm="grpo", **rl_overrides):
    from experiments.rl import get_config

    c = get_config(f"tiny,{algorithm}")
    c.data.tokenizer = tokenizer_path
    c.data.sources = (f"jsonl:{shared_data}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.train.progress_bar = False
    c.train.async_checkpoints = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4  # two batch shards, so 2 prompts suffice
    for key, value in rl_overrides.items():
        c.rl[key] = value
    return c


def test_sampler_log_probs_equal_the_training_forward(tokenizer_path, shared_data):
    """The rollout's recomputed log-probs of the sampled tokens equal the sampler's (1e-5,
    f32), and its rows put the loss mask exactly on the sampled tokens (+ EOS)."""
    c = rl_config(tokenizer_path, shared_data, group_size=2, max_new_tokens=12)
    tok = Tokenizer.load(tokenizer_path)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    model_def = ModelDef.from_config(cfg)
    task = make_task(c, tok, SkippedRecords(), cfg)
    params = jax.jit(model_def.init, static_argnums=0)(1)
    batch = task.rollout(list(range(4)), 0, params, params, model_def)
    stats = task.log_metrics()
    assert stats["logp_mismatch"] < 1e-5, stats
    out = task.generator([task.prompts[i]["ids"] for i in range(4) for _ in range(2)],
                         max_new_tokens=12, sampling=Sampling(1.0), eos_id=task.eos_id, seed=c.train.seed * 1_000_003, prompt_bucket=c.rl.max_prompt_len)
    for row in range(8):  # the same seed samples the same replies; mask = their tokens
        n = len(out.tokens[row]) + out.stopped[row]
        assert batch["loss_mask"][row].sum() == n
        start = len(task.prompts[row // 2]["ids"]) - 1
        assert list(batch["targets"][row, start:start + len(out.tokens[row])]) == out.tokens[row]
    np.testing.assert_allclose(batch["ref_logps"], batch["old_logps"], rtol=0, atol=0)  # reference = policy here


@pytest.mark.slow
def test_grpo_learns_a_keyword_reward_on_a_sharded_policy(tokenizer_path, shared_data, tmp_path):
    """The tiny recipe (reward: the reply contains "the"; about 5% of a random policy's
    replies do) on a 2x2x2 mesh: the held-out reward rises from ~0 to most replies within 24
    steps, the KL to the reference stays bounded, the sampler's and the trainer's log-probs
    agree, and nothing compiles again after the first rollout."""
    c = rl_config(tokenizer_path, shared_data)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.train.update(steps=24, log_every=4, eval_every=24, checkpoint_every=24)
    c.optim.lr = 3e-3
    c.rl.eval_prompts = 32
    Trainer(c, tmp_path / "grpo").run()
    rows = read_metrics(tmp_path / "grpo")
    evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
    steps = [r for r in rows if "reward_mean" in r]
    print("eval_reward", evals, "reward_mean", [round(r["reward_mean"], 3) for r in steps],
          "kl", [round(r["kl"], 3) for r in steps])
    assert evals[0] <= 0.15 and evals[-1] >= evals[0] + 0.4, evals
    assert steps[-1]["reward_mean"] >= steps[0]["reward_mean"] + 0.3
    assert all(r["kl"] < 1.0 for r in steps), [r["kl"] for r in steps]
    assert all(r["logp_mismatch"] < 1e-5 for r in steps)
    assert len({r["rollout_compiles"] for r in steps}) == 1, [r["rollout_compiles"] for r in steps]


@pytest.mark.slow
def test_rl_resumes_with_the_same_rollouts(tokenizer_path, shared_data, tmp_path):
    """Two updates per rollout (the clipped ratio at work): 4 steps straight equal 2 steps,
    a restart, and 2 more, metric for metric."""
    def config(steps):
        c = rl_config(tokenizer_path, shared_data, group_size=2, updates_per_rollout=2, max_new_tokens=8,
                          rewards=("keyword:e",))  # most replies, not all: groups with advantages
        c.train.update(steps=steps, log_every=1, eval_every=100, checkpoint_every=2, batch_size=4,
                       allow_changes="train.steps")
        c.data.holdout_every = 0
        return c

    Trainer(config(4), tmp_path / "straight").run()
    Trainer(config(2), tmp_path / "resumed").run()
    Trainer(config(4), tmp_path / "resumed").run()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    keys = ("loss", "reward_mean", "kl", "clip_fraction", "response_length")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert any(r["kl"] > 0 for r in straight[1::2])  # the second update of a rollout moved the policy


def test_ppo_trains_a_value_head_and_exports_the_policy_as_an_lm(tokenizer_path, shared_data, tmp_path):
    from shakti_jax.convert import main as convert_main

    c = rl_config(tokenizer_path, shared_data, "ppo", group_size=2, max_new_tokens=8)
    c.train.update(steps=4, log_every=2, eval_every=4, checkpoint_every=4, batch_size=4)
    c.rl.eval_prompts = 4
    Trainer(c, tmp_path / "ppo").run()
    rows = [r for r in read_metrics(tmp_path / "ppo") if "value_loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["value_loss"]) and r["value_loss"] > 0 for r in rows)
    assert rows[-1]["value_loss"] < rows[0]["value_loss"] * 5  # the critic fits, does not blow up
    with pytest.raises(SystemExit) as done:
        convert_main(["--checkpoint", str(tmp_path / "ppo"), "--format", "hf", "--quant", "f32",
                      "--out", str(tmp_path / "hf"), "--no_progress"])
    assert done.value.code == 0
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert arch.endswith("ForCausalLM"), arch  # the critic is dropped; the policy is the LM


def test_reward_model_stage_bradley_terry(tokenizer_path, shared_data, tmp_path):
    """The reward stage's loss is -log sigmoid(r_c - r_r) with r read at each whole
    sequence's last token (checked against the model's values by hand), and the stage fits
    16 training pairs: their loss falls from log 2 to well below it and nearly all are ranked
    right."""
    import gzip

    from experiments.reward import get_config

    c = get_config("tiny")
    c.data.tokenizer = tokenizer_path
    c.data.sources = (f"jsonl:{shared_data}/preference/hh_rlhf_harmless_test.jsonl.gz?format=hh",)
    c.data.seq_len = 128
    tok = Tokenizer.load(tokenizer_path)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    model_def = ModelDef.from_config(cfg)
    task = make_task(c, tok, SkippedRecords(), cfg)
    batch = next(iter(task.train_dataset(4, 0, 1)))
    params = jax.jit(model_def.init, static_argnums=0)(0)
    params["value_head"] = params["value_head"] * 30
    total, sums, count = task.objective(model_def)(params, {}, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    values = np.asarray(model_def.values(params, jnp.asarray(batch["tokens"]), None,
                                         jnp.asarray(batch["segment_ids"])), np.float64)
    r = values[np.arange(8), batch["last"]]
    assert all(batch["tokens"][i, batch["last"][i]] != 0 for i in range(8))  # the last real token
    want = np.sum(np.logaddexp(0.0, -(r[:4] - r[4:])))
    assert float(count) == 4 and float(total) == pytest.approx(want, rel=1e-5)
    assert float(sums["accuracy"]) == np.sum(r[:4] > r[4:])

    with gzip.open(f"{shared_data}/preference/hh_rlhf_harmless_test.jsonl.gz", "rt") as f:
        pairs = [next(f) for _ in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(pairs))
    c.data.sources = (f"jsonl:{tmp_path}/pairs.jsonl?format=hh",)
    c.data.holdout_every = 0
    c.train.update(steps=40, batch_size=8, log_every=1, eval_every=100, checkpoint_every=40,
                   progress_bar=False)
    Trainer(c, tmp_path / "rm").run()
    rows = read_metrics(tmp_path / "rm")
    print([(r["step"], round(r["loss"], 3), r["accuracy"]) for r in rows[::5]])
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=0.05)
    assert rows[-1]["loss"] < 0.35 and rows[-1]["accuracy"] >= 0.9, rows[-1]


@pytest.fixture
def reward_module(monkeypatch):
    module = types.ModuleType("rl_test_rewards")

    def boom(fields, reply):
        raise KeyError("answer")

    module.boom = boom
    module.nan = lambda fields, reply: float("nan")
    monkeypatch.setitem(sys.modules, "rl_test_rewards", module)


def test_a_failing_reward_stops_before_the_step(reward_module, tokenizer_path, shared_data, tmp_path):
    """A reward function that raises, in a run: one line naming the prompt's index in the
    rollout and its record, before the step (nothing trained, nothing saved)."""
    c = rl_config(tokenizer_path, shared_data, group_size=2, max_new_tokens=4,
                  rewards=("python:rl_test_rewards:boom",))
    c.train.update(steps=2, checkpoint_every=1, batch_size=2)
    with pytest.raises(RewardError) as err:
        Trainer(c, tmp_path / "bad").run()
    text = str(err.value)
    assert "\n" not in text and "raised KeyError" in text and "prompt 0 (" in text and "hh_rlhf_harmless_test" in text
    assert "the step was not applied" in text
    assert not list((tmp_path / "bad").glob("checkpoints/*"))


def test_a_non_finite_reward_names_its_reply(reward_module):
    from shakti_jax.train.rewards import parse_rewards, score_replies

    sources = parse_rewards(("keyword:a", "python:rl_test_rewards:nan*0.5"), tokenizer=None)
    wheres = [f"prompt {i // 2} (p.jsonl:{i // 2 + 1}), reply {i % 2}" for i in range(4)]
    with pytest.raises(RewardError) as err:
        score_replies(sources, [{}] * 4, ["a", "b", "c", "d"], [[1]] * 4, 8, wheres)
    assert str(err.value) == ("rl.rewards 'python:rl_test_rewards:nan*0.5' returned nan on prompt 0 "
                              "(p.jsonl:1), reply 0; the step was not applied")
    total, parts = score_replies(sources[:1], [{}] * 2, ["A cat", "dog"], [[1]] * 2, 8, wheres)
    assert list(total) == [1.0, 0.0] and list(parts["keyword:a"]) == [1.0, 0.0]


@pytest.mark.parametrize("change, key", [
    ({"rl.algorithm": "ppo"}, "value head"),
    ({"rl.group_size": 1}, "rl.group_size"),
    ({"rl.updates_per_rollout": 3}, "rl.updates_per_rollout=3"),
    ({"rl.rewards": ("keyword",)}, "rl.rewards 'keyword'"),
    ({"rl.rewards": ("python:no_such_module:f",)}, "no_such_module"),
    ({"data.seq_len": 50}, "data.seq_len=50"),
    ({"rl.temperature": 0.0}, "rl.temperature"),
])
def test_rl_config_errors_are_one_line_before_compiling(change, key, tokenizer_path, shared_data, tmp_path):
    c = rl_config(tokenizer_path, shared_data)
    for dotted, value in change.items():
        section, name = dotted.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError) as err:
        Trainer(c, tmp_path / "w").run()
    assert key in str(err.value) and "\n" not in str(err.value)
