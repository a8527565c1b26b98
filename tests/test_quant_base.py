"""Quantized bases (shakti_jax.quant_base): GGUF blocks in memory, dequantized in JAX.

References are independent of the module's own layout code: the GGUF files come from the
repo's exporter (`canonicalize` + `write_gguf`), their tensors are read with gguf-py
(`GGUFReader` + `gguf.quants.dequantize`) and put into the params' layout by the importer
(`read_gguf` + `build_params`). Every comparison of values is of f32 bit patterns.
"""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shakti_jax.config import get_config
from shakti_jax.export import ExportError, canonicalize, write_gguf
from shakti_jax.export.canonical import canonical_tensors
from shakti_jax.imports.gguf_reader import read_gguf
from shakti_jax.imports.params import build_params, interleaved_to_halves
from shakti_jax.model.model_def import ModelDef
from shakti_jax.quant_base import (BLOCK_TYPES, QuantizedTensor, dequantize, dequantize_ggml,
                                   dequantize_params, from_gguf, is_quantized, nbytes, quantize_params)

Q = gguf.GGMLQuantizationType
# 4 layers of (window, global): one group of 2 slots x 2 stacked repeats; untied output; q/k/v biases
CFG = get_config("tiny").replace(name="qbase-test", num_layers=4, tie_embeddings=False, attention_bias=True)
EXPORTED = ("q8_0", "q4_0", "q5_0")  # exported and checked against llama.cpp below (q4_1: gguf-py only)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def leaves(tree) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def quantized(tree) -> list[QuantizedTensor]:
    return [leaf for leaf in leaves(tree).values() if is_quantized(leaf)]


@pytest.fixture(scope="module")
def model_def() -> ModelDef:
    return ModelDef.from_config(CFG)


@pytest.fixture(scope="module")
def params(model_def) -> dict:
    p = model_def.init(1)
    # non-zero biases, so the dense leaves are checked too
    for slot in p["groups"][0]["blocks"].values():
        for name in ("bq", "bk", "bv"):
            slot["attn"][name] = 0.1 * jax.random.normal(jax.random.key(len(name)), slot["attn"][name].shape)
    return p


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path, params):
    """exported(quant): the test model written by the repo's GGUF exporter."""
    d = tmp_path_factory.mktemp("qbase")
    canon, _ = canonicalize(CFG, params, tokenizer_path, rope_pairing="interleaved")

    @functools.cache
    def write(quant: str):
        return write_gguf(canon, d / f"{quant}.gguf", quant)
    return write


@functools.cache
def file_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@functools.cache
def imported_source(path):
    return read_gguf(path)


@functools.cache
def imported(path) -> dict:
    """The file's tensors dequantized by gguf-py, in the params' layout (the importer's path)."""
    source = imported_source(path)
    return build_params(source.config, source.read)


@pytest.mark.parametrize("quant", EXPORTED)
def test_blocks_are_the_exported_bytes(model_def, params, exported, quant):
    path = exported(quant)
    tensors = file_tensors(path)
    qparams = quantize_params(model_def, params, quant)
    names = set()
    for qt in quantized(qparams):
        raw = qt.block_bytes()
        assert qt.qtype == quant.upper() and raw.dtype == np.uint8
        for k, name in enumerate(qt.names):
            t = tensors[name]
            assert t.tensor_type.name == qt.qtype
            np.testing.assert_array_equal(raw[k] if qt.stacked else raw, np.asarray(t.data), err_msg=name)
            names.add(name)
    # exactly the tensors the exporter quantized (every matrix), the rest stay the params' arrays
    assert names == {n for n, t in tensors.items() if t.tensor_type.name == quant.upper()}
    assert len(names) == 2 + 7 * CFG.num_layers
    for key, leaf in leaves(qparams).items():
        if not is_quantized(leaf):
            assert leaf is leaves(params)[key]


@pytest.mark.parametrize("quant", EXPORTED)
def test_dequantize_is_gguf_py_bit_exact(model_def, params, exported, quant):
    path = exported(quant)
    tensors = file_tensors(path)
    qparams = quantize_params(model_def, params, quant)
    ggml = jax.jit(dequantize_ggml)
    for qt in quantized(qparams):  # ggml's layout, tensor by tensor
        got = np.asarray(ggml(qt))
        for k, name in enumerate(qt.names):
            ref = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
            np.testing.assert_array_equal(bits(got[k] if qt.stacked else got), bits(ref), err_msg=name)
    # the params' layout (Q/K un-permuted, matrices transposed back), every leaf
    got, ref = leaves(jax.jit(dequantize_params)(qparams)), leaves(imported(path))
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == jnp.float32
        np.testing.assert_array_equal(bits(got[key]), bits(ref[key]), err_msg=key)


@pytest.mark.parametrize("quant", EXPORTED)
def test_forward_equals_gguf_py_params(model_def, params, exported, quant):
    tokens = jax.random.randint(jax.random.key(0), (2, 48), 0, CFG.vocab_size)  # past the window
    qparams = quantize_params(model_def, params, quant)
    on_base = jax.jit(lambda qp, t: model_def.apply(dequantize_params(qp), t))(qparams, tokens)
    forward = jax.jit(model_def.apply)
    ref = forward(imported(exported(quant)), tokens)
    full = forward(params, tokens)
    err = float(jnp.abs(on_base - ref).max())
    assert err <= 1e-6, err
    scale = float(jnp.abs(full).max())
    assert scale > 0.1
    assert float(jnp.abs(on_base - full).max()) > 1e-3 * scale  # quantization changed the logits


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_random_blocks_bit_exact(qtype):
    """Arbitrary block bytes (every nibble / bit pattern, scales zero, negative, subnormal)."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 8, 4 * size), dtype=np.uint8)
    half = raw.reshape(3, 8, 4, size)
    scales = half[..., :4 if qtype == "Q4_1" else 2]  # d (and m): finite float16 of every kind
    kinds = np.concatenate([
        rng.standard_normal(64).astype(np.float16),
        np.array([0, -0.0, 6e-8, -6e-8, 3e-5, 65504], np.float16),
        rng.integers(0, 1 << 10, 16, dtype=np.uint16).view(np.float16)])  # subnormals
    f16 = rng.choice(kinds, scales.shape[:-1] + (scales.shape[-1] // 2,))
    scales[...] = f16.astype(np.float16).view(np.uint8).reshape(scales.shape)
    qt = QuantizedTensor.from_blocks(raw, qtype, shape=(3, 8, 4 * block), dtype="float32", names=("x",),
                                     stacked=True, transposed=False)
    np.testing.assert_array_equal(qt.block_bytes(), raw)
    assert qt.nbytes == raw.nbytes
    ref = gguf.quants.dequantize(raw, Q[qtype])
    np.testing.assert_array_equal(bits(jax.jit(dequantize_ggml)(qt)), bits(ref))
    np.testing.assert_array_equal(bits(dequantize_ggml(qt)), bits(ref))  # eager too


def test_q4_1_matches_gguf_py(model_def, params):
    """Q4_1 (not an exporter type): gguf-py's quantizer on the exporter's canonical tensors."""
    qparams = quantize_params(model_def, params, "q4_1")
    canon = {t.name: t for t in canonical_tensors(CFG, params, "interleaved")}
    blocks = {}
    for qt in quantized(qparams):
        raw = qt.block_bytes()
        for k, name in enumerate(qt.names):
            blocks[name] = gguf.quants.quantize(canon[name].load(), Q.Q4_1)
            np.testing.assert_array_equal(raw[k] if qt.stacked else raw, blocks[name], err_msg=name)

    def read(name):  # the importer's mapping of a llama-arch tensor
        w = gguf.quants.dequantize(blocks[name], Q.Q4_1) if name in blocks else canon[name].load()
        heads = {"attn_q": CFG.num_heads, "attn_k": CFG.num_kv_heads}.get(name.split(".")[-2])
        return interleaved_to_halves(w, heads) if heads else w

    got, ref = leaves(jax.jit(dequantize_params)(qparams)), leaves(build_params(CFG, read))
    for key in ref:
        np.testing.assert_array_equal(bits(got[key]), bits(ref[key]), err_msg=key)


@pytest.mark.parametrize("quant", EXPORTED + ("q4_1",))
def test_memory(model_def, params, exported, quant):
    qparams = quantize_params(model_def, params, quant)
    report = nbytes(qparams)
    block, size = gguf.GGML_QUANT_SIZES[Q[quant.upper()]]
    numel = sum(qt.size for qt in quantized(qparams))
    assert report.quantized == numel // block * size  # exactly the file's block bytes
    assert report.quantized_bf16 == 2 * numel
    assert abs(report.quantized_ratio - size / (2 * block)) < 1e-12  # Q4_0: 18 / 64 = 4.5 / 16
    dense = sum(x.size for x in jax.tree.leaves(params)) - numel
    assert report.bf16 == 2 * (numel + dense)
    assert report.total == report.quantized + 4 * dense  # f32 norms and biases
    assert report.by_type == {quant.upper(): report.quantized}
    if quant in EXPORTED:
        tensors = file_tensors(exported(quant))
        in_file = [t.n_bytes for t in tensors.values() if t.tensor_type.name == quant.upper()]
        assert report.quantized == sum(in_file)
    assert "MiB" in str(report)


def test_pytree_jit_and_dtypes(model_def, params):
    qparams = quantize_params(model_def, params, "q4_0")
    flat, treedef = jax.tree.flatten(qparams)
    assert all(isinstance(x, jax.Array) for x in flat)
    assert {x.dtype for x in flat} >= {jnp.dtype(jnp.uint8), jnp.dtype(jnp.float16)}
    again = jax.tree.unflatten(treedef, flat)
    qt = again["embedding"]
    assert is_quantized(qt) and qt.names == ("token_embd.weight",) and not qt.transposed
    assert qt.ggml_shape == (CFG.vocab_size, CFG.d_model)
    assert qt.qs.shape == (CFG.vocab_size, CFG.d_model // 32, 16)
    wq = again["groups"][0]["blocks"][0]["attn"]["wq"]
    assert wq.stacked and wq.rope_heads == CFG.num_heads
    assert wq.names == ("blk.0.attn_q.weight", "blk.2.attn_q.weight")
    f32 = dequantize(wq)
    b16 = jax.jit(functools.partial(dequantize, dtype=jnp.bfloat16))(wq)
    assert b16.dtype == jnp.bfloat16 and b16.shape == params["groups"][0]["blocks"][0]["attn"]["wq"].shape
    np.testing.assert_array_equal(np.asarray(b16), np.asarray(f32.astype(jnp.bfloat16)))
    # a bf16 model's params dequantize to bf16
    cfg16 = CFG.replace(param_dtype="bfloat16")
    md16 = ModelDef.from_config(cfg16)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = jax.jit(dequantize_params)(quantize_params(md16, p16, "q8_0"))
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.structure(out) == jax.tree.structure(p16)


def test_refusals(model_def, params):
    for quant in ("q4_k_m", "f16", "q3_0"):
        with pytest.raises(ExportError):
            quantize_params(model_def, params, quant)
    narrow = CFG.replace(d_model=48)  # rows of 48 values are not whole blocks
    with pytest.raises(ExportError, match="not a multiple"):
        abstract = ModelDef.from_config(narrow).abstract_params
        zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
        quantize_params(narrow, zeros, "q8_0")
    bad = jax.tree.map(lambda x: x, params)
    bad["embedding"] = bad["embedding"].at[3, 5].set(jnp.nan)
    with pytest.raises(ExportError, match="NaN"):
        quantize_params(model_def, bad, "q4_0")


@pytest.mark.slow
def test_smollm2_gguf_base(smollm_gguf):
    """SmolLM2's own Q4_1 file (Q8_0 embedding) as a base: its bytes, gguf-py's values."""
    base = from_gguf(smollm_gguf)
    tensors = file_tensors(smollm_gguf)
    types = {}
    for qt in quantized(base):
        raw = qt.block_bytes()
        for k, name in enumerate(qt.names):
            assert tensors[name].tensor_type.name == qt.qtype
            np.testing.assert_array_equal(raw[k] if qt.stacked else raw, np.asarray(tensors[name].data),
                                          err_msg=name)
            types[qt.qtype] = types.get(qt.qtype, 0) + 1
    assert types == {"Q8_0": 1, "Q4_1": 210}
    got, ref = leaves(jax.jit(dequantize_params)(base)), leaves(imported(smollm_gguf))
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(bits(got[key]), bits(ref[key]), err_msg=key)
    report = nbytes(base)
    q8 = sum(qt.size for qt in quantized(base) if qt.qtype == "Q8_0")
    q41 = sum(qt.size for qt in quantized(base) if qt.qtype == "Q4_1")
    assert report.by_type == {"Q8_0": q8 // 32 * 34, "Q4_1": q41 // 32 * 20}
    assert report.quantized == sum(t.n_bytes for t in tensors.values() if t.tensor_type.name != "F32")
    assert 20 / 64 < report.quantized_ratio < 34 / 64
    # a short forward on the base equals the imported (gguf-py) params
    model_def = ModelDef.from_config(imported_source(smollm_gguf).config)
    tokens = jnp.arange(1, 17)[None] * 997 % 49152
    on_base = jax.jit(lambda qp, t: model_def.apply(dequantize_params(qp), t))(base, tokens)
    on_import = jax.jit(model_def.apply)(imported(smollm_gguf), tokens)
    assert float(jnp.abs(on_import).max()) > 1.0
    assert float(jnp.abs(on_base - on_import).max()) <= 1e-6
