"""Pure training and evaluation steps over a plain-pytree train state.

The train state is `{"step", "params", "opt_state", "nonfinite", "first_nonfinite"}` (plus a
frozen `reference` copy of the params for DPO with an in-memory reference), with
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
from shakti_jax.train.dpo import dpo_loss, sequence_logps
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


def init_train_state(parts: ModelParts, tx: optax.GradientTransformation, seed: int, *,
                     params: dict | None = None, with_reference: bool = False) -> dict:
    """Step 0: fresh (or given) params, fresh optimizer state, and for DPO with an in-memory
    reference a frozen copy of the starting params."""
    params = parts.init_params(seed) if params is None else params
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "nonfinite": jnp.zeros((), jnp.int32), "first_nonfinite": jnp.full((), -1, jnp.int32)}
    if with_reference:
        state["reference"] = jax.tree.map(jnp.copy, params)
    return state


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B / count, ...], taking rows i::count so each device keeps its rows
    (and, for stacked [chosen; rejected] rows, pairs stay together when count divides them)."""
    return {k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1)
            for k, v in batch.items()}


# objective(params, reference_params | None, micro_batch, dropout_key | None)
#   -> (objective sum, {metric name: sum}, count); the step divides by the global count.
Objective = Callable[[dict, Any, Batch, Any], tuple[jax.Array, dict, jax.Array]]


def lm_objective(parts: ModelParts, z_loss: float = 0.0) -> Objective:
    """Next-token NLL over masked targets (+ z-loss); count = target tokens."""

    def objective(params, reference, mb, key):
        del reference
        logits = parts.model(params, key)(mb["inputs"], mb["positions"], mb["segment_ids"])
        nll, z, count = lm_loss_sums(logits, mb["targets"], mb["loss_mask"])
        return nll + z_loss * z, {"loss": nll, "z_loss": z}, count

    return objective


def dpo_objective(parts: ModelParts, *, beta: float, loss: str, label_smoothing: float) -> Objective:
    """DPO over stacked [chosen; rejected] rows; the reference is frozen params (in memory)
    or the batch's precomputed `ref_chosen` / `ref_rejected`; count = pairs."""

    def logps(params, mb, key):
        logits = parts.model(params, key)(mb["inputs"], mb["positions"], mb["segment_ids"])
        return sequence_logps(logits, mb["targets"], mb["loss_mask"])

    def objective(params, reference, mb, key):
        policy = logps(params, mb, key)
        pairs = policy.shape[0] // 2
        if reference is None:
            ref_c, ref_r = mb["ref_chosen"], mb["ref_rejected"]
        else:
            ref = jax.lax.stop_gradient(logps(reference, mb, None))
            ref_c, ref_r = ref[:pairs], ref[pairs:]
        per_pair, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref_c, ref_r, beta=beta,
                                     loss=loss, label_smoothing=label_smoothing)
        sums = {"loss": per_pair.sum(), **{k: v.sum() for k, v in metrics.items()}}
        return per_pair.sum(), sums, jnp.asarray(pairs, jnp.float32)

    return objective


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, objective: Objective, *, micro_batches: int = 1,
                    seed: int = 0) -> Callable[[dict, Batch], tuple[dict, dict]]:
    """`step(state, batch) -> (state, metrics)`: gradient accumulation over `micro_batches`;
    gradients and metrics are sums over the global batch divided by the objective's count."""
    base_key = jax.random.key(seed + 1)
    grad_sums = jax.grad(lambda p, r, mb, k: _with_aux(objective(p, r, mb, k)), has_aux=True)

    def step(state, batch):
        params, reference = state["params"], state.get("reference")
        key = jax.random.fold_in(base_key, state["step"])

        def accumulate(carry, xs):
            mb, i = xs
            g, aux = grad_sums(params, reference, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (g, aux)), None

        _, aux_shape = jax.eval_shape(grad_sums, params, reference,
                                      jax.tree.map(lambda x: x[0], _micro_batches(batch, micro_batches)),
                                      key)
        zero = jax.tree.map(jnp.zeros_like, (params, aux_shape))
        xs = (_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
        (g_sum, (sums, count)), _ = jax.lax.scan(accumulate, zero, xs)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.tree.norm(grads)
        metrics = {k: v / denom for k, v in sums.items()}
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            **state,
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "first_nonfinite": jnp.where((state["first_nonfinite"] < 0) & ~finite,
                                         state["step"], state["first_nonfinite"]),
        }
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                       count=count, param_norm=optax.tree.norm(params))
        return new_state, metrics

    return step


def _with_aux(result):
    total, sums, count = result
    return total, (sums, count)


def make_eval_step(objective: Objective) -> Callable[[dict, Any, Batch], tuple[dict, jax.Array]]:
    """`eval(params, reference, batch) -> (metric sums, count)` with dropout off."""

    def evaluate(params, reference, batch):
        _, sums, count = objective(params, reference, batch, None)
        return sums, count

    return evaluate
