"""The typed train state and its shardings.

`TrainState` is a pytree dataclass: the step, params (plain nested dict), optimizer state, the
task's own state (e.g. DPO's frozen reference params; empty for most tasks) and the
non-finite counters. Optimizer-state shardings follow from optax's own knowledge of which
leaves are param-shaped (`optax.tree_utils.tree_map_params`), never from key names.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    task_state: dict
    nonfinite: jax.Array  # steps whose update was refused (non-finite loss, grads or params)
    first_nonfinite: jax.Array  # the first such step, -1 while there is none


def init_state(params: dict, tx: optax.GradientTransformation, task_state: dict) -> TrainState:
    """Step 0 over `params` (call under jit with out_shardings to build it sharded)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      task_state=task_state, nonfinite=jnp.zeros((), jnp.int32),
                      first_nonfinite=jnp.full((), -1, jnp.int32))


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, param_shardings: dict,
                    mesh: Mesh, task_state_shardings: Callable[[dict, NamedSharding], dict]
                    ) -> TrainState:
    """Shardings of every leaf: params by their logical axes, optimizer moments like their
    params, the task's state as the task says, counters replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                      task_state=task_state_shardings(param_shardings, replicated),
                      nonfinite=replicated, first_nonfinite=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (what AOT lowering and orbax restores take)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
