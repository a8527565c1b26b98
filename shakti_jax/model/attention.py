"""Grouped-query self-attention; every path calls shakti_jax.ops.attention.attention."""

from __future__ import annotations

import jax
from flax import nnx

from shakti_jax.config import ModelConfig, kind_mask
from shakti_jax.model.kv_cache import LayerCache
from shakti_jax.model.layers import apply_rope, param
from shakti_jax.ops.attention import attention


class Attention(nnx.Module):
    """Q/K/V projections with N query heads and K shared KV heads, RoPE, one output projection."""

    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, stack: int | None = None):
        D, N, K, H, std = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std
        self.mask = kind_mask(cfg, kind)
        self.rope_theta = cfg.rope_theta
        self.dtype = cfg.dtype
        self.impl = cfg.attention_impl
        dt = cfg.param_dtype
        self.wq = param(rngs, stack, (D, N, H), ("embed", "heads", "head_dim"), std, dt)
        self.wk = param(rngs, stack, (D, K, H), ("embed", "kv_heads", "head_dim"), std, dt)
        self.wv = param(rngs, stack, (D, K, H), ("embed", "kv_heads", "head_dim"), std, dt)
        self.wo = param(rngs, stack, (N, H, D), ("heads", "head_dim", "embed"),
                        std / (2 * cfg.num_layers) ** 0.5, dt)
        if cfg.attention_bias:
            self.bq = param(rngs, stack, (N, H), ("heads", "head_dim"), 0.0, dt)
            self.bk = param(rngs, stack, (K, H), ("kv_heads", "head_dim"), 0.0, dt)
            self.bv = param(rngs, stack, (K, H), ("kv_heads", "head_dim"), 0.0, dt)
        else:
            self.bq = self.bk = self.bv = None

    def _qkv(self, x_BTD, positions_BT):
        x = x_BTD.astype(self.dtype)
        q_BTNH = jax.numpy.einsum("btd,dnh->btnh", x, self.wq[...].astype(self.dtype))
        k_BTKH = jax.numpy.einsum("btd,dkh->btkh", x, self.wk[...].astype(self.dtype))
        v_BTKH = jax.numpy.einsum("btd,dkh->btkh", x, self.wv[...].astype(self.dtype))
        if self.bq is not None:
            q_BTNH = q_BTNH + self.bq[...].astype(self.dtype)
            k_BTKH = k_BTKH + self.bk[...].astype(self.dtype)
            v_BTKH = v_BTKH + self.bv[...].astype(self.dtype)
        return (apply_rope(q_BTNH, positions_BT, self.rope_theta),
                apply_rope(k_BTKH, positions_BT, self.rope_theta), v_BTKH)

    def _out(self, o_BTNH):
        return jax.numpy.einsum("btnh,nhd->btd", o_BTNH, self.wo[...].astype(self.dtype))

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Full-sequence attention (training, scoring). RoPE and the mask both use
        `positions_BT` (per document in packed rows, with their segment ids), so a packed
        document sees exactly what it sees alone."""
        q, k, v = self._qkv(x_BTD, positions_BT)
        doc_positions = positions_BT if segment_ids_BT is not None else None
        return self._out(attention(q, k, v, mask=self.mask, segment_ids=segment_ids_BT,
                                   doc_positions=doc_positions, impl=self.impl))

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
