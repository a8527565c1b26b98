"""Mask semantics against brute-force numpy loops, and the reference against a naive softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.ops.attention import attention
from shakti_jax.ops.masks import BlockSparse, MaskSpec


def brute_force(spec: MaskSpec, q_pos, k_pos, q_seg=None, k_seg=None):
    out = np.zeros((len(q_pos), len(k_pos)), bool)
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            ok = j >= 0
            if spec.causal:
                ok &= j <= i
            if spec.window is not None:
                ok &= (0 <= i - j < spec.window) if spec.causal else abs(i - j) < spec.window
            if spec.sparse is not None:
                s = spec.sparse
                qb, kb = i // s.block_size, max(j, 0) // s.block_size
                rand = set()
                if qb > 0:
                    rand = {int(r) for r in s.random_key_blocks(np.array(qb))}
                    assert all(0 <= r < qb for r in rand)
                ok &= (abs(qb - kb) <= s.local_blocks or kb < s.global_blocks
                       or qb < s.global_blocks or kb in rand)
            if q_seg is not None:
                ok &= q_seg[a] == k_seg[b]
            out[a, b] = ok
    return out


SPARSE = BlockSparse(block_size=4, local_blocks=1, global_blocks=1, random_blocks=2, seed=7)
SPECS = [
    MaskSpec(),
    MaskSpec(causal=False),
    MaskSpec(window=5),
    MaskSpec(causal=False, window=3),
    MaskSpec(sparse=SPARSE),
    MaskSpec(window=9, sparse=SPARSE),
    MaskSpec(sparse=BlockSparse(block_size=3, local_blocks=0, global_blocks=0, random_blocks=3)),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_allowed_matches_brute_force(spec, backend):
    q_pos, k_pos = np.arange(37), np.arange(37)
    xp = np if backend == "numpy" else jnp
    got = np.asarray(spec.allowed(xp.asarray(q_pos), xp.asarray(k_pos)))
    np.testing.assert_array_equal(got, brute_force(spec, q_pos, k_pos))


@pytest.mark.parametrize("spec", SPECS[2:], ids=str)
def test_offsets_and_scrambled_key_positions(spec):
    rng = np.random.default_rng(0)
    q_pos = 50 + np.arange(3)  # decode-like: a few queries at an offset
    k_pos = rng.permutation(np.arange(-4, 53))  # ring buffer order, negatives are empty slots
    got = np.asarray(spec.allowed(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    np.testing.assert_array_equal(got, brute_force(spec, q_pos, k_pos))


def test_random_blocks_depend_only_on_query_block():
    s = BlockSparse(random_blocks=3, seed=11)
    a = s.random_key_blocks(np.arange(100))
    np.testing.assert_array_equal(a[:40], s.random_key_blocks(np.arange(40)))
    np.testing.assert_array_equal(a, np.asarray(s.random_key_blocks(jnp.arange(100))))
    assert not np.array_equal(a, BlockSparse(random_blocks=3, seed=12).random_key_blocks(np.arange(100)))


def test_block_map_agrees_with_dense_mask():
    spec = MaskSpec(window=6, sparse=SPARSE)
    any_vis = spec.block_map(q_len=21, kv_len=30, block_q=4, block_k=8, q_offset=9)
    assert any_vis.shape == (6, 4)
    dense = brute_force(spec, 9 + np.arange(21), np.arange(30))
    for qi in range(any_vis.shape[0]):
        for ki in range(any_vis.shape[1]):
            tile = dense[qi * 4:(qi + 1) * 4, ki * 8:(ki + 1) * 8]
            assert any_vis[qi, ki] == tile.any()
    assert any_vis.any() and not any_vis.all()  # the layout skips some tiles


def naive_attention(q, k, v, ok):
    """Loop over heads in numpy, repeating K/V explicitly: an independent construction."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n // G].T / np.sqrt(H)
            for t in range(T):
                if ok[b, t].any():
                    w = np.exp(s[t][ok[b, t]] - s[t][ok[b, t]].max())
                    out[b, t, n] = (w / w.sum()) @ v[b, ok[b, t], n // G]
    return out


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_reference_attention_with_segments_and_offsets(groups):
    rng = np.random.default_rng(groups)
    B, T, K, H = 2, 13, 2, 8
    q = rng.standard_normal((B, T, K * groups, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    seg = np.array([[1] * 5 + [2] * 8, [1] * 13])
    seg[0, 0] = 3  # a lone token of its own segment
    spec = MaskSpec(window=4)
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=spec,
                    segment_ids=jnp.asarray(seg), impl="xla")
    ok = np.stack([brute_force(spec, np.arange(T), np.arange(T), seg[b], seg[b]) for b in range(B)])
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, ok), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_and_kv_len_masks_keys():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 6, 1, 8)), jnp.float32)
    kv_len = jnp.array([0, 3])
    out = attention(q, k, k, mask=MaskSpec(causal=False), kv_len=kv_len)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out)))
    ok = np.zeros((2, 4, 6), bool)
    ok[1, :, :3] = True
    np.testing.assert_allclose(np.asarray(out), naive_attention(*(np.asarray(x) for x in (q, k, k)), ok),
                               atol=1e-5)
    grad = jax.grad(lambda q: attention(q, k, k, mask=MaskSpec(causal=False), kv_len=kv_len).sum())(q)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_bad_shapes_fail_clearly():
    q = jnp.zeros((1, 4, 3, 8))
    k = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        attention(q, k, k, mask=MaskSpec())
    with pytest.raises(ValueError, match="impl"):
        attention(q[:, :, :2], k, k, mask=MaskSpec(), impl="magic")
