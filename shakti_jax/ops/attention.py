"""The one attention entry point. Every implementation takes the same arguments.

Implementations:
  xla     the reference (`reference.py`): dense logits, any mask, any backend.
  pallas  Pallas GPU kernels: tiled flash attention over the mask's non-empty tiles (training,
          prefill: static query offset) and a decode kernel (few queries, traced positions).
  splash  JAX's TPU splash attention with the mask spec mapped onto its mask classes.
  auto    pallas on GPU, splash on TPU, xla elsewhere.

A call an implementation cannot express falls back to xla with a one-time warning under "auto",
and raises ValueError naming the reason when that implementation was asked for by name. On CPU,
"pallas" and "splash" run in Pallas interpret mode (that is how the tests check them).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.config import ATTENTION_IMPLS as IMPLEMENTATIONS
from shakti_jax.ops import pallas_decode, pallas_flash, splash, tiles
from shakti_jax.ops.masks import MaskSpec
from shakti_jax.ops.reference import dense_mask, positions, reference_attention



@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One call's arguments, normalised; what implementations and their checks receive."""

    q_BTNH: jax.Array
    k_BSKH: jax.Array
    v_BSKH: jax.Array
    mask: MaskSpec
    segment_ids: tuple[jax.Array, jax.Array] | None
    q_offset: int | jax.Array
    kv_len: jax.Array | None
    k_positions: jax.Array | None
    doc_positions: jax.Array | None
    scale: float | None

    @property
    def static_offset(self) -> int | None:
        """q_offset as a Python int when it is known at trace time, else None."""
        if isinstance(self.q_offset, (int, np.integer)):
            return int(self.q_offset)
        return None

    @property
    def k_valid_BS(self) -> jax.Array | None:
        if self.kv_len is None:
            return None
        S = self.k_BSKH.shape[1]
        return jnp.arange(S)[None, :] < jnp.asarray(self.kv_len).reshape(-1, 1)

    def visibility_BTS(self) -> jax.Array:
        """The dense [B, T, S] mask: what the reference computes, and what decode kernels read."""
        B, T = self.q_BTNH.shape[:2]
        S = self.k_BSKH.shape[1]
        if self.doc_positions is not None:
            q_pos_BT = k_pos_BS = jnp.asarray(self.doc_positions, jnp.int32)
        else:
            q_pos_BT = positions(B, T, self.q_offset)
            k_pos_BS = (positions(B, S) if self.k_positions is None
                        else jnp.asarray(self.k_positions, jnp.int32))
        if self.kv_len is not None:
            k_pos_BS = jnp.where(self.k_valid_BS, k_pos_BS, -1)
        return dense_mask(self.mask, q_pos_BT, k_pos_BS, self.segment_ids)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, mask: MaskSpec,
              segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
              q_offset: int | jax.Array = 0, kv_len: jax.Array | None = None,
              k_positions: jax.Array | None = None, doc_positions: jax.Array | None = None,
              impl: str = "auto", scale: float | None = None) -> jax.Array:
    """Attention of queries [B, T, N, H] over grouped keys/values [B, S, K, H] (N % K == 0).

    mask:        the MaskSpec, a pure function of absolute positions.
    segment_ids: [B, T] for packed rows (needs T == S), or (q_seg [B, T], k_seg [B, S]);
                 queries see only keys of their own segment.
    q_offset:    absolute position of the first query (int, or [B] for ragged decode).
    kv_len:      [B] number of valid keys; key slots at or beyond it are empty.
    k_positions: [B, S] absolute key positions (ring-buffer caches); < 0 marks empty slots.
    doc_positions: [B, T] positions within each packed document (needs segment_ids [B, T]):
                 the mask is evaluated on them, so a packed document sees exactly what it
                 sees alone. Causal and window rules depend only on in-document distances,
                 which row positions share, so kernels use row positions for them; a
                 block-sparse layout needs the document positions themselves.
    impl:        one of IMPLEMENTATIONS (see the module docstring).
    Rows with no visible key return zeros.
    """
    _check_shapes(q_BTNH, k_BSKH, v_BSKH)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLEMENTATIONS}")
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if segment_ids is not None and not isinstance(segment_ids, tuple):
        if T != S:
            raise ValueError(f"segment_ids of shape [B, T] need T == S, got T={T}, S={S}")
        segment_ids = (segment_ids, segment_ids)
    if doc_positions is not None and (segment_ids is None or T != S or k_positions is not None):
        raise ValueError("doc_positions go with [B, T] segment_ids of packed rows (T == S)")
    if doc_positions is not None and mask.sparse is None:
        doc_positions = None  # same visibility from row positions within a segment (see above)
    call = AttentionCall(q_BTNH, k_BSKH, v_BSKH, mask, segment_ids, q_offset, kv_len, k_positions,
                         doc_positions, scale)
    name = _backend_default() if impl == "auto" else impl
    if name != "xla":
        reason = _IMPLS[name].unsupported(call)
        if reason is not None:
            if impl != "auto":
                raise ValueError(f"attention impl={impl!r} cannot run this call: {reason}")
            _warn_once(name, reason)
            name = "xla"
    return _IMPLS[name].run(call)


@dataclasses.dataclass(frozen=True)
class _Impl:
    unsupported: Callable[[AttentionCall], str | None]  # None, or why this call is not supported
    run: Callable[[AttentionCall], jax.Array]


def _xla(call: AttentionCall) -> jax.Array:
    return reference_attention(call.q_BTNH, call.k_BSKH, call.v_BSKH, call.visibility_BTS(),
                               scale=call.scale)


def _flash_fits(call: AttentionCall) -> bool:
    """Whether the tiled flash kernel can run `call`: static positions, tiles inside layout blocks."""
    if call.static_offset is None or call.k_positions is not None:
        return False
    block_q, block_k = pallas_flash.default_blocks(call.mask, call.q_BTNH.shape[-1])
    return tiles.sparse_tiles_aligned(call.mask, block_q, block_k, call.static_offset)


_PACKED_SPARSE = ("a block-sparse layout over packed documents (doc_positions): tiles are planned "
                  "from row positions")


def _pallas_unsupported(call: AttentionCall) -> str | None:
    if call.doc_positions is not None:
        return _PACKED_SPARSE
    if jax.default_backend() == "tpu":
        return "the Pallas kernels lower through Triton (GPU); use impl='splash' on TPU"
    dtype, head_dim = jnp.dtype(call.q_BTNH.dtype), call.q_BTNH.shape[-1]
    if dtype not in pallas_flash.SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: float32, bfloat16, float16)"
    if head_dim not in pallas_flash.SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (supported: {pallas_flash.SUPPORTED_HEAD_DIMS})"
    if _flash_fits(call):
        return None
    rows = call.q_BTNH.shape[1] * call.q_BTNH.shape[2] // call.k_BSKH.shape[2]
    if rows <= pallas_decode.MAX_ROWS:
        return None
    if call.static_offset is None or call.k_positions is not None:
        return (f"traced query offsets or key positions with {rows} query rows per KV head "
                f"(decode kernel takes <= {pallas_decode.MAX_ROWS})")
    block_q, block_k = pallas_flash.default_blocks(call.mask, head_dim)
    return (f"block-sparse block_size {call.mask.sparse.block_size} with query offset "
            f"{call.static_offset} does not align with {block_q}x{block_k} kernel tiles")


def _pallas(call: AttentionCall) -> jax.Array:
    interpret = jax.default_backend() == "cpu"
    if _flash_fits(call):
        return pallas_flash.flash_attention(
            call.q_BTNH, call.k_BSKH, call.v_BSKH, mask=call.mask, q_offset=call.static_offset,
            k_valid_BS=call.k_valid_BS, segment_ids=call.segment_ids, scale=call.scale,
            interpret=interpret)
    return pallas_decode.decode_attention(call.q_BTNH, call.k_BSKH, call.v_BSKH,
                                          call.visibility_BTS(), scale=call.scale, interpret=interpret)


_IMPLS: dict[str, _Impl] = {
    "xla": _Impl(lambda call: None, _xla),
    "pallas": _Impl(_pallas_unsupported, _pallas),
    "splash": _Impl(splash.unsupported, splash.splash_attention),
}
_WARNED: set[tuple[str, str]] = set()


def _backend_default() -> str:
    return {"gpu": "pallas", "tpu": "splash"}.get(jax.default_backend(), "xla")


def _warn_once(name: str, reason: str) -> None:
    if (name, reason) not in _WARNED:
        _WARNED.add((name, reason))
        warnings.warn(f"attention impl='auto' uses the XLA reference instead of {name!r}: {reason}",
                      stacklevel=3)


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants q [B,T,N,H], k/v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of KV heads {k.shape[2]}")
