"""The pure train and eval steps, and `build_step`, the one place they are jitted and compiled.

`step(state, frozen, batch) -> (state, metrics)`: `frozen` is what the run reads but never
trains or saves (a LoRA base; `{}` otherwise, see `train.tuning`), and the objective sees
`tuning.model_params(state.params, frozen)`. Gradient accumulation over micro-batches with
`lax.scan` (rows `i::M`, so each device keeps its rows); the objective returns sums and a
count, and the step divides by the global count, so micro-batches and hosts add up exactly.
A step whose loss, gradients or updated params are not finite never changes params or
optimizer state; it only counts itself and remembers the first such step, so the host can
stop (or carry on) by config without ever holding, or saving, a poisoned state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shakti_jax.model import ModelDef
from shakti_jax.sharding import DEFAULT_RULES, activation_sharding
from shakti_jax.train import batches
from shakti_jax.train.optimizer import Optimizer
from shakti_jax.train.state import TrainState, init_state, state_shardings, with_shardings
from shakti_jax.train.tuning import Tuning, abstract_of

Batch = dict[str, jax.Array]
# objective(params, task_state, micro_batch, dropout_key | None)
#   -> (objective sum, {metric name: sum}, count); the step divides by the global count.
Objective = Callable[[dict, dict, Batch, Any], tuple[jax.Array, dict, jax.Array]]


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B / count, ...], taking rows i::count so each device keeps its rows
    (and, for stacked [chosen; rejected] rows, pairs stay together when count divides them)."""
    return {k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1)
            for k, v in batch.items()}


def make_train_step(objective: Objective, optimizer: Optimizer, *, micro_batches: int = 1,
                    seed: int = 0, tuning: Tuning = Tuning()
                    ) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """The pure step; dropout keys are fold_in(seed, step), independent of where a run resumed."""
    tx, schedule = optimizer.tx, optimizer.schedule
    base_key = jax.random.key(seed + 1)
    grad_sums = jax.grad(lambda p, f, t, mb, k, step: _with_aux(objective(tuning.model_params(p, f, step), t, mb, k)),
                         has_aux=True)

    def step(state: TrainState, frozen: dict, batch: Batch):
        params, task_state = state.params, state.task_state
        key = jax.random.fold_in(base_key, state.step)
        mbs = _micro_batches(batch, micro_batches)

        def accumulate(carry, xs):
            mb, i = xs
            g, aux = grad_sums(params, frozen, task_state, mb, jax.random.fold_in(key, i), state.step)
            return jax.tree.map(jnp.add, carry, (g, aux)), None

        _, aux_shape = jax.eval_shape(grad_sums, params, frozen, task_state,
                                      jax.tree.map(lambda x: x[0], mbs), key, state.step)
        zero = jax.tree.map(jnp.zeros_like, (params, aux_shape))
        (g_sum, (sums, count)), _ = jax.lax.scan(accumulate, zero, (mbs, jnp.arange(micro_batches)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        grad_norm = optax.tree.norm(grads)
        metrics = {k: v / denom for k, v in sums.items()}
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_param_norm = optax.tree.norm(new_params)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(new_param_norm))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step,
                                      state.first_nonfinite))
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), count=count,
                       param_norm=jnp.where(finite, new_param_norm, optax.tree.norm(params)))
        if tuning.qat is not None:  # how far the weights the model ran are from their latent values
            metrics["qat_error"] = tuning.qat.relative_error(tuning.latent_params(params, frozen))
        return new_state, metrics

    return step


def _with_aux(result):
    total, sums, count = result
    return total, (sums, count)


def make_eval_step(objective: Objective, tuning: Tuning = Tuning()
                   ) -> Callable[[dict, dict, dict, Batch], tuple[dict, jax.Array]]:
    """`eval(params, frozen, task_state, batch) -> (metric sums, count)` with dropout off."""

    def evaluate(params, frozen, task_state, batch):
        _, sums, count = objective(tuning.model_params(params, frozen), task_state, batch, None)
        return sums, count

    return evaluate


@dataclasses.dataclass
class BuiltStep:
    """A task's compiled train step, its jitted eval step, and the layouts they take."""

    compiled: Any  # compiled (state, frozen, batch) -> (state, metrics), state donated
    jitted_eval: Any  # jitted (params, frozen, task_state, batch) -> (sums, count)
    jitted_model_params: Any  # jitted (params, frozen) -> the params the model runs (QAT on)
    frozen: dict  # the step's frozen argument (a LoRA base; {} otherwise)
    tuning: Tuning
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with shardings (restore targets)
    schema: batches.Schema
    mesh: Mesh
    rules: Mapping
    init: Callable[[dict | None], TrainState]  # params (or None: fresh) -> sharded step-0 state
    compile_seconds: float  # tracing + lowering + XLA compilation of the train step
    model_def: ModelDef

    def train(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer step (donates `state`)."""
        return self.compiled(state, self.frozen, batch)

    def evaluate(self, params: dict, task_state: dict, batch: Batch) -> tuple[dict, jax.Array]:
        return self.jitted_eval(params, self.frozen, task_state, batch)

    def model_params(self, params: dict) -> dict:
        """The params the model runs for the trainable `params` (base + adapters for LoRA,
        fake-quantized under QAT)."""
        if self.tuning.lora is None and self.tuning.qat is None:
            return params
        return self.jitted_model_params(params, self.frozen)

    def global_batch(self, local: Mapping) -> Batch:
        return batches.global_batch(self.schema, local, self.mesh, self.rules)

    def memory_line(self) -> str:
        analysis = self.compiled.memory_analysis()
        if analysis is None:
            return "compiled train step (no memory analysis on this backend)"
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return (f"compiled train step in {self.compile_seconds:.1f} s; per device: arguments "
                f"{gib(analysis.argument_size_in_bytes)}, outputs "
                f"{gib(analysis.output_size_in_bytes)}, temporaries "
                f"{gib(analysis.temp_size_in_bytes)}, aliased {gib(analysis.alias_size_in_bytes)}")


def build_step(task, model_def: ModelDef, optimizer: Optimizer, mesh: Mesh,
               rules: Mapping = DEFAULT_RULES, *, batch_size: int, micro_batches: int = 1,
               seed: int = 0, tuning: Tuning = Tuning(), frozen: dict | None = None) -> BuiltStep:
    """Jit `task`'s objective into a sharded, donated train step compiled ahead of time for
    global batches of `batch_size` examples, plus its eval step and the state layout.
    `frozen` is the step's frozen argument (`tuning.frozen(...)`; None: `{}`)."""
    tx = optimizer.tx
    frozen = {} if frozen is None else frozen
    param_sh = tuning.trainable_shardings(model_def, mesh, rules)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)

    def fresh(params):
        params = tuning.fresh_trainable(model_def, seed) if params is None else params
        return init_state(params, tx, task.init_task_state(params))

    abstract = jax.eval_shape(fresh, None)
    shardings = state_shardings(abstract, tx, param_sh, mesh, task.task_state_shardings)
    abstract = with_shardings(abstract, shardings)
    schema = task.batch_schema
    batch_sh = batches.shardings(schema, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = make_train_step(task.objective(model_def), optimizer, micro_batches=micro_batches,
                           seed=seed, tuning=tuning)
    start = time.perf_counter()
    with activation_sharding(mesh, rules):
        jitted = jax.jit(step, in_shardings=(shardings, frozen_sh, batch_sh),
                         out_shardings=(shardings, replicated), donate_argnums=0)
        compiled = jitted.lower(abstract, abstract_of(frozen),
                                batches.abstract(schema, task.batch_sizes(batch_size), mesh,
                                                 rules)).compile()
    compile_seconds = time.perf_counter() - start
    evaluate = jax.jit(make_eval_step(task.eval_objective(model_def), tuning),
                       in_shardings=(shardings.params, frozen_sh, shardings.task_state, batch_sh))
    model_params = jax.jit(tuning.model_params,
                           out_shardings=model_def.param_shardings(mesh, rules))

    def init(params=None):
        if params is None:
            return jax.jit(lambda: fresh(None), out_shardings=shardings)()
        return jax.jit(fresh, out_shardings=shardings, donate_argnums=0)(params)

    return BuiltStep(compiled, evaluate, model_params, frozen, tuning, shardings, abstract, schema, mesh, rules,
                     init, compile_seconds, model_def)
