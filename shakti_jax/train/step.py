"""Pure training and evaluation steps over a plain-pytree train state.

The train state is `{"step", "params", "opt_state", "nonfinite", "first_nonfinite"}` with
params as a plain nested dict (`nnx.to_pure_dict`), so optax, orbax and sharding rules all
see ordinary pytrees. The model is rebuilt inside the jitted step from its graph definition.
A step whose loss or gradients are not finite never changes params or optimizer state; it
only counts itself (`nonfinite`) and remembers the first such step, so the host can stop
(or carry on) by config without ever holding, or saving, a poisoned state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shakti_jax.config import ModelConfig
from shakti_jax.model import Transformer
from shakti_jax.train.losses import lm_loss_sums

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model split for functional use: graph, abstract params, and its (tiny) RNG state."""

    cfg: ModelConfig
    graphdef: Any
    abstract_params: nnx.State
    rng_state: nnx.State

    @classmethod
    def build(cls, cfg: ModelConfig, seed: int) -> ModelParts:
        def split():
            model = Transformer(cfg, nnx.Rngs(seed))
            return nnx.split(model, nnx.Param, ...)

        graphdef, abstract_params, _ = nnx.eval_shape(split)
        rng_state = jax.jit(lambda: split()[2])()
        return cls(cfg, graphdef, abstract_params, rng_state)

    def init_params(self, seed: int) -> dict:
        """Fresh parameters as a pure dict (call under jit with out_shardings to shard them)."""
        model = Transformer(self.cfg, nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])

    def model(self, params: dict, dropout_key: jax.Array | None = None) -> Transformer:
        """The Transformer over `params`; with a key, dropout is on and seeded by it."""
        state = jax.tree.map(lambda x: x, self.abstract_params)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(self.graphdef, state, self.rng_state)
        if dropout_key is None:
            model.eval()
        else:
            nnx.reseed(model, default=dropout_key)
        return model


def init_train_state(parts: ModelParts, tx: optax.GradientTransformation, seed: int) -> dict:
    params = parts.init_params(seed)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "nonfinite": jnp.zeros((), jnp.int32), "first_nonfinite": jnp.full((), -1, jnp.int32)}


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, T] -> [count, B / count, T], taking rows i::count so each device keeps its rows."""
    return {k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1)
            for k, v in batch.items()}


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, micro_batches: int = 1, z_loss: float = 0.0,
                    seed: int = 0) -> Callable[[dict, Batch], tuple[dict, dict]]:
    """`step(state, batch) -> (state, metrics)`: gradient accumulation over `micro_batches`,
    loss = mean masked NLL over every target token of the global batch (+ z-loss)."""
    base_key = jax.random.key(seed + 1)

    def sums(params, mb, key):
        model = parts.model(params, key)
        logits = model(mb["inputs"], mb["positions"], mb["segment_ids"])
        nll, z, count = lm_loss_sums(logits, mb["targets"], mb["loss_mask"])
        return nll + z_loss * z, (nll, z, count)

    grad_sums = jax.grad(sums, has_aux=True)

    def step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])

        def accumulate(carry, xs):
            mb, i = xs
            g, aux = grad_sums(params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (g, aux)), None

        zero = (jax.tree.map(jnp.zeros_like, params), (0.0, 0.0, 0.0))
        xs = (_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
        (g_sum, (nll, z, count)), _ = jax.lax.scan(accumulate, zero, xs)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.tree.norm(grads)
        loss = nll / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(z)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "first_nonfinite": jnp.where((state["first_nonfinite"] < 0) & ~finite,
                                         state["step"], state["first_nonfinite"]),
        }
        metrics = {"loss": loss, "z_loss": z / denom, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]), "target_tokens": count,
                   "param_norm": optax.tree.norm(params)}
        return new_state, metrics

    return step


def make_eval_step(parts: ModelParts) -> Callable[[dict, Batch], dict]:
    """`eval(params, batch) -> {"nll_sum", "tokens"}` with dropout off."""

    def evaluate(params, batch):
        logits = parts.model(params)(batch["inputs"], batch["positions"], batch["segment_ids"])
        nll, _, count = lm_loss_sums(logits, batch["targets"], batch["loss_mask"])
        return {"nll_sum": nll, "tokens": count}

    return evaluate
