"""Meshes and the rules that map logical axis names to mesh axes (the only place that knows both).

Model parameters carry logical names (`vocab, embed, heads, kv_heads, head_dim, mlp`); a rule
table maps each to a mesh axis of a (data, fsdp, tensor) mesh, or to None (replicated).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model width across "fsdp"; tensor parallelism splits heads and the MLP.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
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


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """NamedSharding for every parameter of `state` from its logical-axis metadata.

    A dimension that the mesh axis does not divide is replicated instead of failing late.
    """

    def sharding(var):
        spec = logical_to_spec(tuple(var.get_metadata().get("out_sharding") or ()), rules)
        fitted = []
        for dim, entry in zip(var.shape, tuple(spec) + (None,) * (len(var.shape) - len(spec))):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            fitted.append(entry if dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*fitted))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shardings_like(tree, params_shardings, mesh: Mesh):
    """Shardings for a pytree holding param-shaped subtrees (optimizer moments): a leaf whose
    key path ends with a parameter's key path takes that parameter's sharding; every other
    leaf (step counts, scalars) is replicated."""
    by_path = {tuple(map(str, path)): s for path, s in
               jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
    longest = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for n in range(min(longest, len(keys)), 0, -1):
            sharding = by_path.get(keys[-n:])
            if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)
