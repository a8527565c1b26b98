"""`ModelDef`: a model's config and graph definition, the only way from params to a model.

Params are a plain nested dict of arrays (`nnx.to_pure_dict` layout), so optax, orbax and the
sharding rules all see ordinary pytrees; training, generation, export, evaluation, benchmarks
and tests turn them into a model with `ModelDef.bind` (or run it with `apply`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from shakti_jax.config import ModelConfig
from shakti_jax.model.transformer import Transformer
from shakti_jax.sharding import DEFAULT_RULES, tree_shardings

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """Config + graph definition + abstract param state (shapes, dtypes, logical axes)."""

    config: ModelConfig
    graphdef: Any
    template: nnx.State

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelDef:
        graphdef, template = nnx.eval_shape(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0))))
        return cls(cfg, graphdef, template)

    @property
    def abstract_params(self) -> Params:
        """ShapeDtypeStructs in the params' pure-dict layout."""
        return nnx.to_pure_dict(self.template)

    @property
    def param_axes(self) -> Params:
        """Logical axis names of every param, in the params' layout."""
        axes = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), self.template,
                            is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.to_pure_dict(axes)

    def param_shardings(self, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> Params:
        return tree_shardings(self.abstract_params, self.param_axes, mesh, rules)

    def init(self, seed: int) -> Params:
        """Fresh params (call under jit with out_shardings to create them sharded)."""
        return nnx.to_pure_dict(nnx.state(Transformer(self.config, nnx.Rngs(seed))))

    def bind(self, params: Params) -> Transformer:
        """The Transformer over `params` (arrays or tracers; nothing is copied)."""
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
              segment_ids_BT: jax.Array | None = None, *,
              dropout_key: jax.Array | None = None, logits_at_BK: jax.Array | None = None
              ) -> jax.Array:
        """Logits [B, T, V], or [B, K, V] at the indices `logits_at_BK`; dropout only with a key."""
        return self.bind(params)(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key,
                                 logits_at_BK=logits_at_BK)

    def values(self, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None
               ) -> jax.Array:
        """The value head at every position [B, T] (needs `model.value_head`)."""
        return self.bind(params).values(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key)

    def logits_and_values(self, params: Params, tokens_BT: jax.Array,
                          positions_BT: jax.Array | None = None,
                          segment_ids_BT: jax.Array | None = None, *,
                          dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Logits [B, T, V] and values [B, T] from one forward pass."""
        return self.bind(params).logits_and_values(tokens_BT, positions_BT, segment_ids_BT,
                                                   dropout_key=dropout_key)
