"""Edge export: GGUF and HF files checked against llama.cpp, transformers and a numpy reference.

The runtimes come from the optional extras (`edge`: llama-cpp-python, `hf`: torch +
transformers), which `make test` installs; tests that need one skip when it is missing.
Logits of the test models are O(1) (asserted), so a layout bug moves them by far more than
the tolerances: 1e-4 for float files, and for quantized ones see QUANT_AGREEMENT.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from shakti_jax.config import ModelConfig, get_config
from shakti_jax.export import ExportError, canonicalize, model_params, write_gguf, write_hf
from shakti_jax.export.gguf_export import QUANT_TYPES, size_label
from shakti_jax.export.hf_export import to_dtype
from shakti_jax.model import Transformer
from shakti_jax.train.checkpoint import newest_meta
from tests.gguf_reference import GGUFModel

WINDOW = 32
BASE = get_config("tiny").replace(
    name="export-test", d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, ffn_dim=512,
    max_seq_len=256, window=WINDOW)
CONFIGS = {  # attention pattern -> GGUF arch / HF class under test
    "global": BASE.replace(attention_pattern=("global",)),  # llama / Llama
    "mixed": BASE.replace(attention_pattern=("window", "global")),  # granite_swa / Qwen2
    "window": BASE.replace(attention_pattern=("window",)),  # granite_swa / Mistral
}
TOKENIZER_BATTERY = [
    "Hello world", "  two  leading spaces", " lead", "trail  ", "", "digits 12345 and 3.14159",
    "naïve café ünïcode 你好 🙂", "\ttab\nnewline\r\n", "a\u00a0non-breaking space",
    "<|user|>hi<|end|><|assistant|> yes", "x  <|end|>  y", "<|system|>Be brief.<|end|><|user|>2+2?",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer.load(train_tokenizer([write_default_corpus(d / "corpus.txt")], 512, d / "tok"))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Real text: sentences of the embedded corpus, one longer than the sliding window."""
    text = tokenizer.model_path.parent.joinpath("corpus.txt").read_text().split("\n")
    lines = [line for line in text if len(line) > 40]
    long = tokenizer.encode(" ".join(lines[:20]), add_bos=True)[:3 * WINDOW + 5]
    assert len(long) > 2 * WINDOW
    return [long] + [tokenizer.encode(line, add_bos=True)[:60] for line in lines[20:23]]



@functools.cache
def model(kind: str) -> Transformer:
    return Transformer(CONFIGS[kind], nnx.Rngs(1))


def jax_logits(kind: str, ids: list[int]) -> np.ndarray:
    return np.asarray(model(kind)(jnp.asarray([ids])), np.float64)[0]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer):
    """gguf_file(kind, quant): the model of `kind` written once per quant type."""
    d = tmp_path_factory.mktemp("gguf")

    @functools.cache
    def write(kind: str, quant: str) -> Path:
        canon, _ = canonicalize(CONFIGS[kind], model_params(model(kind)), tokenizer.model_path,
                                rope_pairing="interleaved")
        return write_gguf(canon, d / f"{kind}-{quant}.gguf", quant)
    return write


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("hf")

    @functools.cache
    def write(kind: str, dtype: str = "f32") -> Path:
        canon, _ = canonicalize(CONFIGS[kind], model_params(model(kind)), tokenizer.model_path,
                                rope_pairing="halves")
        return write_hf(canon, d / f"{kind}-{dtype}", dtype)
    return write


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """[T, V] logits from llama.cpp (CPU, F32 KV cache, no flash attention)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], np.float64)
    llm.close()
    return logits


# ---- the numpy reference itself (needs no runtime) ----

@pytest.mark.parametrize("kind", CONFIGS)
def test_reference_reads_f32_gguf_as_jax_computes(kind, gguf_file, prompts):
    ref = GGUFModel(gguf_file(kind, "f32"))
    assert ref.arch == ("llama" if kind == "global" else "granite_swa")
    for ids in prompts[:2]:
        expected = jax_logits(kind, ids)
        assert np.abs(expected).max() > 1.0
        np.testing.assert_allclose(ref.logits(ids, round_activations=False), expected, rtol=0, atol=1e-4)


# ---- llama.cpp ----

@pytest.mark.parametrize("kind", CONFIGS)
def test_f32_gguf_in_llama_cpp_matches_jax(kind, gguf_file, prompts):
    for ids in prompts:  # prompts[0] is longer than the window
        np.testing.assert_allclose(llama_logits(gguf_file(kind, "f32"), ids), jax_logits(kind, ids),
                                   rtol=0, atol=1e-4)


# Quantized files vs the numpy reference on the file's own dequantized weights, with llama.cpp's
# activation rounding. The reference reproduces llama.cpp to ~1e-7 wherever both make the same
# rounding decisions, but float32 summation order decides near-ties of the 8-bit activation
# rounding, and one flipped activation moves the logits by up to ~2e-2 here (measured). So each
# position (a one-token sequence: no attention mixing) is checked on its own: the share within
# 1e-3 must reach the floor below (measured on x86 AVX2, 2026-11-24, in brackets), every position
# stays within the bound, and long prompts (quantized K/V through attention) within the bound.
# A layout or rounding-model bug puts the logits off by O(1e-1..1) everywhere.
QUANT_AGREEMENT = {  # quant: (share of positions within 1e-3, bound on every logit)
    "f16": (1.0, 1e-3),
    "bf16": (0.8, 2e-2),
    "q8_0": (0.8, 2e-2),
    "q6_k": (0.75, 4e-2),
    "q5_k_m": (0.75, 4e-2),
    "q4_k_m": (0.75, 4e-2),
    "q5_0": (0.3, 4e-2),
    "q4_0": (0.3, 4e-2),
}


@pytest.mark.parametrize("quant", QUANT_AGREEMENT)
def test_quantized_gguf_in_llama_cpp_matches_dequantized_reference(quant, gguf_file, prompts,
                                                                   record_property):
    llama_cpp = pytest.importorskip("llama_cpp")
    share_floor, bound = QUANT_AGREEMENT[quant]
    path = gguf_file("mixed", quant)
    ref = GGUFModel(path)
    if "_k" in quant:
        assert {t.name for t in ref.types.values()} & {"Q4_K", "Q5_K", "Q6_K"}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)
    errors = []
    for token in range(8, 72):
        llm.reset()
        llm.eval([token])
        errors.append(np.abs(np.array(llm.scores[0]) - ref.logits([token])[0]).max())
    share = float(np.mean(np.array(errors) < 1e-3))
    record_property("positions_within_1e-3", share)
    assert share >= share_floor and max(errors) < bound, (share, max(errors))
    agree = total = 0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)], np.float64)
        np.testing.assert_allclose(got, ref.logits(ids), rtol=0, atol=bound)
        agree += int((got.argmax(-1) == jax_logits("mixed", ids).argmax(-1)).sum())
        total += len(ids)
    llm.close()
    record_property("top1_agreement_with_float", agree / total)
    assert agree / total > 0.5, f"{quant}: top-1 agreement with the float model {agree / total:.2f}"


def test_tokenizer_ids_agree_across_sentencepiece_llama_cpp_and_transformers(tokenizer, gguf_file,
                                                                             hf_folder):
    llama_cpp = pytest.importorskip("llama_cpp")
    transformers = pytest.importorskip("transformers")
    llm = llama_cpp.Llama(model_path=str(gguf_file("mixed", "f32")), vocab_only=True, verbose=False)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(hf_folder("mixed"))
    auto = transformers.AutoTokenizer.from_pretrained(hf_folder("global"))  # Llama folder
    for text in TOKENIZER_BATTERY:
        expected = tokenizer.encode(text, add_bos=True, special=True)  # as the runtimes parse them
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
        assert hf(text)["input_ids"] == expected, text
        assert auto(text)["input_ids"] == expected, text


# ---- transformers ----

@pytest.mark.parametrize("kind, cls", [("global", "LlamaForCausalLM"), ("window", "MistralForCausalLM"),
                                       ("mixed", "Qwen2ForCausalLM")])
def test_hf_folder_in_transformers_matches_jax(kind, cls, hf_folder, prompts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(kind), dtype=torch.float32)
    assert type(hf).__name__ == cls
    for ids in prompts:
        with torch.no_grad():
            got = hf(torch.tensor([ids])).logits[0].double().numpy()
        np.testing.assert_allclose(got, jax_logits(kind, ids), rtol=0, atol=1e-4)


def test_hf_bf16_weights_are_the_rounded_f32_weights(hf_folder):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    f32 = safetensors_torch.load_file(hf_folder("mixed") / "model.safetensors")
    bf16 = safetensors_torch.load_file(hf_folder("mixed", "bf16") / "model.safetensors")
    assert f32.keys() == bf16.keys()
    for name, w in f32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], w.to(torch.bfloat16)), name
    config = json.loads((hf_folder("mixed", "bf16") / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_hf_bf16_keeps_nan_and_inf_and_rounds_to_nearest_even():
    bits = np.array([0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000],
                    np.uint32)
    got = to_dtype(bits.view(np.float32), "bf16")
    assert np.isnan(got[:3].astype(np.float32)).all()  # NaN payloads must not round to Inf or 0
    assert list(got[3:5].astype(np.float32)) == [np.inf, -np.inf]
    assert list(got[5:].view(np.uint16)) == [0x3F80, 0x3F82]  # ties go to the even mantissa


def test_transformers_reads_the_llama_gguf(gguf_file, prompts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = gguf_file("global", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = prompts[0]
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(got, jax_logits("global", ids), rtol=0, atol=1e-4)


# ---- refusals, errors and atomic writes (no runtime needed) ----

def canon_of(cfg, tokenizer, **kwargs):
    return canonicalize(cfg, model_params(Transformer(cfg, nnx.Rngs(0))), tokenizer.model_path,
                        rope_pairing="interleaved", **kwargs)


def test_bad_requests_fail_before_writing(tokenizer, tmp_path, monkeypatch):
    canon, _ = canon_of(get_config("tiny"), tokenizer)
    with pytest.raises(ExportError, match="unknown quant type 'q3_0'"):
        write_gguf(canon, tmp_path / "a.gguf", "q3_0")
    narrow = get_config("tiny").replace(d_model=48, num_heads=3, num_kv_heads=1, ffn_dim=96)
    narrow_canon, _ = canon_of(narrow, tokenizer)
    with pytest.raises(ExportError, match="token_embd.weight has rows of 48 values, not a multiple of q4_0"):
        write_gguf(narrow_canon, tmp_path / "b.gguf", "q4_0")
    write_gguf(narrow_canon, tmp_path / "c.gguf", "f16")  # float types take any row length
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ExportError, match=r"install the edge extra: pip install -e '\.\[edge\]'"):
        write_gguf(canon, tmp_path / "d.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


def test_unexportable_models_are_refused(tokenizer):
    with pytest.raises(ExportError, match="model.mlp='silu'"):
        canon_of(get_config("tiny").replace(mlp="silu"), tokenizer)
    sparse = get_config("tiny").replace(attention_pattern=("block_sparse", "global"))
    with pytest.raises(ExportError, match=r"block-sparse layers \[0\].*--allow_attention_change"):
        canon_of(sparse, tokenizer)
    canon, warnings = canon_of(sparse, tokenizer, allow_attention_change=True)
    assert canon.config.layer_kinds == ("global", "global")
    assert len(warnings) == 1 and "full causal attention" in warnings[0]


def test_interrupted_writes_leave_the_previous_output(tokenizer, tmp_path):
    canon, _ = canon_of(get_config("tiny"), tokenizer)
    halves, _ = canonicalize(get_config("tiny"), model_params(Transformer(get_config("tiny"), nnx.Rngs(0))),
                             tokenizer.model_path, rope_pairing="halves")
    gguf_path, hf_path = tmp_path / "m.gguf", tmp_path / "hf"
    gguf_path.write_bytes(b"previous")
    hf_path.mkdir()
    (hf_path / "config.json").write_text("previous")

    for write, path, c, quant in [(write_gguf, gguf_path, canon, "q8_0"), (write_hf, hf_path, halves, "f32")]:
        written = []

        def interrupt_after_3(name, written=written):
            written.append(name)
            if len(written) == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            write(c, path, quant, on_tensor=interrupt_after_3)
    assert gguf_path.read_bytes() == b"previous"
    assert [p.name for p in hf_path.iterdir()] == ["config.json"]
    assert (hf_path / "config.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


def test_every_quant_type_writes_and_reads_back(tokenizer, tmp_path):
    canon, _ = canon_of(BASE.replace(attention_pattern=("window", "global")), tokenizer)
    embd = canon.tensors[0].load()
    for name, q in QUANT_TYPES.items():
        if q.tensor_type is None:
            continue  # K-quants: llama.cpp's quantizer (tested above with the edge extra)
        ref = GGUFModel(write_gguf(canon, tmp_path / f"{name}.gguf", name))
        assert ref.types["blk.0.attn_norm.weight"] == QUANT_TYPES["f32"].tensor_type
        assert ref.types["token_embd.weight"] == q.tensor_type
        error = np.abs(ref.weights["token_embd.weight"] - embd).max() / np.abs(embd).max()
        assert error < {"f32": 1e-7, "f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q5_0": 0.05, "q4_0": 0.1, "q4_1": 0.1}[name]


# ---- the command line ----

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> Path:
    from shakti_jax.train.checkpoint import save_model

    root = tmp_path_factory.mktemp("runs")
    narrow = get_config("tiny").replace(d_model=48, num_heads=3, num_kv_heads=1, ffn_dim=96)
    for name, cfg in [("run_a", get_config("tiny")), ("run_b", get_config("tiny")), ("narrow", narrow)]:
        save_model(root / name, Transformer(cfg, nnx.Rngs(0)), tokenizer_path=tokenizer.model_path)
    return root


def run_cli(args: list[str]) -> int:
    """`shakti_jax.convert.main(args)`'s exit code."""
    from shakti_jax.convert import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_cli_converts_a_batch_and_prints_the_size_table(checkpoints, tmp_path, capsys):
    assert run_cli(["--checkpoint", str(checkpoints / "run_*"), "--format", "gguf", "--quant",
                    "f32,q8_0,q4_0", "--out", str(tmp_path / "out"), "--no_progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["checkpoint", "quant", "size", "MB"]
    assert len(table) == 1 + 2 * 3
    sizes = {}
    for row in table[1:]:
        name, quant, _, ratio, _, out = row.split()
        size = size_label(ModelConfig.from_dict(newest_meta(checkpoints / name)["model"]))
        assert Path(out) == tmp_path / "out" / f"{name}-{size}-{quant.upper()}.gguf" and Path(out).is_file()
        sizes[quant] = float(ratio)
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"]
    assert run_cli(["--checkpoint", str(checkpoints / "run_a"), "--format", "hf", "--out",
                    str(tmp_path / "hf"), "--no_progress"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{root}/narrow", "--format", "gguf", "--quant", "f16,q4_0"],
     "token_embd.weight has rows of 48 values, not a multiple of q4_0's block of 32"),
    (["--checkpoint", "{root}/run_a", "--format", "gguf", "--quant", "q4_0,q3"], "unknown quant type 'q3'"),
    (["--checkpoint", "{root}/run_a", "--format", "hf", "--quant", "q8_0"], "--format hf writes f32, bf16, f16"),
    (["--checkpoint", "{root}/run_*", "{root}/nothing_*", "--format", "gguf"], "'{root}/nothing_*' matches nothing"),
    (["--checkpoint", "{root}/run_a", "{root}/missing", "--format", "gguf"], "{root}/missing is not a folder"),
    (["--checkpoint", "{root}/run_a", "--format", "gguf", "--quant", ""], "--quant '': entry 1 is empty"),
    (["--checkpoint", "{root}/run_a", "--format", "hf", "--quant", "f32,"], "--quant 'f32,': entry 2 is empty"),
    (["--checkpoint", "{root}/run_a", "--format", "gguf", "--quant", "q8_0, ,q4_0"],
     "--quant 'q8_0, ,q4_0': entry 2 is empty"),
])
def test_cli_rejects_bad_requests_in_one_line_before_writing(args, message, checkpoints, tmp_path, capsys):
    args = [a.format(root=checkpoints) for a in args]
    assert run_cli(args + ["--out", str(tmp_path / "out"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.format(root=checkpoints) in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pattern, cls", [(("global",), "LlamaForSequenceClassification"),
                                          (("window", "global"), "Qwen2ForSequenceClassification")])
def test_cli_exports_a_reward_model_as_hf_classifier_and_gguf_lm(pattern, cls, tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from shakti_jax.model import ModelDef
    from shakti_jax.train.checkpoint import save_params

    cfg = get_config("tiny").replace(attention_pattern=pattern, value_head=True, tie_embeddings=False)
    model_def = ModelDef.from_config(cfg)
    params = model_def.init(0)
    params["value_head"] = params["value_head"] * 50  # scores O(1), so 1e-4 is a real check
    save_params(tmp_path / "rm", cfg, params, tokenizer_path=tokenizer.model_path,
                meta={"experiment": {"stage": "reward"}})  # any other stage exports the LM only
    for fmt, out in [("hf", tmp_path / "hf"), ("gguf", tmp_path / "lm.gguf")]:
        assert run_cli(["--checkpoint", str(tmp_path / "rm"), "--format", fmt, "--quant", "f32",
                        "--out", str(out), "--no_progress"]) == 0

    rows = [tokenizer.encode(" ".join(["a reward model scores this reply"] * 6), add_bos=True)[:40],
            tokenizer.encode("short", add_bos=True)]
    tokens = np.full((2, 40), tokenizer.pad_id, np.int64)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)] = ids
    last = [len(ids) - 1 for ids in rows]
    expected = np.asarray(model_def.values(params, jnp.asarray(tokens, jnp.int32)), np.float64)[[0, 1], last]
    assert np.abs(expected).max() > 0.1
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == cls and hf.config.num_labels == 1
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # score, and no lm_head
    with torch.no_grad():
        got = hf(torch.tensor(tokens), attention_mask=torch.tensor(tokens != tokenizer.pad_id)).logits
    assert got.shape == (2, 1)
    np.testing.assert_allclose(got[:, 0].double().numpy(), expected, rtol=0, atol=1e-4)

    lm = GGUFModel(tmp_path / "lm.gguf")  # the causal LM, without the value head
    assert "cls.output.weight" not in lm.weights and "output.weight" in lm.weights
    np.testing.assert_allclose(lm.logits(rows[0], round_activations=False),
                               np.asarray(model_def.apply(params, jnp.asarray([rows[0]])), np.float64)[0],
                               rtol=0, atol=1e-4)
