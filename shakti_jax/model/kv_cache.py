"""KV caches: one fixed-size buffer per layer, written at slot = position % size.

A global layer's buffer holds the whole generation (size = max length, so slot = position).
A sliding-window layer's buffer is a ring of `window` slots: memory is O(window), not
O(length), and writing position p overwrites p - window, the key that just left the window.
Each slot records the absolute position it holds (-1 = empty), which is all the attention
mask needs, so both kinds share every line of code.

Caches follow the stacked layer layout (`ModelConfig.layer_groups`): one tuple per group with
one `LayerCache` per slot of the period, its arrays carrying a leading axis of the group's
repeats, so the scanned layers read and write their own slice.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from shakti_jax.config import ModelConfig


@flax.struct.dataclass
class LayerCache:
    k_BSKH: jax.Array
    v_BSKH: jax.Array
    pos_BS: jax.Array  # absolute position held by each slot, -1 when empty

    @property
    def size(self) -> int:
        return self.k_BSKH.shape[-3]

    @property
    def nbytes(self) -> int:
        return self.k_BSKH.nbytes + self.v_BSKH.nbytes + self.pos_BS.nbytes

    def write_prompt(self, k_BTKH: jax.Array, v_BTKH: jax.Array, lengths_B: jax.Array) -> "LayerCache":
        """Store right-padded prompts: slot s gets the latest valid position p < length with p % size == s."""
        S, T = self.size, k_BTKH.shape[1]
        last_B1 = lengths_B[:, None] - 1
        pos_BS = last_B1 - jnp.mod(last_B1 - jnp.arange(S)[None, :], S)
        src_BS = jnp.clip(pos_BS, 0, T - 1)
        take = jax.vmap(lambda a, i: a[i])
        return LayerCache(take(k_BTKH, src_BS).astype(self.k_BSKH.dtype),
                          take(v_BTKH, src_BS).astype(self.v_BSKH.dtype),
                          jnp.where(pos_BS >= 0, pos_BS, -1).astype(jnp.int32))

    def write_step(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> "LayerCache":
        """Store decoded tokens at their positions (T <= size)."""
        slots_BT = jnp.mod(positions_BT, self.size)
        rows_B1 = jnp.arange(k_BTKH.shape[0])[:, None]
        return LayerCache(self.k_BSKH.at[rows_B1, slots_BT].set(k_BTKH.astype(self.k_BSKH.dtype)),
                          self.v_BSKH.at[rows_B1, slots_BT].set(v_BTKH.astype(self.v_BSKH.dtype)),
                          self.pos_BS.at[rows_B1, slots_BT].set(positions_BT.astype(jnp.int32)))


Caches = list[tuple[LayerCache, ...]]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> Caches:
    """Empty caches for every layer group and slot; window layers get min(window, max_len) slots."""
    dtype = dtype or cfg.dtype
    caches = []
    for kinds, repeats in cfg.layer_groups:
        group = []
        for kind in kinds:
            size = min(cfg.window, max_len) if kind == "window" else max_len
            shape = (repeats, batch, size, cfg.num_kv_heads, cfg.head_dim)
            group.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                    jnp.full((repeats, batch, size), -1, jnp.int32)))
        caches.append(tuple(group))
    return caches
