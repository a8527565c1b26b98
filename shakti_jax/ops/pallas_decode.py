"""Decode attention as a Pallas GPU (Triton) kernel: a few query tokens against a KV cache.

Decode positions are traced values (per-row offsets, ring-buffer slot positions), so there is no
host-side tile plan; instead the [B, T, S] visibility (T is small) is built by XLA from the same
MaskSpec as training and handed to the kernel as bytes. One program handles one (batch row,
KV head): its G query heads x T tokens are the rows of one tile, so K/V are read once per KV head.
The backward pass, rarely needed for decode shapes, is the XLA reference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from shakti_jax.ops.pallas_flash import f32_dot, online_softmax_step, softmax_init, triton_params
from shakti_jax.ops.reference import reference_attention

MAX_ROWS = 128  # T * G rows per program; beyond this use the flash kernel or the reference
_MIN_ROWS = 16  # Triton's smallest matmul tile


def _decode_kernel(q_ref, k_ref, v_ref, ok_ref, o_ref, *, scale: float, block_k: int):
    q = q_ref[...]

    def visit(i, carry):
        k_slice = pl.ds(i * block_k, block_k)
        ok = ok_ref[:, k_slice] != 0
        s = jnp.where(ok, f32_dot(q, k_ref[k_slice, :], trans_b=True) * scale, -jnp.inf)
        return online_softmax_step(carry, s, v_ref[k_slice, :])

    acc, _, denom = lax.fori_loop(0, k_ref.shape[0] // block_k, visit, softmax_init(*q.shape))
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)


def _decode(q_BTNH, k_BSKH, v_BSKH, ok_BTS, scale, block_k, interpret):
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    rows = max(_MIN_ROWS, 1 << (T * G - 1).bit_length())
    Sp = -(-S // block_k) * block_k
    # rows ordered (t, g): row r is token r // G of query head kv_head * G + r % G
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    q_BKRH = jnp.pad(q_BKRH, ((0, 0), (0, 0), (0, rows - T * G), (0, 0)))
    ok_BRS = jnp.broadcast_to(ok_BTS[:, :, None, :], (B, T, G, S)).reshape(B, T * G, S)
    ok_BRS = jnp.pad(ok_BRS, ((0, 0), (0, rows - T * G), (0, Sp - S))).astype(jnp.int8)
    pad_k = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda b, h: (b, 0, h, 0))
    q_spec = pl.BlockSpec((None, None, rows, H), lambda b, h: (b, h, 0, 0))
    out_BKRH = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, block_k=block_k),
        grid=(B, K),
        in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None, rows, Sp), lambda b, h: (b, 0, 0))],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BKRH.shape, q_BTNH.dtype),
        compiler_params=triton_params(interpret), interpret=interpret, name="shakti_decode",
    )(q_BKRH, jnp.pad(k_BSKH, pad_k), jnp.pad(v_BSKH, pad_k), ok_BRS)
    out = out_BKRH[:, :, :T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, N, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _decode_vjp(q, k, v, ok, scale, block_k, interpret):
    return _decode(q, k, v, ok, scale, block_k, interpret)


def _decode_fwd(q, k, v, ok, scale, block_k, interpret):
    return _decode(q, k, v, ok, scale, block_k, interpret), (q, k, v, ok)


def _decode_bwd(scale, block_k, interpret, residuals, do):
    q, k, v, ok = residuals
    _, pullback = jax.vjp(lambda q, k, v: reference_attention(q, k, v, ok, scale=scale), q, k, v)
    return (*pullback(do), None)


_decode_vjp.defvjp(_decode_fwd, _decode_bwd)


def decode_block(cache_len: int, head_dim: int) -> int:
    """Key tile: the widest of 64/32/16 (32/16 for head_dim > 128) that divides the cache, so the
    cache is not copied to pad it; the widest otherwise."""
    widths = (32, 16) if head_dim > 128 else (64, 32, 16)
    return next((w for w in widths if cache_len % w == 0), widths[0])


def decode_attention(q_BTNH, k_BSKH, v_BSKH, ok_BTS, *, scale: float | None = None,
                     block_k: int | None = None, interpret: bool = False):
    """Attention of T (T * G <= MAX_ROWS) queries over a cache, given visibility ok_BTS."""
    H = q_BTNH.shape[-1]
    scale = H ** -0.5 if scale is None else float(scale)
    block_k = block_k or decode_block(k_BSKH.shape[1], H)
    return _decode_vjp(q_BTNH, k_BSKH, v_BSKH, ok_BTS, scale, block_k, interpret)
