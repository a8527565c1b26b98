"""AdamW with warmup + cosine or WSD schedules, clipping, and no decay on norms and biases."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax
from ml_collections import ConfigDict

from shakti_jax.config import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `lr * min_lr_ratio`, or WSD: hold, then a linear
    decay over the last `decay_fraction` of the steps (warmup-stable-decay)."""
    lr, warmup, floor = optim.lr, optim.warmup_steps, optim.lr * optim.min_lr_ratio
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r} must be one of {SCHEDULES}")
    if warmup >= total_steps and optim.schedule != "constant":
        raise ConfigError(f"optim.warmup_steps={warmup} must be < train.steps={total_steps}")
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    if optim.schedule == "constant":
        rest = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        rest = optax.cosine_decay_schedule(lr, total_steps - warmup, alpha=optim.min_lr_ratio)
    else:
        decay = max(1, int(round((total_steps - warmup) * optim.decay_fraction)))
        rest = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)],
            [total_steps - warmup - decay])
    return optax.join_schedules([warm, rest], [warmup])


NO_DECAY = frozenset({"scale", "bias", "bq", "bk", "bv"})  # norm scales and biases


def decay_mask(params):
    """Weight decay on projections and embeddings, never on norms or biases. By name, since
    stacked layers give norm scales a leading "layers" axis."""
    def decays(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def check_optim(optim: ConfigDict) -> None:
    """One-line ConfigError for any setting that cannot train (before anything compiles)."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"optim.{key}={optim[key]!r}: {why}")

    def number(key: str) -> float:
        value = optim[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad(key, "must be a number")
        return float(value)

    if not 0 < number("lr") < math.inf:
        raise bad("lr", "must be a finite number > 0")
    for key in ("b1", "b2"):
        if not 0 <= number(key) < 1:
            raise bad(key, "must be in [0, 1)")
    if not number("eps") > 0:
        raise bad("eps", "must be > 0")
    for key in ("weight_decay", "clip_norm", "z_loss"):
        if not 0 <= number(key) < math.inf:
            raise bad(key, "must be a finite number >= 0 (0 turns it off)")
    if not 0 <= number("min_lr_ratio") <= 1:
        raise bad("min_lr_ratio", "must be in [0, 1]")
    if not 0 < number("decay_fraction") <= 1:
        raise bad("decay_fraction", "must be in (0, 1]")
    warmup = optim.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise bad("warmup_steps", "must be an integer >= 0")


def make_optimizer(optim: ConfigDict, total_steps: int) -> Optimizer:
    check_optim(optim)
    schedule = learning_rate_schedule(optim, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=decay_mask),
    )
    return Optimizer(tx, schedule)
