"""The decoder-only transformer: embed -> pre-norm blocks -> norm -> logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from shakti_jax.config import ModelConfig
from shakti_jax.model.attention import Attention
from shakti_jax.model.kv_cache import LayerCache
from shakti_jax.model.layers import MLP, Norm, param


class Block(nnx.Module):
    """x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, layer, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs) if cfg.dropout_rate else None

    def _residual(self, x_BTD, update_BTD):
        if self.dropout is not None:
            update_BTD = self.dropout(update_BTD)
        return x_BTD + update_BTD.astype(x_BTD.dtype)

    def _finish(self, x_BTD, attn_out_BTD):
        x_BTD = self._residual(x_BTD, attn_out_BTD)
        return self._residual(x_BTD, self.mlp(self.mlp_norm(x_BTD)))

    def __call__(self, x_BTD, positions_BT, segment_ids_BT=None):
        return self._finish(x_BTD, self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT))

    def prefill(self, x_BTD, lengths_B, cache: LayerCache):
        out_BTD, cache = self.attn.prefill(self.attn_norm(x_BTD), lengths_B, cache)
        return self._finish(x_BTD, out_BTD), cache

    def decode(self, x_BTD, positions_BT, cache: LayerCache):
        out_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), positions_BT, cache)
        return self._finish(x_BTD, out_BTD), cache


class Transformer(nnx.Module):
    """Shakti decoder. The residual stream is f32; matmuls run in `cfg.dtype`; logits are f32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                               cfg.init_std, cfg.param_dtype)
        self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              cfg.init_std, cfg.param_dtype))

    def _embed(self, tokens_BT):
        return self.embedding[...][tokens_BT].astype(jnp.float32)

    def _logits(self, x_BTD):
        x = self.final_norm(x_BTD).astype(self.cfg.dtype)
        if self.lm_head is None:
            w_DV = self.embedding[...].astype(self.cfg.dtype).T
        else:
            w_DV = self.lm_head[...].astype(self.cfg.dtype)
        return jnp.einsum("btd,dv->btv", x, w_DV, preferred_element_type=jnp.float32)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] for whole sequences (training, scoring, the no-cache reference)."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = self._embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, positions_BT, segment_ids_BT)
        return self._logits(x_BTD)

    def prefill(self, tokens_BT: jax.Array, lengths_B: jax.Array, caches: list[LayerCache]):
        """Right-padded prompts -> (logits at each prompt's last token [B, V], filled caches)."""
        x_BTD = self._embed(tokens_BT)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x_BTD, cache = block.prefill(x_BTD, lengths_B, cache)
            new_caches.append(cache)
        last_BD = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
        return self._logits(last_BD)[:, 0], new_caches

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, caches: list[LayerCache]):
        """New tokens at `positions_BT` -> (logits [B, T, V], updated caches)."""
        x_BTD = self._embed(tokens_BT)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x_BTD, cache = block.decode(x_BTD, positions_BT, cache)
            new_caches.append(cache)
        return self._logits(x_BTD), new_caches
