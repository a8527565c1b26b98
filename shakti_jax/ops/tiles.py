"""Host-side tile plans: which (query tile, key tile) pairs a kernel computes.

A plan is computed once per (mask, lengths, tile sizes, query offset) with numpy and cached;
kernels loop only over the tiles it lists, so empty tiles cost nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from shakti_jax.ops.masks import MaskSpec


@dataclasses.dataclass(frozen=True, eq=False)
class TilePlan:
    """Non-empty tiles of a [q_len, kv_len] mask cut into [block_q, block_k] tiles.

    kv_blocks_QP: for query tile i, the key tiles to visit (first kv_count_Q[i] entries).
    q_blocks_KP:  for key tile j, the query tiles that see it (first q_count_K[j] entries).
    Both have power-of-two shapes (Triton block shapes): rows past the last tile, and tiles that
    see nothing, have count 0; lists are padded with copies of their last index (or 0).
    """

    block_q: int
    block_k: int
    kv_blocks_QP: np.ndarray
    kv_count_Q: np.ndarray
    q_blocks_KP: np.ndarray
    q_count_K: np.ndarray

    @property
    def computed_tiles(self) -> int:
        return int(self.kv_count_Q.sum())


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _ragged_lists(visible_AB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = _pow2(visible_AB.shape[0])  # extra rows (count 0) keep the shapes powers of two
    count_A = np.zeros(rows, np.int32)
    count_A[:visible_AB.shape[0]] = visible_AB.sum(axis=1)
    width = _pow2(max(1, int(count_A.max())))
    lists_AP = np.zeros((rows, width), np.int32)
    for a, row in enumerate(visible_AB):
        idx = np.flatnonzero(row)
        if idx.size:
            lists_AP[a, :idx.size] = idx
            lists_AP[a, idx.size:] = idx[-1]
    return lists_AP, count_A


@functools.lru_cache(maxsize=256)
def tile_plan(mask: MaskSpec, q_len: int, kv_len: int, block_q: int, block_k: int,
              q_offset: int = 0) -> TilePlan:
    """The plan for queries at q_offset + [0, q_len) against keys at [0, kv_len)."""
    any_visible_QK = mask.block_map(q_len, kv_len, block_q, block_k, q_offset)
    kv_blocks, kv_count = _ragged_lists(any_visible_QK)
    q_blocks, q_count = _ragged_lists(any_visible_QK.T)
    return TilePlan(block_q, block_k, kv_blocks, kv_count, q_blocks, q_count)


def sparse_tiles_aligned(mask: MaskSpec, block_q: int, block_k: int, q_offset: int) -> bool:
    """Whether every tile lies inside one block of the mask's block-sparse layout, so that tile
    skipping alone applies the layout (kernels mask causal/window/segments per element)."""
    if mask.sparse is None:
        return True
    bs = mask.sparse.block_size
    return bs % block_q == 0 and bs % block_k == 0 and q_offset % block_q == 0
