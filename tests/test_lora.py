"""LoRA: `merge` against numpy and x-path references, validation, shardings, and the adapter
GGUF in llama.cpp against the merged model's F32 export and the JAX logits.

Models are tiny with 5 layers over a (window, global) pattern: a stacked group of two
repeats plus a remainder group, so layer-index bugs in stacking or export show up.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.config import ConfigError, get_config
from shakti_jax.export import ExportError, canonicalize, write_gguf
from shakti_jax.export.lora_gguf import write_lora_gguf
from shakti_jax.lora import (TARGETS, LoraConfig, adapter_axes, adapter_shardings, count_params,
                             init_adapters, merge, target_paths)
from shakti_jax.model.layout import layer_locations
from shakti_jax.model.model_def import ModelDef
from shakti_jax.sharding import make_mesh

CFG = get_config("tiny").replace(num_layers=5)  # groups: ((window, global), 2), ((window,), 1)
CONFIGS = {"mixed": CFG, "global": CFG.replace(attention_pattern=("global",))}  # granite_swa / llama
ALL = LoraConfig(targets=tuple(TARGETS), rank=4, alpha=8.0)
# Each target's delta from A and B, and its x-path (x @ W + scale * (x @ A) @ B) as the model
# contracts x with W, spelled per target with named dims (independent of lora.delta's reshapes).
DELTA = {"q": "ldr,lrnh->ldnh", "k": "ldr,lrnh->ldnh", "v": "ldr,lrnh->ldnh", "o": "lnhr,lrd->lnhd",
         "gate": "ldr,lrf->ldf", "up": "ldr,lrf->ldf", "down": "lfr,lrd->lfd"}
X_W = {"q": "btd,dnh->btnh", "k": "btd,dnh->btnh", "v": "btd,dnh->btnh", "o": "btnh,nhd->btd",
       "gate": "btd,df->btf", "up": "btd,df->btf", "down": "btf,fd->btd"}
X_A = {"q": "btd,dr->btr", "k": "btd,dr->btr", "v": "btd,dr->btr", "o": "btnh,nhr->btr",
       "gate": "btd,dr->btr", "up": "btd,dr->btr", "down": "btf,fr->btr"}
X_B = {"q": "btr,rnh->btnh", "k": "btr,rnh->btnh", "v": "btr,rnh->btnh", "o": "btr,rd->btd",
       "gate": "btr,rf->btf", "up": "btr,rf->btf", "down": "btr,rd->btd"}
TOKENS = np.random.default_rng(0).integers(4, CFG.vocab_size, (1, 48))  # longer than the window


def random_params(md: ModelDef, seed: int = 1) -> dict:
    """Random params in numpy (std 0.02, norm scales near 1): as good a tiny random model as
    `md.init` and much faster to build on a busy CPU."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray((1.0 if p[-1].key == "scale" else 0.0)
                                 + (0.1 if p[-1].key == "scale" else 0.02) * rng.normal(size=s.shape),
                                 s.dtype), md.abstract_params)


@functools.cache
def model(kind: str = "mixed") -> tuple[ModelDef, dict]:
    md = ModelDef.from_config(CONFIGS[kind])
    return md, random_params(md)


def random_adapters(md: ModelDef, lora: LoraConfig, seed: int = 2, b_std: float = 0.05) -> dict:
    """init_adapters with B replaced by random values (fresh B is zero)."""
    ad = init_adapters(md, lora, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(b_std * rng.normal(size=x.shape), x.dtype)
        if p[-1].key == "lora_b" else x, ad)


def at(tree: dict, path) -> object:
    for key in path:
        tree = tree[key]
    return tree


def numpy_merged(base: dict, ad: dict, lora: LoraConfig) -> dict:
    """Base params as numpy with W + scale * einsum(A, B) for every target."""
    merged = jax.tree.map(lambda x: np.array(x, np.float64), base)
    for path, name in target_paths(CFG, lora):
        node = at(ad, path)
        a, b = (np.asarray(node[k], np.float64) for k in ("lora_a", "lora_b"))
        d = np.einsum(DELTA[name], a, b)
        at(merged, path[:-1])[path[-1]] += lora.scale * d
    return jax.tree.map(lambda x: x.astype(np.float32), merged)


@functools.cache
def _apply(md: ModelDef):
    return jax.jit(md.apply)


def logits(md: ModelDef, params: dict) -> np.ndarray:
    return np.asarray(_apply(md)(params, jnp.asarray(TOKENS)))[0]


# ---- merge ----

def test_fresh_adapters_leave_the_model_unchanged():
    md, base = model()
    ad = init_adapters(md, ALL, jax.random.key(0))
    merged = merge(base, ad, ALL)
    np.testing.assert_array_equal(logits(md, merged), logits(md, base))
    assert merged["embedding"] is base["embedding"]
    block = merged["groups"][0]["blocks"][1]
    assert block["attn_norm"]["scale"] is base["groups"][0]["blocks"][1]["attn_norm"]["scale"]
    only_q = LoraConfig(targets=("q",), rank=4, alpha=8.0)
    merged_q = merge(base, init_adapters(md, only_q, jax.random.key(0)), only_q)
    assert merged_q["groups"][1]["blocks"][0]["attn"]["wk"] is base["groups"][1]["blocks"][0]["attn"]["wk"]
    # L x (A [in, R] + B [R, out]) per kernel: wq/wo 64x64, wk/wv 64x32, gate/up/down 64x128
    per_layer = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert count_params(ad) == CFG.num_layers * per_layer


def test_adapter_shapes_and_init():
    md, base = model()
    ad = init_adapters(md, ALL, jax.random.key(0))
    for path, name in target_paths(CFG, ALL):
        w, node = at(base, path), at(ad, path)
        n_in = TARGETS[name].n_in
        assert node["lora_a"].shape == (*w.shape[:1 + n_in], 4)
        assert node["lora_b"].shape == (w.shape[0], 4, *w.shape[1 + n_in:])
        assert not np.asarray(node["lora_b"]).any()
        bound = 1 / np.sqrt(np.prod(w.shape[1:1 + n_in]))
        a = np.asarray(node["lora_a"])
        assert np.abs(a).max() <= bound and a.std() > bound / 3


def test_merge_matches_numpy_and_the_x_path():
    md, base = model()
    ad = random_adapters(md, ALL)
    merged = jax.jit(merge, static_argnums=2)(base, ad, ALL)
    reference = numpy_merged(base, ad, ALL)
    rng = np.random.default_rng(3)
    for path, name in target_paths(CFG, ALL):
        got, want, w = (np.asarray(at(t, path), np.float64) for t in (merged, reference, base))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{path}")
        # A plausibly wrong layout (output dims flattened in the other order) is far off.
        n_in = TARGETS[name].n_in
        d = want - w
        scrambled = d.reshape(*d.shape[:1 + n_in], -1)[..., ::-1].reshape(d.shape)
        assert np.abs(got - (w + scrambled)).max() > 1e-3
        # x @ W' == x @ W + scale * (x @ A) @ B, per layer
        node = at(ad, path)
        x = rng.normal(size=(2, 5, *w.shape[1:1 + n_in]))
        for r in range(w.shape[0]):
            a, b = (np.asarray(node[k][r], np.float64) for k in ("lora_a", "lora_b"))
            xa = np.einsum(X_A[name], x, a)
            x_path = np.einsum(X_W[name], x, w[r]) + ALL.scale * np.einsum(X_B[name], xa, b)
            np.testing.assert_allclose(np.einsum(X_W[name], x, got[r]), x_path, rtol=0, atol=1e-5)


def test_merged_logits_equal_the_numpy_merged_model():
    md, base = model()
    ad = random_adapters(md, ALL)
    got = logits(md, jax.jit(merge, static_argnums=2)(base, ad, ALL))
    want = logits(md, numpy_merged(base, ad, ALL))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(got - logits(md, base)).max() > 1e-2  # the adapters matter


def test_gradients_reach_the_adapters_only_through_merge():
    md, base = model()
    ad = init_adapters(md, ALL, jax.random.key(0))

    def loss(adapters, params):
        return jnp.mean(md.apply(merge(params, adapters, ALL), jnp.asarray(TOKENS)) ** 2)

    grads = jax.jit(jax.grad(loss))(ad, base)
    for path, _ in target_paths(CFG, ALL):
        g = at(grads, path)
        assert not np.asarray(g["lora_a"]).any()  # B = 0: nothing flows into A yet
        assert np.abs(np.asarray(g["lora_b"])).max() > 0


def test_bf16_base_merges_in_float32_and_keeps_its_dtype():
    md = ModelDef.from_config(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"))
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model()[1])
    ad = random_adapters(md, ALL)
    merged = merge(base, ad, ALL)
    path, _ = next(target_paths(CFG, ALL))
    w = at(merged, path)
    assert w.dtype == jnp.bfloat16
    node = at(ad, path)
    want = (np.asarray(at(base, path), np.float32)
            + ALL.scale * np.einsum(DELTA["q"], np.asarray(node["lora_a"], np.float32),
                                    np.asarray(node["lora_b"], np.float32)))
    np.testing.assert_array_equal(np.asarray(w, np.float32),
                                  np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))


# ---- validation ----

@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=("q", "qkv")),
     "lora.targets=('q', 'qkv'): unknown target 'qkv'; choose from q, k, v, o, gate, up, down"),
    (dict(targets=()), "at least one"),
    (dict(targets=("q", "q")), "give each target once"),
    (dict(rank=0), "lora.rank=0: must be an integer >= 1"),
    (dict(alpha=0.0), "lora.alpha=0.0: must be a finite number > 0"),
    (dict(dropout=0.1), "lora.dropout=0.1: only 0.0 is supported"),
])
def test_bad_configs_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gate_on_a_model_without_one_fails_in_one_line():
    md = ModelDef.from_config(CFG.replace(mlp="silu"))
    with pytest.raises(ConfigError, match=r"model.mlp='silu' has no gate projection"):
        init_adapters(md, LoraConfig(targets=("up", "gate")), jax.random.key(0))
    assert count_params(init_adapters(md, LoraConfig(targets=("up", "down")), jax.random.key(0))) > 0


def test_merge_refuses_mismatched_adapters():
    md, base = model()
    ad = init_adapters(ModelDef.from_config(CFG.replace(d_model=32)), ALL, jax.random.key(0))
    with pytest.raises(ValueError, match="A @ B has shape"):
        merge(base, ad, ALL)


# ---- sharding ----

def test_adapters_are_sharded_like_their_base():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    md, base = model()
    base_sh = md.param_shardings(mesh)
    ad_sh = adapter_shardings(md, ALL, mesh)
    axes = adapter_axes(md, ALL)
    sharded = set()
    for path, name in target_paths(CFG, ALL):
        n_in, w = TARGETS[name].n_in, at(base, path)
        spec = tuple(at(base_sh, path).spec) + (None,) * w.ndim
        a_spec = tuple(at(ad_sh, path)["lora_a"].spec) + (None,) * (w.ndim + 1)
        b_spec = tuple(at(ad_sh, path)["lora_b"].spec) + (None,) * (w.ndim + 1)
        assert a_spec[:1 + n_in] == spec[:1 + n_in] and a_spec[1 + n_in] is None
        assert b_spec[0] == spec[0] and b_spec[1] is None
        n_out = w.ndim - 1 - n_in
        assert b_spec[2:2 + n_out] == spec[1 + n_in:w.ndim]
        assert b_spec[2 + n_out:w.ndim + 1] == (None,) * n_in
        assert at(axes, path)["lora_a"][-1] is None and at(axes, path)["lora_b"][1] is None
        sharded.update(s for s in a_spec + b_spec if s)
    assert sharded == {"fsdp", "tensor"}
    ad = jax.jit(lambda k: init_adapters(md, ALL, k), out_shardings=ad_sh)(jax.random.key(0))
    assert all(jax.tree.leaves(jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim),
                                            ad, ad_sh)))
    b = random_adapters(md, ALL)
    ad = jax.device_put(b, ad_sh)
    params = jax.device_put(base, base_sh)
    merged = jax.jit(merge, static_argnums=2, out_shardings=base_sh)(params, ad, ALL)
    np.testing.assert_allclose(logits(md, merged), logits(md, merge(base, b, ALL)), rtol=0, atol=1e-5)


# ---- llama.cpp adapter GGUF ----

def llama_logits(path: Path, lora_path: Path | None = None) -> np.ndarray:
    """[T, V] logits from llama.cpp (CPU, F32 KV cache, no flash attention), with an adapter."""
    llama_cpp = pytest.importorskip("llama_cpp")
    options = {} if lora_path is None else {"lora_path": str(lora_path)}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False, **options)
    ids = [int(t) for t in TOKENS[0]]
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    return out


@pytest.mark.parametrize("kind", ["global", "mixed"])
def test_adapter_gguf_in_llama_cpp_equals_the_merged_model(kind, tokenizer_path, tmp_path):
    pytest.importorskip("llama_cpp")
    md, base = model(kind)
    ad = random_adapters(md, ALL)
    merged = merge(base, ad, ALL)

    def export(params, name):
        canon, _ = canonicalize(md.config, params, tokenizer_path, rope_pairing="interleaved")
        return write_gguf(canon, tmp_path / name, "f32")

    base_file, merged_file = export(base, "base.gguf"), export(merged, "merged.gguf")
    lora_file = write_lora_gguf(md, ad, ALL, tmp_path / "lora.gguf")
    with_lora, as_merged = llama_logits(base_file, lora_file), llama_logits(merged_file)
    jax_merged, without = logits(md, merged), llama_logits(base_file)
    print(f"{kind}: lora vs merged (llama.cpp) {np.abs(with_lora - as_merged).max():.2e}, "
          f"vs JAX merged {np.abs(with_lora - jax_merged).max():.2e}, "
          f"adapter effect {np.abs(with_lora - without).max():.2e}")
    # measured ~2e-7 and ~3e-7; without the Q/K row permutation of B both are ~1e-2
    np.testing.assert_allclose(with_lora, as_merged, rtol=0, atol=1e-5)
    np.testing.assert_allclose(with_lora, jax_merged, rtol=0, atol=1e-4)
    assert np.abs(with_lora - without).max() > 1e-2  # the adapter is applied


def test_adapter_gguf_metadata_names_and_shapes(tmp_path):
    md, _ = model("mixed")
    lora = LoraConfig(targets=("q", "o", "down"), rank=3, alpha=6.0)
    ad = random_adapters(md, lora)
    path = write_lora_gguf(md, ad, lora, tmp_path / "a.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # written atomically, no leftovers
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == 6.0
    assert field("general.architecture") == "granite_swa"  # the base export's arch: windows
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 3 * CFG.num_layers
    D, NH, F = CFG.d_model, CFG.num_heads * CFG.head_dim, CFG.ffn_dim
    for i in range(CFG.num_layers):  # ggml ne order: lora_a [n_in, R], lora_b [R, n_out]
        for name, n_in, n_out in (("attn_q", D, NH), ("attn_output", NH, D), ("ffn_down", F, D)):
            a, b = tensors[f"blk.{i}.{name}.weight.lora_a"], tensors[f"blk.{i}.{name}.weight.lora_b"]
            assert list(a.shape) == [n_in, 3] and list(b.shape) == [3, n_out]
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
    # layer 4 lives in the remainder group: its down A is that group's repeat 0, transposed
    g, r, s = layer_locations(CFG)[4]
    want = np.asarray(ad["groups"][g]["blocks"][s]["mlp"]["w_down"]["lora_a"][r]).T
    np.testing.assert_array_equal(tensors["blk.4.ffn_down.weight.lora_a"].data, want)
    only_global, _ = model("global")
    reader = gguf.GGUFReader(write_lora_gguf(only_global, random_adapters(only_global, lora), lora,
                                             tmp_path / "b.gguf"))
    assert reader.get_field("general.architecture").contents() == "llama"


def test_diverged_adapters_are_refused_before_writing(tmp_path):
    md, _ = model("global")
    lora = LoraConfig(targets=("v",), rank=2, alpha=2.0)
    ad = random_adapters(md, lora)
    ad["groups"][0]["blocks"][0]["attn"]["wv"]["lora_b"] = jnp.full((5, 2, 2, 16), jnp.nan)
    with pytest.raises(ExportError, match=r"blk\.0\.attn_v\.weight\.lora_b has NaN/Inf values"):
        write_lora_gguf(md, ad, lora, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
