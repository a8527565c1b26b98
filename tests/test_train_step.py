"""Losses against numpy, optimizer rules, and the sharded step against a single device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.pretrain import get_config as experiment
from shakti_jax.config import get_config
from shakti_jax.sharding import make_mesh
from shakti_jax.train.losses import lm_loss_sums
from shakti_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from shakti_jax.train.step import ModelParts, init_train_state, lm_objective, make_train_step
from shakti_jax.train.trainer import train_state_layout


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
    tx, _ = make_optimizer(optim, 10)
    params = {"scale": jnp.ones(3), "w": jnp.ones((3, 3))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert np.all(np.asarray(updates["scale"]) == 0.0)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5, rtol=1e-6)


def _batch(cfg, rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, cfg.vocab_size, size=(rows, seq + 1)).astype(np.int32)
    seg = np.ones((rows, seq + 1), np.int32)
    seg[:, seq // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq + 1 - seq // 2)])[None].repeat(rows, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": ((seg[:, 1:] == seg[:, :-1])).astype(np.float32),
            "segment_ids": seg[:, :-1], "positions": pos[:, :-1].astype(np.int32)}


def _run_steps(mesh_axes, micro_batches=1, steps=2):
    cfg = get_config("tiny", dropout_rate=0.0)
    optim = experiment("tiny").optim
    tx, schedule = make_optimizer(optim, 100)
    parts = ModelParts.build(cfg, seed=0)
    mesh = make_mesh(*mesh_axes) if mesh_axes else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings, abstract = train_state_layout(parts, tx, mesh, seed=0)
    state = jax.jit(lambda: init_train_state(parts, tx, 0), out_shardings=shardings)()
    batch_sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    step = jax.jit(make_train_step(parts, tx, schedule, lm_objective(parts), micro_batches=micro_batches),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                   donate_argnums=0)
    losses = []
    for i in range(steps):
        batch = {k: jax.device_put(v, batch_sh) for k, v in _batch(cfg, seed=i).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, shardings


@pytest.fixture(scope="module")
def single_device_run():
    return _run_steps(None)


@pytest.mark.parametrize("mesh_axes", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_steps_match_one_device(single_device_run, mesh_axes):
    want_losses, want_state, _ = single_device_run
    losses, state, shardings = _run_steps(mesh_axes)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    # the rules: embed -> fsdp, heads / mlp -> tensor (where they divide), Adam moments alike
    data, fsdp, tensor = mesh_axes
    wq = shardings["params"]["blocks"][0]["attn"]["wq"]
    assert wq.spec == P("fsdp", "tensor" if 4 % tensor == 0 else None, None)
    w_up = state["params"]["blocks"][1]["mlp"]["w_up"]
    assert w_up.sharding.spec == P("fsdp", "tensor")
    mu = state["opt_state"][1][0].mu["blocks"][1]["mlp"]["w_up"]
    assert mu.sharding.spec == w_up.sharding.spec


def test_gradient_accumulation_matches_one_batch(single_device_run):
    want_losses, want_state, _ = single_device_run
    losses, state, _ = _run_steps(None, micro_batches=4)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_nonfinite_step_keeps_params():
    cfg = get_config("tiny")
    tx, schedule = make_optimizer(experiment("tiny").optim, 100)
    parts = ModelParts.build(cfg, seed=0)
    state = init_train_state(parts, tx, 0)
    before = jax.tree.map(np.asarray, state["params"])
    batch = _batch(cfg)
    batch["loss_mask"] = batch["loss_mask"] * np.float32("nan")
    state, metrics = jax.jit(make_train_step(parts, tx, schedule, lm_objective(parts)))(state, batch)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state["nonfinite"]) == 1 and int(state["first_nonfinite"]) == 0
    assert int(state["step"]) == 1
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(got), want)
