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
    """A (data, fsdp, tensor) mesh; data=-1 takes every device the other two leave."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide {len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {len(devices)} devices")
    grid = np.asarray(devices).reshape(data, fsdp, tensor)
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
