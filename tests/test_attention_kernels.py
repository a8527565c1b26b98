"""Pallas kernels (interpret mode) and the splash adapter against the XLA reference.

Each case draws fresh random inputs, shapes and masks from its seed. Error measure: the largest
absolute difference over the largest reference magnitude, per output and per gradient. Bounds:
1e-5 for float32 and 2e-2 for bfloat16 (both sides see the same bf16 inputs; the reference keeps
f32 logits and softmax, the kernels f32 statistics, so what differs is the order of f32 sums and
where probabilities are rounded to bf16 before the value matmul). A transposed tile, a wrong KV
head or a missed block puts errors at O(1).
"""

import dataclasses
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.config import get_config
from shakti_jax.generate import generate
from shakti_jax.model import ModelDef
from shakti_jax.ops.attention import attention
from shakti_jax.ops.masks import BlockSparse, MaskSpec
from shakti_jax.ops.pallas_flash import flash_attention
from shakti_jax.ops.reference import dense_mask, positions, reference_attention
from shakti_jax.ops.tiles import tile_plan

attention_module = importlib.import_module("shakti_jax.ops.attention")  # the module, not the function
BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values"
    scale = np.abs(want).max()
    assert scale > 0, "reference is all zeros: the case tests nothing"
    return float(np.abs(got - want).max() / scale)


def draw_mask(rng) -> MaskSpec:
    kind = rng.choice(["causal", "window", "sparse", "window_sparse", "bidirectional_window"])
    window = int(rng.integers(1, 80))
    sparse = BlockSparse(block_size=int(rng.choice([32, 64])), local_blocks=int(rng.integers(0, 2)),
                         global_blocks=int(rng.integers(0, 2)), random_blocks=int(rng.integers(0, 3)),
                         seed=int(rng.integers(1000)))
    return {"causal": MaskSpec(), "window": MaskSpec(window=window),
            "sparse": MaskSpec(sparse=sparse), "window_sparse": MaskSpec(window=window, sparse=sparse),
            "bidirectional_window": MaskSpec(causal=False, window=window)}[kind]


@dataclasses.dataclass
class Case:
    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: MaskSpec
    q_offset: int
    kv_len: jax.Array | None
    segment_ids: tuple | None

    def kwargs(self):
        return dict(mask=self.mask, q_offset=self.q_offset, kv_len=self.kv_len,
                    segment_ids=self.segment_ids)


def draw_case(seed: int, dtype) -> Case:
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 3))
    K = int(rng.choice([1, 2]))
    G = int(rng.choice([1, 2, 4, 8]))
    H = int(rng.choice([64, 128]))
    S = int(rng.integers(40, 200))  # rarely a multiple of the tile size
    T = S if rng.random() < 0.6 else int(rng.integers(1, S + 1))
    q_offset = S - T  # chunked prefill: the queries are the last T positions
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, K * G, H), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, H), jnp.float32).astype(dtype)
    kv_len = jnp.asarray(rng.integers(S // 2, S + 1, size=B)) if rng.random() < 0.4 else None
    segment_ids = None
    if rng.random() < 0.4:
        k_seg = np.sort(rng.integers(0, 3, size=(B, S)), axis=1)
        q_seg = k_seg[:, S - T:].copy()
        q_seg[:, -1] = 7  # a query whose segment has no keys: its row must be zeros
        segment_ids = (jnp.asarray(q_seg), jnp.asarray(k_seg))
    return Case(q, k, v, draw_mask(rng), q_offset, kv_len, segment_ids)


def loss_and_grads(fn, case: Case):
    cot = jax.random.normal(jax.random.key(99), case.q.shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(case.q, case.k, case.v)


def check_against_reference(case: Case, impl: str, dtype):
    out = attention(case.q, case.k, case.v, impl=impl, **case.kwargs())
    ref = attention(case.q, case.k, case.v, impl="xla", **case.kwargs())
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) < BOUND[dtype]
    _, grads = loss_and_grads(lambda q, k, v: attention(q, k, v, impl=impl, **case.kwargs()), case)
    _, ref_grads = loss_and_grads(lambda q, k, v: attention(q, k, v, impl="xla", **case.kwargs()), case)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < BOUND[dtype], f"d{name}"
    return out


@pytest.mark.parametrize("seed", range(12))
def test_pallas_matches_reference_f32(seed):
    check_against_reference(draw_case(seed, jnp.float32), "pallas", jnp.float32)


@pytest.mark.parametrize("seed", range(100, 104))
def test_pallas_matches_reference_bf16(seed):
    check_against_reference(draw_case(seed, jnp.bfloat16), "pallas", jnp.bfloat16)


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16)])
def test_rectangular_tiles_and_every_gqa_ratio(block_q, block_k):
    """Direct kernel call with small tiles (many of them) for GQA ratios 1/2/4/8."""
    mask = MaskSpec(window=21, sparse=BlockSparse(block_size=32, local_blocks=1, global_blocks=1,
                                                  random_blocks=1, seed=3))
    for G in (1, 2, 4, 8):
        keys = jax.random.split(jax.random.key(G), 3)
        q = jax.random.normal(keys[0], (1, 75, 2 * G, 64))
        k = jax.random.normal(keys[1], (1, 75, 2, 64))
        v = jax.random.normal(keys[2], (1, 75, 2, 64))
        ok = dense_mask(mask, positions(1, 75), positions(1, 75))

        def kernel(q, k, v):
            return flash_attention(q, k, v, mask=mask, q_offset=0, k_valid_BS=None,
                                   block_q=block_q, block_k=block_k, interpret=True)

        def kernel_lse(q, k, v):
            return flash_attention(q, k, v, mask=mask, q_offset=0, k_valid_BS=None, block_q=block_q,
                                   block_k=block_k, interpret=True, return_lse=True)[1]

        out, lse = flash_attention(q, k, v, mask=mask, q_offset=0, k_valid_BS=None, block_q=block_q,
                                   block_k=block_k, interpret=True, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, ok, return_lse=True)
        assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
        case = Case(q, k, v, mask, 0, None, None)
        _, grads = loss_and_grads(kernel, case)
        _, ref_grads = loss_and_grads(lambda q, k, v: reference_attention(q, k, v, ok), case)
        for name, g, r in zip("qkv", grads, ref_grads):
            assert rel_err(g, r) < 1e-5, f"G={G} d{name}"
    lse_grad = jax.grad(lambda q: kernel_lse(q, k, v).sum())(q)
    ref_lse_grad = jax.grad(lambda q: reference_attention(q, k, v, ok, return_lse=True)[1].sum())(q)
    assert rel_err(lse_grad, ref_lse_grad) < 1e-5


def test_tile_plan_skips_empty_tiles_and_lists_every_visible_one():
    mask = MaskSpec(window=64)
    plan = tile_plan(mask, 900, 900, 64, 64)  # 15 tiles a side, padded to 16 for Triton
    any_visible = mask.block_map(900, 900, 64, 64)
    assert plan.computed_tiles == any_visible.sum() == 15 + 14  # diagonal + one tile back
    assert plan.kv_blocks_QP.shape[0] == plan.q_blocks_KP.shape[0] == 16
    assert plan.kv_count_Q[15] == plan.q_count_K[15] == 0
    for i in range(15):
        n = plan.kv_count_Q[i]
        assert sorted(plan.kv_blocks_QP[i, :n]) == list(np.flatnonzero(any_visible[i]))
        n = plan.q_count_K[i]
        assert sorted(plan.q_blocks_KP[i, :n]) == list(np.flatnonzero(any_visible[:, i]))


def test_empty_rows_are_zero_with_finite_gradients():
    q = jax.random.normal(jax.random.key(0), (2, 40, 4, 64))
    k = jax.random.normal(jax.random.key(1), (2, 40, 2, 64))
    kv_len = jnp.array([0, 40])  # row 0 has no keys at all
    out = attention(q, k, k, mask=MaskSpec(causal=False), kv_len=kv_len, impl="pallas")
    assert np.all(np.asarray(out[0]) == 0) and np.abs(np.asarray(out[1])).max() > 0
    grad = jax.grad(lambda q, k: attention(q, k, k, mask=MaskSpec(causal=False), kv_len=kv_len,
                                           impl="pallas").sum(), argnums=(0, 1))(q, k)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad)
    assert np.all(np.asarray(grad[0][0]) == 0)


# ---- decode: few queries, traced offsets, ring-buffer key positions ----

@pytest.mark.parametrize("seed", range(4))
def test_decode_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    B, S, K, G, H = 3, int(rng.integers(20, 130)), 2, int(rng.choice([1, 4, 8])), 64
    T = int(rng.integers(1, 4))
    mask = draw_mask(rng)
    k_pos = np.stack([rng.permutation(np.arange(-5, S - 5)) for _ in range(B)])  # ring order
    q_offset = jnp.asarray(S - 6 - rng.integers(0, 4, size=B))  # at or just before the newest key
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, K * G, H))
    k = jax.random.normal(keys[1], (B, S, K, H))
    v = jax.random.normal(keys[2], (B, S, K, H))
    kwargs = dict(mask=mask, q_offset=q_offset, k_positions=jnp.asarray(k_pos))
    out = attention(q, k, v, impl="pallas", **kwargs)
    ref = attention(q, k, v, impl="xla", **kwargs)
    assert rel_err(out, ref) < 1e-5
    grad = jax.grad(lambda q: attention(q, k, v, impl="pallas", **kwargs).sum())(q)
    ref_grad = jax.grad(lambda q: attention(q, k, v, impl="xla", **kwargs).sum())(q)
    assert rel_err(grad, ref_grad) < 1e-5


# ---- dispatch ----

def test_forced_impl_fails_clearly_on_what_it_cannot_run():
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 80))  # head_dim 80
    with pytest.raises(ValueError, match=r"impl='pallas' cannot run this call: head_dim 80"):
        attention(q, q, q, mask=MaskSpec(), impl="pallas")
    with pytest.raises(ValueError, match="is not one of"):
        attention(q, q, q, mask=MaskSpec(), impl="flash")


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_backend_default", lambda: "pallas")
    monkeypatch.setattr(attention_module, "_WARNED", set())
    q = jax.random.normal(jax.random.key(0), (1, 8, 2, 80))
    with pytest.warns(UserWarning, match="uses the XLA reference instead of 'pallas': head_dim 80"):
        out = attention(q, q, q, mask=MaskSpec(), impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, q, q, mask=MaskSpec(), impl="auto")  # second time: silent
    np.testing.assert_array_equal(out, attention(q, q, q, mask=MaskSpec(), impl="xla"))


# ---- splash (TPU kernel, interpret mode) ----

@pytest.mark.parametrize("seed", range(3))
def test_splash_adapter_matches_reference(seed):
    case = draw_case(200 + seed, jnp.float32)
    check_against_reference(case, "splash", jnp.float32)


# ---- the model uses the dispatch everywhere: training forward/backward, prefill, decode ----

@pytest.mark.slow
def test_model_on_pallas_kernels_matches_the_reference_model():
    """Block-sparse rows unpacked, window and global layers also packed (segment ids): a
    packed block-sparse layout needs per-document positions, which the kernels refuse."""
    tokens = jax.random.randint(jax.random.key(1), (2, 70), 0, 512)
    segments = jnp.concatenate([jnp.zeros((2, 30), jnp.int32), jnp.ones((2, 40), jnp.int32)], axis=1)
    positions_BT = jnp.concatenate([jnp.arange(30), jnp.arange(40)])[None].repeat(2, 0)
    for name, packed in (("tiny_sparse", False), ("tiny", True)):
        cfg = get_config(name)  # tiny_sparse: window 16, block-sparse (16-token blocks), global
        defs = {impl: ModelDef.from_config(cfg.replace(attention_impl=impl)) for impl in ("xla", "pallas")}
        params = defs["xla"].init(0)
        extra = (positions_BT, segments) if packed else ()

        def loss(p, model_def):
            return jnp.mean(model_def.apply(p, tokens, *extra) ** 2)

        values = {impl: jax.value_and_grad(loss)(params, d) for impl, d in defs.items()}
        assert abs(float(values["pallas"][0]) - float(values["xla"][0])) <= 1e-5 * float(values["xla"][0])
        ref_grads = jax.tree.leaves(values["xla"][1])
        for got, want in zip(jax.tree.leaves(values["pallas"][1]), ref_grads, strict=True):
            assert rel_err(got, want) < 1e-4
        prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(1, 40)), [3]]
        assert (generate(defs["pallas"], params, prompts, max_new_tokens=40).tokens
                == generate(defs["xla"], params, prompts, max_new_tokens=40).tokens)
    forced = ModelDef.from_config(get_config("tiny_sparse", attention_impl="pallas"))
    with pytest.raises(ValueError, match="packed documents"):
        forced.apply(forced.init(0), tokens, positions_BT, segments)


def test_splash_kernel_is_reused_across_jitted_functions():
    """The cached splash kernel is built outside any trace: a second jit reuses it safely."""
    mask = MaskSpec(window=16)
    k = jax.random.normal(jax.random.key(1), (1, 40, 2, 64))
    for scale in (1.0, 0.5):  # two different jitted functions, one cache entry
        q = scale * jax.random.normal(jax.random.key(0), (1, 40, 4, 64))
        got = jax.jit(lambda q: jax.grad(lambda q: attention(q, k, k, mask=mask, impl="splash").sum())(q))(q)
        want = jax.grad(lambda q: attention(q, k, k, mask=mask, impl="xla").sum())(q)
        assert rel_err(got, want) < 1e-5


# ---- lowering for GPU and TPU without either: jax.export runs the Pallas lowering ----

LOWERING_CASES = [
    (jnp.bfloat16, 128, MaskSpec(window=256)),
    (jnp.bfloat16, 64, MaskSpec(sparse=BlockSparse(block_size=128, random_blocks=2))),
    (jnp.float32, 64, MaskSpec(causal=False, window=100)),
]
LOWERING_IDS = ["bf16-window", "bf16-sparse", "f32-bidirectional"]


def export_for(platform: str, monkeypatch, fn, *avals):
    """jax.export of fn for `platform`, with the dispatch believing it runs there."""
    monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu"}.get(platform, platform))
    kernel_call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    checks = [jax.export.DisabledSafetyCheck.custom_call(kernel_call)]
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*avals)
    return exported.mlir_module()


def train_step_avals(dtype, head_dim, B=2, T=1000, N=8, K=2):
    kv = jax.ShapeDtypeStruct((B, T, K, head_dim), dtype)
    return (jax.ShapeDtypeStruct((B, T, N, head_dim), dtype), kv, kv,
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))


def attention_grads(impl: str, mask: MaskSpec):
    def grads(q, k, v, seg, kv_len):
        def loss(q, k, v):
            out = attention(q, k, v, mask=mask, segment_ids=seg, kv_len=kv_len, impl=impl)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return grads


@pytest.mark.parametrize("dtype,head_dim,mask", LOWERING_CASES, ids=LOWERING_IDS)
def test_kernels_lower_to_triton_for_cuda(dtype, head_dim, mask, monkeypatch):
    """Training (forward + dq + dk/dv, with segments and kv_len) and decode kernels pass Pallas's
    Triton lowering for CUDA (an unsupported op or shape raises here). Not a GPU run: Triton's
    PTX compilation is not reached."""
    text = export_for("cuda", monkeypatch, attention_grads("pallas", mask),
                      *train_step_avals(dtype, head_dim))
    for kernel in ("shakti_flash_forward", "shakti_flash_dq", "shakti_flash_dkdv"):
        assert kernel in text, kernel
    q, k, v, _, _ = train_step_avals(dtype, head_dim)
    decode_q = jax.ShapeDtypeStruct((2, 1, 8, head_dim), dtype)
    text = export_for("cuda", monkeypatch,
                      lambda q, k, v, offset, k_pos: attention(q, k, v, mask=mask, q_offset=offset,
                                                               k_positions=k_pos, impl="pallas"),
                      decode_q, k, v, jax.ShapeDtypeStruct((2,), jnp.int32),
                      jax.ShapeDtypeStruct((2, 1000), jnp.int32))
    assert "shakti_decode" in text


@pytest.mark.parametrize("dtype,head_dim,mask", LOWERING_CASES, ids=LOWERING_IDS)
def test_splash_adapter_lowers_for_tpu(dtype, head_dim, mask, monkeypatch):
    text = export_for("tpu", monkeypatch, attention_grads("splash", mask),
                      *train_step_avals(dtype, head_dim))
    assert text.count("tpu_custom_call") >= 3  # forward, dq, dk/dv


def test_direct_kernel_calls_refuse_tiles_that_would_drop_the_layout():
    q = jax.random.normal(jax.random.key(0), (1, 64, 2, 64))
    sparse = MaskSpec(causal=False, sparse=BlockSparse(block_size=32, local_blocks=0, global_blocks=0,
                                                       random_blocks=0))
    with pytest.raises(ValueError, match="straddle blocks of the block-sparse layout"):
        flash_attention(q, q, q, mask=sparse, q_offset=0, k_valid_BS=None, block_q=64, block_k=64,
                        interpret=True)
    with pytest.raises(ValueError, match="block_q=24: tiles must be powers of two >= 16"):
        flash_attention(q, q, q, mask=MaskSpec(), q_offset=0, k_valid_BS=None, block_q=24,
                        interpret=True)


def test_block_map_in_bands_equals_one_dense_evaluation():
    mask = MaskSpec(window=300, sparse=BlockSparse(block_size=64, random_blocks=2, seed=5))
    any_visible = mask.block_map(4000, 4100, 64, 64, q_offset=100)  # several bands
    q_pos, k_pos = 100 + np.arange(63 * 64), np.arange(65 * 64)
    dense = mask.allowed(q_pos, np.where(k_pos < 4100, k_pos, -1)) & (np.arange(63 * 64) < 4000)[:, None]
    tiles = dense.reshape(63, 64, 65, 64)
    np.testing.assert_array_equal(any_visible, tiles.any(axis=(1, 3)))
