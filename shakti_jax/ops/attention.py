"""The one attention entry point. Every implementation takes the same arguments."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from shakti_jax.ops.masks import MaskSpec
from shakti_jax.ops.reference import dense_mask, positions, reference_attention

IMPLEMENTATIONS = ("auto", "xla")


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, mask: MaskSpec,
              segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
              q_offset: int | jax.Array = 0, kv_len: jax.Array | None = None,
              k_positions: jax.Array | None = None, impl: str = "auto",
              scale: float | None = None) -> jax.Array:
    """Attention of queries [B, T, N, H] over grouped keys/values [B, S, K, H] (N % K == 0).

    mask:        the MaskSpec, a pure function of absolute positions.
    segment_ids: [B, T] for packed rows (needs T == S), or (q_seg [B, T], k_seg [B, S]);
                 queries see only keys of their own segment.
    q_offset:    absolute position of the first query (int, or [B] for ragged decode).
    kv_len:      [B] number of valid keys; key slots at or beyond it are empty.
    k_positions: [B, S] absolute key positions (ring-buffer caches); < 0 marks empty slots.
    impl:        "auto" picks the fastest implementation for the backend; "xla" is the reference.
    Rows with no visible key return zeros.
    """
    _check_shapes(q_BTNH, k_BSKH, v_BSKH)
    B, T = q_BTNH.shape[:2]
    S = k_BSKH.shape[1]
    q_pos_BT = positions(B, T, q_offset)
    k_pos_BS = positions(B, S) if k_positions is None else jnp.asarray(k_positions, jnp.int32)
    if kv_len is not None:
        in_range_BS = jnp.arange(S)[None, :] < jnp.asarray(kv_len).reshape(-1, 1)
        k_pos_BS = jnp.where(in_range_BS, k_pos_BS, -1)
    if segment_ids is not None and not isinstance(segment_ids, tuple):
        if T != S:
            raise ValueError(f"segment_ids of shape [B, T] need T == S, got T={T}, S={S}")
        segment_ids = (segment_ids, segment_ids)
    implementation = _resolve(impl)
    return implementation(q_BTNH, k_BSKH, v_BSKH, mask=mask, q_pos_BT=q_pos_BT,
                          k_pos_BS=k_pos_BS, segment_ids=segment_ids, scale=scale)


def _xla(q_BTNH, k_BSKH, v_BSKH, *, mask, q_pos_BT, k_pos_BS, segment_ids, scale):
    ok_BTS = dense_mask(mask, q_pos_BT, k_pos_BS, segment_ids)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, ok_BTS, scale=scale)


_REGISTRY: dict[str, Callable] = {"xla": _xla}


def _resolve(impl: str) -> Callable:
    if impl == "auto":
        return _REGISTRY["xla"]
    if impl not in _REGISTRY:
        raise ValueError(f"attention impl={impl!r} is not one of {sorted(_REGISTRY) + ['auto']}")
    return _REGISTRY[impl]


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants q [B,T,N,H], k/v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of KV heads {k.shape[2]}")
