"""XLA reference attention: the semantics every other implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shakti_jax.ops.masks import MaskSpec


def positions(batch: int, length: int, offset=0) -> jax.Array:
    """Absolute positions [batch, length] = offset + arange(length); offset is int or [batch]."""
    offset = jnp.asarray(offset, jnp.int32)
    return jnp.broadcast_to(offset.reshape(-1, 1) + jnp.arange(length, dtype=jnp.int32), (batch, length))


def dense_mask(mask: MaskSpec, q_pos_BT, k_pos_BS, segment_ids=None) -> jax.Array:
    """Boolean [B, T, S] mask from positions and optional (q_seg_BT, k_seg_BS) segment ids."""
    ok_BTS = mask.allowed(q_pos_BT, k_pos_BS)
    if segment_ids is not None:
        q_seg_BT, k_seg_BS = segment_ids
        ok_BTS = ok_BTS & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :])
    return ok_BTS


def reference_attention(q_BTNH, k_BSKH, v_BSKH, ok_BTS, *, scale: float | None = None,
                        return_lse: bool = False):
    """Softmax attention with grouped K/V heads, never repeating K/V in memory.

    Query head n uses KV head n // (N // K). Logits and softmax are f32; rows whose mask
    is empty return zeros (and lse = -inf). Output has the dtype of q.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    ok_B11TS = ok_BTS[:, None, None]
    logits_BKGTS = jnp.where(ok_B11TS, logits_BKGTS, -jnp.inf)
    row_max = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p_BKGTS = jnp.where(ok_B11TS, jnp.exp(logits_BKGTS - row_max), 0.0)
    denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(denom > 0, denom, 1.0)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                           preferred_element_type=jnp.float32)
    out_BTNH = out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
    if not return_lse:
        return out_BTNH
    lse_BKGT = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return out_BTNH, lse_BKGT.reshape(B, N, T)
