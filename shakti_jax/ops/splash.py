"""TPU: the MaskSpec mapped onto JAX's splash attention (`jax.experimental.pallas.ops.tpu`).

Mapping: dense causal -> CausalMask, window -> LocalMask (causal: (W-1, 0), bidirectional:
(W-1, W-1)), no constraint -> FullMask, anything with a block-sparse layout -> NumpyMask of the
spec evaluated on the host; the query offset is the masks' `offset`. Segment ids, kv_len and the
padding to whole 128-blocks all become splash SegmentIds. GQA runs splash's MQA kernel once per
KV head (vmapped), so K/V are never repeated. Splash has no notion of an empty row, so rows
with no visible key are zeroed here from the spec's visibility (a fused XLA reduction, O(T * S)
compares). Splash takes no softmax scale, so q is pre-scaled in its own dtype: in bf16 that
rounds each logit by up to 2^-9 relative when head_dim is not a power of 4. Block-sparse
layouts go in as a dense host-side NumpyMask (T x S bytes). Needs static positions: decode with
traced offsets or ring-buffer keys is not expressible.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from shakti_jax.ops.masks import MaskSpec

BLOCK = 128  # splash's default block sizes; sequences are padded to a multiple
_PAD_SEGMENT = np.iinfo(np.int32).min  # key segment of padded / beyond-kv_len slots


def unsupported(call) -> str | None:
    """None when splash can run `call` (an AttentionCall), else the reason."""
    if call.doc_positions is not None:
        return "splash plans its mask from row positions, not packed documents' positions"
    if call.static_offset is None or call.k_positions is not None:
        return "splash needs static positions (no traced query offset or ring-buffer key positions)"
    return None


def _head_mask(mask: MaskSpec, q_len: int, kv_len: int, q_offset: int) -> sa.Mask:
    shape = (q_len, kv_len)
    if mask.sparse is not None:
        allowed = mask.allowed(q_offset + np.arange(q_len), np.arange(kv_len))
        return sa.NumpyMask(allowed)
    if mask.window is not None:
        return sa.LocalMask(shape, window_size=(mask.window - 1, 0 if mask.causal else mask.window - 1),
                            offset=q_offset)
    return sa.CausalMask(shape, offset=q_offset) if mask.causal else sa.FullMask(shape)


@functools.lru_cache(maxsize=64)
def _kernel(mask: MaskSpec, q_len: int, kv_len: int, q_offset: int, groups: int, interpret: bool):
    """The splash kernel for one mask and shape, cached: its block metadata is built on the host,
    and kept concrete (not traced) so that later traces can reuse it."""
    head = _head_mask(mask, q_len, kv_len, q_offset)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mqa_single_device(sa.MultiHeadMask([head] * groups),
                                                block_sizes=sa.BlockSizes.get_default(),
                                                interpret=interpret)


def splash_attention(call) -> jax.Array:
    """Run an AttentionCall (see `shakti_jax.ops.attention`) through splash attention."""
    q, k, v = call.q_BTNH, call.k_BSKH, call.v_BSKH
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    Tp, Sp = -(-T // BLOCK) * BLOCK, -(-S // BLOCK) * BLOCK
    if call.segment_ids is None:
        q_seg, k_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    else:
        q_seg, k_seg = (jnp.asarray(s, jnp.int32) for s in call.segment_ids)
    if call.kv_len is not None:
        k_seg = jnp.where(call.k_valid_BS, k_seg, _PAD_SEGMENT)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, Tp - T)))
    k_seg = jnp.pad(k_seg, ((0, 0), (0, Sp - S)), constant_values=_PAD_SEGMENT)

    scale = H ** -0.5 if call.scale is None else call.scale
    q_BKGTH = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(B, T, K, G, H)
    q_BKGTH = jnp.pad(q_BKGTH.transpose(0, 2, 3, 1, 4), ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
    k_BKSH = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    v_BKSH = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))

    kernel = _kernel(call.mask, Tp, Sp, call.static_offset, G, jax.default_backend() == "cpu")

    def one_kv_head(q_GTH, k_SH, v_SH, q_seg_T, k_seg_S):
        return kernel(q_GTH, k_SH, v_SH, segment_ids=sa.SegmentIds(q=q_seg_T, kv=k_seg_S))

    per_head = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None, None))
    out_BKGTH = jax.vmap(per_head)(q_BKGTH, k_BKSH, v_BKSH, q_seg, k_seg)
    out_BTNH = out_BKGTH[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    has_key_BT = call.visibility_BTS().any(axis=-1)
    return jnp.where(has_key_BT[:, :, None, None], out_BTNH, 0).astype(q.dtype)
