"""Grouped-query self-attention; every path calls shakti_jax.ops.attention."""

from __future__ import annotations

import jax
from flax import nnx

from shakti_jax.config import ModelConfig
from shakti_jax.model.kv_cache import LayerCache
from shakti_jax.model.layers import apply_rope, param
from shakti_jax.ops.attention import attention


class Attention(nnx.Module):
    """Q/K/V projections with N query heads and K shared KV heads, RoPE, one output projection."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        D, N, K, H, std = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std
        self.mask = cfg.layer_mask(layer)
        self.rope_theta = cfg.rope_theta
        self.dtype = cfg.dtype
        self.impl = cfg.attention_impl
        self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std, cfg.param_dtype)
        self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype)
        self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype)
        self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"),
                        std / (2 * cfg.num_layers) ** 0.5, cfg.param_dtype)

    def _qkv(self, x_BTD, positions_BT):
        x = x_BTD.astype(self.dtype)
        q_BTNH = jax.numpy.einsum("btd,dnh->btnh", x, self.wq[...].astype(self.dtype))
        k_BTKH = jax.numpy.einsum("btd,dkh->btkh", x, self.wk[...].astype(self.dtype))
        v_BTKH = jax.numpy.einsum("btd,dkh->btkh", x, self.wv[...].astype(self.dtype))
        return (apply_rope(q_BTNH, positions_BT, self.rope_theta),
                apply_rope(k_BTKH, positions_BT, self.rope_theta), v_BTKH)

    def _out(self, o_BTNH):
        return jax.numpy.einsum("btnh,nhd->btd", o_BTNH, self.wo[...].astype(self.dtype))

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Full-sequence attention (training, scoring). RoPE uses `positions_BT` (per document
        in packed rows); the mask uses row positions 0..T-1 and the segment ids."""
        q, k, v = self._qkv(x_BTD, positions_BT)
        return self._out(attention(q, k, v, mask=self.mask, segment_ids=segment_ids_BT, impl=self.impl))

    def prefill(self, x_BTD: jax.Array, lengths_B: jax.Array, cache: LayerCache):
        """Right-padded prompts of `lengths_B` tokens: attend in flight, then fill the cache."""
        T = x_BTD.shape[1]
        positions_BT = jax.numpy.broadcast_to(jax.numpy.arange(T), x_BTD.shape[:2])
        q, k, v = self._qkv(x_BTD, positions_BT)
        out = self._out(attention(q, k, v, mask=self.mask, impl=self.impl))
        return out, cache.write_prompt(k, v, lengths_B)

    def decode(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: LayerCache):
        """New tokens at `positions_BT` (contiguous per row): write, then attend over the cache."""
        q, k, v = self._qkv(x_BTD, positions_BT)
        cache = cache.write_step(k, v, positions_BT)
        out = attention(q, cache.k_BSKH, cache.v_BSKH, mask=self.mask, q_offset=positions_BT[:, 0],
                        k_positions=cache.pos_BS, impl=self.impl)
        return self._out(out), cache
