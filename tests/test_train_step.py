"""Losses against numpy, optimizer rules, and the sharded step against a single device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.pretrain import get_config as experiment
from shakti_jax.config import ConfigError, get_config
from shakti_jax.model import ModelDef
from shakti_jax.sharding import make_mesh
from shakti_jax.train.losses import lm_loss_sums
from shakti_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from shakti_jax.train.step import build_step
from shakti_jax.train.tasks import Task


def test_lm_loss_sums_match_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, size=(2, 3))
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    nll, z, count = lm_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want_nll = want_z = 0.0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                lse = math.log(sum(math.exp(float(x)) for x in logits[b, t]))
                want_nll += lse - float(logits[b, t, targets[b, t]])
                want_z += lse * lse
    assert count == 4
    np.testing.assert_allclose(float(nll), want_nll, rtol=1e-6)
    np.testing.assert_allclose(float(z), want_z, rtol=1e-6)


def test_schedules_and_decay_mask():
    optim = experiment("tiny").optim
    optim.unlock()
    optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    cosine = learning_rate_schedule(optim, 110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(cosine(110)) == pytest.approx(0.1)
    optim.update(schedule="wsd", decay_fraction=0.2)
    wsd = learning_rate_schedule(optim, 110)
    assert float(wsd(85)) == pytest.approx(1.0)  # stable until the last 20 of 100 steps
    assert float(wsd(100)) == pytest.approx(0.55, abs=1e-6)
    assert float(wsd(110)) == pytest.approx(0.1)
    params = {"norm": {"scale": jnp.ones(4)}, "w": jnp.ones((4, 4)), "emb": jnp.ones((8, 4))}
    assert decay_mask(params) == {"norm": {"scale": False}, "w": True, "emb": True}


def test_norms_are_not_decayed():
    optim = experiment("tiny").optim
    optim.unlock()
    optim.update(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx = make_optimizer(optim, 10).tx
    # The real model's params: stacked norm scales and biases have a leading "layers" axis.
    params = ModelDef.from_config(get_config("tiny", attention_bias=True)).init(0)
    params = jax.tree.map(jnp.ones_like, params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    block = updates["groups"][0]["blocks"][0]
    for kept in (block["attn_norm"]["scale"], block["attn"]["bq"], updates["final_norm"]["scale"]):
        assert np.all(np.asarray(kept) == 0.0)
    for decayed in (block["attn"]["wq"], block["mlp"]["w_up"], updates["embedding"]):
        np.testing.assert_allclose(np.asarray(decayed), -0.1 * 0.5, rtol=1e-6)


def _batch(cfg, rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, cfg.vocab_size, size=(rows, seq + 1)).astype(np.int32)
    seg = np.ones((rows, seq + 1), np.int32)
    seg[:, seq // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq + 1 - seq // 2)])[None].repeat(rows, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": ((seg[:, 1:] == seg[:, :-1])).astype(np.float32),
            "segment_ids": seg[:, :-1], "positions": pos[:, :-1].astype(np.int32)}


def _built(mesh, micro_batches=1, rows=8, seq=32, **optim):
    config = experiment("tiny")
    config.data.seq_len = seq
    config.optim.update(optim)
    cfg = get_config("tiny", dropout_rate=0.0)
    task = Task(config, None, None, cfg)  # the plain LM objective over given batches
    return build_step(task, ModelDef.from_config(cfg), make_optimizer(config.optim, 100), mesh,
                      batch_size=rows, micro_batches=micro_batches), cfg


def _run_steps(mesh_axes, micro_batches=1, steps=2):
    mesh = make_mesh(*mesh_axes) if mesh_axes else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    built, cfg = _built(mesh, micro_batches)
    state = built.init()
    losses = []
    for i in range(steps):
        state, metrics = built.train(state, built.global_batch(_batch(cfg, seed=i)))
        losses.append(float(metrics["loss"]))
    return losses, state, built.state_shardings


@pytest.fixture(scope="module")
def single_device_run():
    return _run_steps(None)


@pytest.mark.parametrize("mesh_axes", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_steps_match_one_device(single_device_run, mesh_axes):
    want_losses, want_state, _ = single_device_run
    losses, state, shardings = _run_steps(mesh_axes)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    # the rules: embed -> fsdp, heads / mlp -> tensor (where they divide), Adam moments alike
    data, fsdp, tensor = mesh_axes
    wq = shardings.params["groups"][0]["blocks"][0]["attn"]["wq"]
    assert wq.spec == P(None, "fsdp", "tensor" if 4 % tensor == 0 else None, None)
    w_up = state.params["groups"][0]["blocks"][1]["mlp"]["w_up"]
    assert w_up.sharding.spec == P(None, "fsdp", "tensor")
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        assert moment["groups"][0]["blocks"][1]["mlp"]["w_up"].sharding.spec == w_up.sharding.spec
    assert adam.count.sharding.spec == P()


def test_gradient_accumulation_matches_one_batch(single_device_run):
    want_losses, want_state, _ = single_device_run
    losses, state, _ = _run_steps(None, micro_batches=4)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def _one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _refused(built, state, batch):
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = built.train(state, built.global_batch(batch))
    assert int(state.nonfinite) == 1 and int(state.first_nonfinite) == 0
    assert int(state.step) == 1
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(got), want)
    return metrics


def test_nonfinite_loss_keeps_params():
    built, cfg = _built(_one_device())
    batch = _batch(cfg)
    batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
    metrics = _refused(built, built.init(), batch)
    assert not np.isfinite(float(metrics["loss"]))


def test_nonfinite_updated_params_are_refused():
    """Finite loss and gradients, but an update that overflows the params (lr 1e38, no
    clipping, warm-up over at step 0): the guard checks the updated params too."""
    built, cfg = _built(_one_device(), lr=1e38, clip_norm=0.0, warmup_steps=0,
                        schedule="constant")
    state = built.init()
    metrics = _refused(built, state, _batch(cfg))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))


@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), "optim.lr=nan: must be a number"),
    ("lr", -1e-3, "optim.lr=-0.001: must be a finite number > 0"),
    ("b1", 1.0, "optim.b1=1.0: must be in [0, 1)"),
    ("b2", -0.1, "optim.b2=-0.1: must be in [0, 1)"),
    ("warmup_steps", -5, "optim.warmup_steps=-5: must be an integer >= 0"),
    ("clip_norm", -1.0, "optim.clip_norm=-1.0: must be a finite number >= 0"),
])
def test_bad_optimizer_settings_are_one_line_config_errors(key, value, message):
    optim = experiment("tiny").optim
    optim[key] = value
    with pytest.raises(ConfigError) as err:
        make_optimizer(optim, 100)
    assert str(err.value).startswith(message)
