"""Attention mask specs: small hashable descriptions of who may attend to whom.

A `MaskSpec` is a pure function of absolute token positions, so the same spec serves
training (positions 0..T-1), packed batches (plus segment ids), one-token decode
(a query offset) and ring-buffer caches (explicit key positions). Constraints compose
by intersection: causal AND window AND block-sparse layout AND same segment.

Rules, for a query at position i and a key at position j (j < 0 marks an empty slot):
  causal:        j <= i
  window W:      0 <= i - j < W (causal) or |i - j| < W (bidirectional); the rule of
                 llama.cpp's granite_swa and Hugging Face Mistral/Qwen2.
  block-sparse:  with qb = i // B and kb = j // B, key block kb is visible when
                 |qb - kb| <= local_blocks, or kb < global_blocks, or qb < global_blocks,
                 or kb is one of the query block's `random_blocks` random past blocks
                 (drawn with a fixed seed by an integer hash, so they depend on qb only
                 and never on the sequence length).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSparse:
    """BigBird-style layout over blocks of `block_size` positions: local + global + random."""

    block_size: int = 64
    local_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("local_blocks", "global_blocks", "random_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def random_key_blocks(self, q_block):
        """The random key blocks of query block(s) `q_block`: shape [..., random_blocks].

        Works on numpy and jax integer arrays alike (uint32 hashing wraps identically);
        entries are in [0, q_block), or -1 for query block 0, which has no past.
        """
        xp = jnp if _is_jax(q_block) else np
        qb = xp.asarray(q_block).astype(xp.uint32)[..., None]
        draw = xp.arange(self.random_blocks, dtype=xp.uint32)
        h = _hash_u32(_hash_u32(qb * xp.uint32(0x9E3779B1) + xp.uint32(self.seed), xp) + draw, xp)
        qb_i = qb.astype(xp.int32)
        return xp.where(qb_i > 0, (h % xp.maximum(qb, 1).astype(xp.uint32)).astype(xp.int32), -1)

    def allows_blocks(self, q_block, k_block):
        """Whether key block(s) `k_block` are visible from query block(s) `q_block` (broadcast)."""
        xp = jnp if _is_jax(q_block) or _is_jax(k_block) else np
        qb, kb = xp.asarray(q_block), xp.asarray(k_block)
        ok = (xp.abs(qb - kb) <= self.local_blocks) | (kb < self.global_blocks) | (qb < self.global_blocks)
        if self.random_blocks:
            rand = self.random_key_blocks(qb)
            ok = ok | xp.any(rand == kb[..., None], axis=-1)
        return ok


def _hash_u32(x, xp):
    """A 32-bit integer finaliser (lowbias32); identical in numpy and jax."""
    x = xp.asarray(x, dtype=xp.uint32)
    x = x ^ (x >> xp.uint32(16))
    x = x * xp.uint32(0x7FEB352D)
    x = x ^ (x >> xp.uint32(15))
    x = x * xp.uint32(0x846CA68B)
    return x ^ (x >> xp.uint32(16))


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees. Hashable, so it can be a static jit argument."""

    causal: bool = True
    window: int | None = None
    sparse: BlockSparse | None = None

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")

    def allowed(self, q_pos, k_pos):
        """Boolean mask for query positions `q_pos[..., T]` and key positions `k_pos[..., S]`.

        Returns [..., T, S]. Accepts numpy (host metadata) or jax (traced) integer arrays.
        Key positions < 0 are empty slots and never visible.
        """
        xp = jnp if _is_jax(q_pos) or _is_jax(k_pos) else np
        i = xp.asarray(q_pos)[..., :, None]
        j = xp.asarray(k_pos)[..., None, :]
        ok = xp.broadcast_to(j >= 0, np.broadcast_shapes(i.shape, j.shape))
        if self.causal:
            ok = ok & (j <= i)
        if self.window is not None:
            ok = ok & ((i - j < self.window) if self.causal else (xp.abs(i - j) < self.window))
        if self.sparse is not None:
            bs = self.sparse.block_size
            qb, kb = i // bs, xp.maximum(j, 0) // bs
            if xp is np:  # host: evaluate each (query block, key block) pair once, then gather
                q_lo, k_lo = qb.min(initial=0), kb.min(initial=0)
                table = self.sparse.allows_blocks(np.arange(q_lo, qb.max(initial=0) + 1)[:, None],
                                                  np.arange(k_lo, kb.max(initial=0) + 1)[None, :])
                ok = ok & table[qb - q_lo, kb - k_lo]
            else:
                ok = ok & self.sparse.allows_blocks(qb, kb)
        return ok

    def block_map(self, q_len: int, kv_len: int, block_q: int, block_k: int, q_offset: int = 0):
        """Host-side tile metadata: which tiles hold any visible pair, bool [nq, nk].

        Tiles cover positions q_offset + [0, q_len) and [0, kv_len); tail tiles are
        padded with positions that count as not visible. Segment ids are not included.
        Evaluated a band of query tiles at a time, so host memory stays ~O(2^22) elements.
        """
        nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
        k_pos = np.arange(nk * block_k)
        k_pos = np.where(k_pos < kv_len, k_pos, -1)
        any_visible = np.zeros((nq, nk), bool)
        band = max(1, (1 << 22) // (block_q * nk * block_k))  # query tiles per step
        for start in range(0, nq, band):
            stop = min(nq, start + band)
            rows = np.arange(start * block_q, stop * block_q)
            dense = np.array(self.allowed(q_offset + rows, k_pos))  # writable copy
            dense[rows >= q_len] = False
            tiles = dense.reshape(stop - start, block_q, nk, block_k)
            any_visible[start:stop] = tiles.any(axis=(1, 3))
        return any_visible

    def visible_keys_per_query(self, seq_len: int) -> float:
        """Mean number of visible keys per query over a sequence of `seq_len` (for FLOP counts)."""
        total, chunk = 0, 1024
        pos = np.arange(seq_len)
        for start in range(0, seq_len, chunk):
            total += int(self.allowed(pos[start:start + chunk], pos).sum())
        return total / seq_len
