"""Block-sparse / sliding-window flash attention as Pallas GPU (Triton) kernels.

Forward, dq and dk/dv are three kernels wired with `jax.custom_vjp`. Each visits only the tiles
its host-side `TilePlan` lists (so window and block-sparse layouts cost what they compute) and
masks inside a tile per element: causal, window, empty key slots (kv_len, padding) and segment
ids. The block-sparse layout itself is applied by tile skipping, which is exact because the
caller only uses this path when every tile lies inside one layout block (`sparse_tiles_aligned`).

GQA: query head n reads KV head n // G through the BlockSpec index map (K/V never repeated);
the dk/dv kernel runs per KV head and sums its G query heads in registers. Softmax statistics
are f32; rows with no visible key give zeros and lse = -inf, never NaN. On CPU the kernels run
in Pallas interpret mode (tests); on GPU they lower through Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from shakti_jax.ops.masks import MaskSpec
from shakti_jax.ops.tiles import TilePlan, sparse_tiles_aligned, tile_plan

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: Triton block shapes
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class FlashStatic:
    """Everything static about one call: the kernels are specialised on it."""

    mask: MaskSpec           # causal / window only; the block-sparse layout is in `plan`
    plan: TilePlan
    q_offset: int
    scale: float
    has_segments: bool
    interpret: bool


def triton_params(interpret: bool):
    """Triton compiler settings for the GPU (untuned defaults), None in interpret mode."""
    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2)


def f32_dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed) accumulated in f32; f32 inputs at full precision."""
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def online_softmax_step(carry, s, v):
    """Fold one tile of masked logits s [rows, bk] (-inf = masked) and values v [bk, H] into the
    running (acc [rows, H], row_max [rows], denom [rows]); all-masked rows stay at zero."""
    acc, row_max, denom = carry
    new_max = jnp.maximum(row_max, s.max(axis=1))
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.exp(s - safe_max[:, None])
    rescale = jnp.exp(row_max - safe_max)
    return (acc * rescale[:, None] + f32_dot(p.astype(v.dtype), v), new_max,
            denom * rescale + p.sum(axis=1))


def softmax_init(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _tile_mask(static: FlashStatic, q_tile, k_tile, k_pos_ref, q_seg, k_seg_ref):
    """[block_q, block_k] visibility inside the tile (q_tile, k_tile)."""
    bq, bk = static.plan.block_q, static.plan.block_k
    q_pos = static.q_offset + q_tile * bq + lax.iota(jnp.int32, bq)
    k_slice = pl.ds(k_tile * bk, bk)
    ok = static.mask.allowed(q_pos, k_pos_ref[k_slice])
    if static.has_segments:
        ok = ok & (q_seg[:, None] == k_seg_ref[k_slice][None, :])
    return ok


def _forward_kernel(kv_blocks_ref, kv_count_ref, q_ref, k_ref, v_ref, k_pos_ref, q_seg_ref,
                    k_seg_ref, o_ref, lse_ref, *, static: FlashStatic):
    q_tile = pl.program_id(2)
    bk = static.plan.block_k
    q = q_ref[...]
    q_seg = q_seg_ref[...] if static.has_segments else None

    def visit(i, carry):
        k_tile = kv_blocks_ref[q_tile, i]
        k_slice = pl.ds(k_tile * bk, bk)
        ok = _tile_mask(static, q_tile, k_tile, k_pos_ref, q_seg, k_seg_ref)
        s = jnp.where(ok, f32_dot(q, k_ref[k_slice, :], trans_b=True) * static.scale, -jnp.inf)
        return online_softmax_step(carry, s, v_ref[k_slice, :])

    acc, row_max, denom = lax.fori_loop(0, kv_count_ref[q_tile], visit, softmax_init(*q.shape))
    seen = denom > 0
    o_ref[...] = (acc / jnp.where(seen, denom, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)


def _dq_kernel(kv_blocks_ref, kv_count_ref, q_ref, k_ref, v_ref, k_pos_ref, q_seg_ref, k_seg_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, static: FlashStatic):
    q_tile = pl.program_id(2)
    bk = static.plan.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    safe_lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    q_seg = q_seg_ref[...] if static.has_segments else None

    def visit(i, dq):
        k_tile = kv_blocks_ref[q_tile, i]
        k_slice = pl.ds(k_tile * bk, bk)
        k, v = k_ref[k_slice, :], v_ref[k_slice, :]
        ok = _tile_mask(static, q_tile, k_tile, k_pos_ref, q_seg, k_seg_ref)
        p = jnp.where(ok, jnp.exp(f32_dot(q, k, trans_b=True) * static.scale - safe_lse[:, None]), 0.0)
        ds = p * (f32_dot(do, v, trans_b=True) - delta[:, None])
        return dq + f32_dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, kv_count_ref[q_tile], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_blocks_ref, q_count_ref, q_ref, k_ref, v_ref, k_pos_ref, q_seg_ref, k_seg_ref,
                 do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, static: FlashStatic, groups: int):
    k_tile = pl.program_id(2)
    bq = static.plan.block_q
    k, v = k_ref[...], v_ref[...]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):  # the query heads that share this KV head
        def visit(i, carry, g=g):
            dk, dv = carry
            q_tile = q_blocks_ref[k_tile, i]
            q_slice = pl.ds(q_tile * bq, bq)
            q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
            lse, delta = lse_ref[g, q_slice], delta_ref[g, q_slice]
            safe_lse = jnp.where(lse == -jnp.inf, 0.0, lse)
            q_seg = q_seg_ref[q_slice] if static.has_segments else None
            ok = _tile_mask(static, q_tile, k_tile, k_pos_ref, q_seg, k_seg_ref)
            p = jnp.where(ok, jnp.exp(f32_dot(q, k, trans_b=True) * static.scale - safe_lse[:, None]), 0.0)
            dv = dv + f32_dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (f32_dot(do, v, trans_b=True) - delta[:, None])
            return dk + f32_dot(ds.astype(q.dtype), q, trans_a=True), dv

        dk, dv = lax.fori_loop(0, q_count_ref[k_tile], visit, (dk, dv))
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _full(shape):
    """A BlockSpec handing the kernel the whole (small) array, e.g. a tile plan."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _forward(static: FlashStatic, q, k, v, k_pos, q_seg, k_seg):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G, bq, plan = N // K, static.plan.block_q, static.plan
    grid = (B, N, T // bq)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=grid,
        in_specs=[_full(plan.kv_blocks_QP.shape), _full(plan.kv_count_Q.shape), q_spec, kv_spec,
                  kv_spec, pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
                  pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
                  pl.BlockSpec((None, S), lambda b, n, i: (b, 0))],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=triton_params(static.interpret),
        interpret=static.interpret,
        name="shakti_flash_forward",
    )(jnp.asarray(plan.kv_blocks_QP), jnp.asarray(plan.kv_count_Q), q, k, v, k_pos, q_seg, k_seg)


def _backward(static: FlashStatic, residuals, do, dlse_BNT):
    q, k, v, k_pos, q_seg, k_seg, out, lse_BNT = residuals
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G, bq, bk, plan = N // K, static.plan.block_q, static.plan.block_k, static.plan
    # dL/ds = p * (dp - delta) with delta = rowsum(o * do) - dlse (lse's own cotangent)
    delta_BNT = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse_BNT
    params = triton_params(static.interpret)

    q_spec = pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda b, n, i: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid=(B, N, T // bq),
        in_specs=[_full(plan.kv_blocks_QP.shape), _full(plan.kv_count_Q.shape), q_spec, kv_spec,
                  kv_spec, pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
                  pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
                  pl.BlockSpec((None, S), lambda b, n, i: (b, 0)), q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=static.interpret, name="shakti_flash_dq",
    )(jnp.asarray(plan.kv_blocks_QP), jnp.asarray(plan.kv_count_Q), q, k, v, k_pos, q_seg, k_seg,
      do, lse_BNT, delta_BNT)

    grouped_spec = pl.BlockSpec((None, T, None, G, H), lambda b, h, j: (b, 0, h, 0, 0))
    grouped_rows = pl.BlockSpec((None, None, G, T), lambda b, h, j: (b, h, 0, 0))
    k_tile_spec = pl.BlockSpec((None, bk, None, H), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, static=static, groups=G),
        grid=(B, K, S // bk),
        in_specs=[_full(plan.q_blocks_KP.shape), _full(plan.q_count_K.shape), grouped_spec,
                  k_tile_spec, k_tile_spec, pl.BlockSpec((None, S), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, T), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, S), lambda b, h, j: (b, 0)), grouped_spec, grouped_rows,
                  grouped_rows],
        out_specs=[k_tile_spec, k_tile_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=static.interpret, name="shakti_flash_dkdv",
    )(jnp.asarray(plan.q_blocks_KP), jnp.asarray(plan.q_count_K), q.reshape(B, T, K, G, H), k, v,
      k_pos, q_seg, k_seg, do.reshape(B, T, K, G, H), lse_BNT.reshape(B, K, G, T),
      delta_BNT.reshape(B, K, G, T))
    return dq, dk, dv, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, k_pos, q_seg, k_seg):
    return _forward(static, q, k, v, k_pos, q_seg, k_seg)


def _flash_fwd(static, q, k, v, k_pos, q_seg, k_seg):
    out, lse = _forward(static, q, k, v, k_pos, q_seg, k_seg)
    return (out, lse), (q, k, v, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(static, residuals, cotangents):
    do, dlse = cotangents
    return _backward(static, residuals, do, dlse)


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_blocks(mask: MaskSpec, head_dim: int) -> tuple[int, int]:
    """Tile sizes: 64 x 64 (32 x 32 for head_dim 256), halved down to 16 while they do not divide
    a block-sparse layout block (`sparse_tiles_aligned` says whether that succeeded)."""
    block = 64 if head_dim <= 128 else 32
    if mask.sparse is not None:
        while block > 16 and mask.sparse.block_size % block:
            block //= 2
    return block, block


def flash_attention(q_BTNH, k_BSKH, v_BSKH, *, mask: MaskSpec, q_offset: int, k_valid_BS,
                    segment_ids=None, scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool = False, return_lse: bool = False):
    """Flash attention over the tiles `mask` leaves non-empty; see the module docstring.

    q_offset:    static absolute position of the first query (keys sit at positions 0..S-1).
    k_valid_BS:  bool [B, S], False for empty key slots (kv_len), or None.
    segment_ids: (q_seg [B, T], k_seg [B, S]) or None.
    Returns out [B, T, N, H] (and lse [B, N, T] when asked).
    """
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    default_q, default_k = default_blocks(mask, H)
    bq, bk = block_q or default_q, block_k or default_k
    for name, block in (("block_q", bq), ("block_k", bk)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block}: tiles must be powers of two >= 16 (Triton)")
    if not sparse_tiles_aligned(mask, bq, bk, q_offset):
        raise ValueError(f"tiles {bq}x{bk} at query offset {q_offset} straddle blocks of the "
                         f"block-sparse layout (block_size {mask.sparse.block_size})")
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    k_pos_BS = jnp.broadcast_to(jnp.arange(Sp, dtype=jnp.int32), (B, Sp))
    if k_valid_BS is not None:
        k_pos_BS = jnp.where(jnp.pad(k_valid_BS, ((0, 0), (0, Sp - S))), k_pos_BS, -1)
    k_pos_BS = jnp.where(jnp.arange(Sp) < S, k_pos_BS, -1)
    if segment_ids is None:
        q_seg_BT, k_seg_BS = jnp.zeros((B, Tp), jnp.int32), jnp.zeros((B, Sp), jnp.int32)
    else:
        q_seg_BT = jnp.pad(jnp.asarray(segment_ids[0], jnp.int32), ((0, 0), (0, Tp - T)))
        k_seg_BS = jnp.pad(jnp.asarray(segment_ids[1], jnp.int32), ((0, 0), (0, Sp - S)))
    static = FlashStatic(
        mask=dataclasses.replace(mask, sparse=None),
        plan=tile_plan(mask, T, S, bq, bk, q_offset),
        q_offset=q_offset, scale=H ** -0.5 if scale is None else float(scale),
        has_segments=segment_ids is not None, interpret=interpret)
    pad_q = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    pad_k = ((0, 0), (0, Sp - S), (0, 0), (0, 0))
    out, lse = _flash(static, jnp.pad(q_BTNH, pad_q), jnp.pad(k_BSKH, pad_k), jnp.pad(v_BSKH, pad_k),
                      k_pos_BS, q_seg_BT, k_seg_BS)
    out, lse = out[:, :T], lse[:, :, :T]
    return (out, lse) if return_lse else out
