"""Batch schemas: every task's batch fields, declared once with dtypes and logical axes.

A field's dims name sizes (`rows`: token rows, `pairs`: preference pairs, `seq`: tokens per
row); its logical axes say how it is sharded (`batch` over the mesh's data-parallel axes).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from shakti_jax.sharding import DEFAULT_RULES, logical_to_spec

LOGICAL = {"rows": "batch", "pairs": "batch", "seq": "seq"}


@dataclasses.dataclass(frozen=True)
class Field:
    dtype: type
    dims: tuple[str, ...]

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(LOGICAL[d] for d in self.dims)


Schema = Mapping[str, Field]

TOKENS: Schema = {
    "inputs": Field(jnp.int32, ("rows", "seq")),
    "targets": Field(jnp.int32, ("rows", "seq")),
    "loss_mask": Field(jnp.float32, ("rows", "seq")),
    "segment_ids": Field(jnp.int32, ("rows", "seq")),
    "positions": Field(jnp.int32, ("rows", "seq")),
}
# DPO with precomputed reference log-probs: one value per pair and reply.
REFERENCE_LOGPS: Schema = {
    "ref_chosen": Field(jnp.float32, ("pairs",)),
    "ref_rejected": Field(jnp.float32, ("pairs",)),
}


def shardings(schema: Schema, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, logical_to_spec(f.axes, rules)) for k, f in schema.items()}


def abstract(schema: Schema, sizes: Mapping[str, int], mesh: Mesh,
             rules: Mapping = DEFAULT_RULES) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of a batch with `sizes` (e.g. {"rows": 16, "seq": 128}), sharded."""
    sh = shardings(schema, mesh, rules)
    return {k: jax.ShapeDtypeStruct(tuple(sizes[d] for d in f.dims), f.dtype, sharding=sh[k])
            for k, f in schema.items()}


def global_batch(schema: Schema, local: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Mapping = DEFAULT_RULES) -> dict[str, jax.Array]:
    """One global array per field from this process's rows (multi-host safe)."""
    sh = shardings(schema, mesh, rules)
    return {k: jax.make_array_from_process_local_data(sh[k], np.asarray(local[k], f.dtype))
            for k, f in schema.items()}
