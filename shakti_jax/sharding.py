"""Meshes and the rules that map logical axis names to mesh axes (the only place that knows both).

Model parameters carry logical names (`layers, vocab, embed, heads, kv_heads, head_dim, mlp`),
key activations `(batch, seq, embed)`; a rule table maps each to a mesh axis of a (data, fsdp,
tensor) mesh, or to None (replicated). Activation constraints apply only inside
`activation_sharding(mesh, rules)` (the step builder enters it while tracing).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model width across "fsdp"; tensor parallelism splits heads and the MLP.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1: every device the other two leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be >= 1, "
                         f"and at most one of them -1")
    if free:
        fixed = int(np.prod([size for size in sizes.values() if size != -1]))
        if len(devices) % fixed:
            raise ValueError(f"mesh {' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)}"
                             f" does not divide {len(devices)} devices")
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x "
                         f"tensor={sizes['tensor']} != {len(devices)} devices")
    grid = np.asarray(devices).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: tuple[str | None, ...], rules: Mapping = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis already used by an earlier dim is dropped."""
    used, spec = set(), []
    for name in axes:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def fitted_sharding(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh,
                    rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of an array with logical `axes`; a dimension that its mesh axes do not
    divide is replicated instead of failing late."""
    spec = logical_to_spec(tuple(axes), rules)
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(entry if dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))


def tree_shardings(shapes, axes, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """Shardings for a pytree of arrays (or ShapeDtypeStructs) given a same-structured pytree
    of logical-axis tuples."""
    return jax.tree.map(lambda a, names: fitted_sharding(a.shape, names, mesh, rules),
                        shapes, axes, is_leaf=lambda x: isinstance(x, tuple))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping] | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain an activation with logical `axes` to the active mesh; a no-op outside
    `activation_sharding` (eager code, single-device jit)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, fitted_sharding(x.shape, axes, mesh, rules))
