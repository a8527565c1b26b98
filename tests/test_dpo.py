"""DPO and SFT losses against numpy, and the SFT -> DPO stages on the shared trainer."""

import gzip
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.dpo import get_config as dpo_experiment
from experiments.pretrain import get_config as pretrain_experiment
from experiments.sft import get_config as sft_experiment
from shakti_jax.config import get_config
from shakti_jax.train.dpo import dpo_loss, sequence_logps
from shakti_jax.train.losses import lm_loss_sums
from shakti_jax.train.metrics import read_metrics
from shakti_jax.model import ModelDef
from shakti_jax.train.tasks.dpo import dpo_objective
from shakti_jax.train.trainer import Trainer


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("variant, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                                ("hinge", 0.0)])
def test_dpo_losses_match_hand_computation(variant, smoothing):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-50, 5, size=6) for _ in range(4))
    beta = 0.3
    with jax.enable_x64(True):  # the hand computation is float64
        got, metrics = dpo_loss(*(jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr)),
                                beta=beta, loss=variant, label_smoothing=smoothing)
    for i in range(6):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if variant == "sigmoid":
            want = -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
        elif variant == "ipo":
            want = (h - 1 / (2 * beta)) ** 2
        else:
            want = max(0.0, 1 - beta * h)
        assert float(got[i]) == pytest.approx(want, abs=1e-6, rel=1e-6)
        assert float(metrics["rewards/chosen"][i]) == pytest.approx(beta * (pc[i] - rc[i]), abs=1e-6)
        assert float(metrics["rewards/margin"][i]) == pytest.approx(beta * h, abs=1e-6)
        assert float(metrics["rewards/accuracy"][i]) == float(beta * h > 0)


def test_sft_masked_loss_matches_hand_computation():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float64)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], np.float64)  # assistant tokens only
    nll, _, count = lm_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want = sum(-(logits[b, t, targets[b, t]] - math.log(np.exp(logits[b, t]).sum()))
               for b in range(2) for t in range(5) if mask[b, t])
    assert float(nll) / float(count) == pytest.approx(want / 4, abs=1e-6)


def test_sequence_logps_ignore_padding_and_prompt():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 6, 5)).astype(np.float32)
    targets = np.array([[1, 2, 3, 4, 0, 0]])
    mask = np.array([[0, 1, 1, 0, 0, 0]], np.float64)
    got = float(sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))[0])
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    assert got == pytest.approx(logp[0, 1, 2] + logp[0, 2, 3], rel=1e-6)
    changed = logits.copy()
    changed[0, [0, 3, 4, 5]] = rng.normal(size=(4, 5)) * 10  # prompt and padding positions
    again = float(sequence_logps(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(mask))[0])
    assert again == got


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    cfg = get_config("tiny")
    model_def = ModelDef.from_config(cfg)
    params = model_def.init(0)
    rng = np.random.default_rng(4)
    tokens = rng.integers(4, cfg.vocab_size, size=(4, 17)).astype(np.int32)
    mask = np.zeros((4, 16), np.float32)
    mask[:, 8:] = 1
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((4, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16))}
    objective = dpo_objective(model_def, beta=0.1, loss="sigmoid", label_smoothing=0.0)
    total, sums, count = objective(params, {"reference": params}, batch, None)
    assert float(count) == 2
    assert float(total) / 2 == pytest.approx(math.log(2), abs=1e-6)
    assert float(sums["rewards/chosen"]) == 0.0 and float(sums["rewards/rejected"]) == 0.0


def _small(config, tokenizer_path, steps, **train):
    config.data.tokenizer = tokenizer_path
    config.train.update({**dict(steps=steps, batch_size=8, log_every=steps, eval_every=steps,
                                checkpoint_every=steps, eval_batches=2, progress_bar=False), **train})
    config.optim.warmup_steps = 1
    return config


@pytest.mark.slow
def test_pretrain_sft_dpo_stages(shared_data, tmp_path, tokenizer_path):
    """Pretrain on 8 devices (fsdp), SFT from it on another mesh, DPO from the SFT checkpoint
    with an in-memory and a precomputed reference: both references give identical metrics."""
    pre = _small(pretrain_experiment("tiny"), tokenizer_path, 4)
    pre.mesh.data, pre.mesh.fsdp = 1, -1
    Trainer(pre, tmp_path / "pre").run()

    sft = _small(sft_experiment("tiny"), "", 6, init_from=str(tmp_path / "pre"))
    sft.mesh.data, sft.mesh.fsdp = 4, 2
    sft.data.sources = (f"json:{shared_data}/domain/pubmedqa_pqal.json?format=pubmedqa&weight=3",
                        f"jsonl:{shared_data}/domain/tatqa_finance.jsonl?format=qa&weight=1")
    last = Trainer(sft, tmp_path / "sft").run()
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])
    assert last["trimmed_prompt_tokens"] > 0
    per_source = [last["eval_loss/pubmedqa_pqal"], last["eval_loss/tatqa_finance"]]
    assert min(per_source) <= last["eval_loss"] <= max(per_source) and per_source[0] != per_source[1]

    # two preference sources of 80 pairs (a held-out batch of 8 each; a short precompute
    # pass), mixed 1:2
    with gzip.open(shared_data / "preference" / "hh_rlhf_harmless_test.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(160)]
    for name, part in (("hh_a", lines[:80]), ("hh_b", lines[80:])):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(part)
    rows = {}
    for reference in ("memory", "precomputed"):
        dpo = _small(dpo_experiment("tiny"), "", 3, init_from=str(tmp_path / "sft"))
        dpo.data.sources = (f"jsonl:{tmp_path / 'hh_a.jsonl.gz'}?format=hh&weight=1",
                            f"jsonl:{tmp_path / 'hh_b.jsonl.gz'}?format=hh&weight=2")
        dpo.dpo.reference = reference
        Trainer(dpo, tmp_path / reference).run()
        rows[reference] = read_metrics(tmp_path / reference)[-1]
    assert (tmp_path / "precomputed" / "reference_logps.npz").exists()
    # The precomputed pass runs unsharded, the in-memory reference sharded over 8 devices:
    # f32 reduction order differs, so log-probs (~-300) agree to ~1e-6 relative and rewards
    # (beta x differences of them) to ~1e-4 absolute. A layout bug would be off by whole units.
    # per-source held-out metrics: the precomputed table is indexed across both sources
    for key in ("loss", "rewards/margin", "rewards/chosen", "eval_loss", "eval_rewards/margin",
                "eval_loss/hh_a", "eval_loss/hh_b", "eval_rewards/margin/hh_b"):
        assert rows["memory"][key] == pytest.approx(rows["precomputed"][key], abs=2e-4), key
    for key in ("logps/ref_chosen", "logps/ref_rejected", "logps/policy_chosen"):
        assert rows["memory"][key] == pytest.approx(rows["precomputed"][key], rel=1e-5), key
    assert 0.0 <= rows["memory"]["eval_rewards/accuracy"] <= 1.0


def test_precomputed_reference_is_never_reused_for_other_pairs(tmp_path, tokenizer_path):
    """The table is keyed by a digest of the pairs, tokenizer, sequence length and start: the
    same inputs reuse it, changed pairs (even as many of them) recompute it."""
    from data_pipelines.default_corpus import default_preference_pairs
    from data_pipelines.pipeline import SkippedRecords
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.train.tasks import PrepareContext
    from shakti_jax.train.tasks.dpo import DPOTask

    pairs = default_preference_pairs(40)
    data = tmp_path / "pairs.jsonl"
    config = _small(dpo_experiment("tiny"), tokenizer_path, 1)
    config.dpo.reference = "precomputed"
    config.data.seq_len = 64
    config.data.sources = (f"jsonl:{data}?format=pairs",)
    cfg = get_config("tiny")
    model_def = ModelDef.from_config(cfg)
    params = model_def.init(0)
    logs = []

    def prepared(rows):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = DPOTask(config, Tokenizer.load(tokenizer_path), SkippedRecords(), cfg)
        task.prepare(PrepareContext(model_def, params, tmp_path, "seed:0", logs.append))
        return task.reference_table

    first = prepared(pairs[:20])
    assert np.isfinite(first[~np.isnan(first[:, 0])]).all() and logs == [
        "precomputing reference log-probs of every pair"]
    np.testing.assert_array_equal(prepared(pairs[:20]), first)  # reused: nothing recomputed
    assert len(logs) == 1
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs[20:40]]
    second = prepared(swapped)
    assert "made for other pairs" in logs[1] and len(logs) == 3
    assert second.shape == first.shape and not np.allclose(second, first, equal_nan=True)
