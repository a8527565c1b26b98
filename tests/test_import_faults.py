"""Bad checkpoints given to `python -m shakti_jax.import_model`: one `error:` line, exit code 2,
nothing written. The bad GGUF files are copies of a small valid export with one thing changed."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from shakti_jax.import_model import main

T = gguf.GGUFValueType


@pytest.fixture(scope="module")
def good_gguf(tokenizer_path, tmp_path_factory) -> Path:
    from flax import nnx

    from shakti_jax.config import get_config
    from shakti_jax.convert import convert, plan
    from shakti_jax.model import Transformer
    from shakti_jax.train.checkpoint import save_model

    root = tmp_path_factory.mktemp("good")
    save_model(root / "run", Transformer(get_config("tiny", attention_pattern=("global",)), nnx.Rngs(0)),
               tokenizer_path=tokenizer_path)
    [result] = convert(plan([root / "run"], "gguf", ["f32"], root / "model.gguf"), "gguf", progress=False)
    return result.job.out


def copy_gguf(src: Path, dst: Path, *, kv: dict | None = None, drop: tuple[str, ...] = (),
              tensors: dict | None = None) -> Path:
    """`src` rewritten: metadata `kv` set ((value, type); the architecture as (name,)), keys and
    tensors in `drop` left out, and `tensors` replaced or added (array, or (bytes, shape, type))."""
    kv, tensors = kv or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    arch = kv.get("general.architecture", (reader.fields["general.architecture"].contents(),))[0]
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture" and name not in kv and name not in drop:
            writer.add_key_value(name, field.contents(), field.types[0],
                                 sub_type=field.types[1] if len(field.types) > 1 else None)
    for name, (value, *kind) in kv.items():
        if name != "general.architecture":
            writer.add_key_value(name, value, kind[0])
    new = dict(tensors)
    for t in reader.tensors:
        if t.name not in drop:
            _add(writer, t.name, new.pop(t.name, (np.asarray(t.data), None, t.tensor_type)))
    for name, value in new.items():
        _add(writer, name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _add(writer, name, value) -> None:
    data, shape, qtype = value if isinstance(value, tuple) else (value, None, None)
    writer.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args] + ["--no_progress"])
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_the_unchanged_copy_imports(good_gguf, tmp_path, capsys):
    copy = copy_gguf(good_gguf, tmp_path / "copy.gguf")
    code, err = run(capsys, "--source", f"gguf:{copy}", "--workdir", tmp_path / "w")
    assert code == 0, err
    assert (tmp_path / "w" / "checkpoints" / "0").is_dir()


@pytest.mark.parametrize("change, message", [
    (dict(kv={"general.architecture": ("gemma",)}), "architecture 'gemma' is not supported"),
    (dict(kv={"tokenizer.ggml.model": ("bert", T.STRING)}), "tokenizer.ggml.model = 'bert' is not supported"),
    (dict(kv={"llama.rope.scaling.type": ("yarn", T.STRING)}), "llama.rope.scaling.type = 'yarn': only 'none'"),
    (dict(kv={"llama.expert_count": (8, T.UINT32)}), "llama.expert_count = 8: this feature is not supported"),
    (dict(kv={"llama.rope.dimension_count": (8, T.UINT32)}), "partial rotary embeddings are not supported"),
    (dict(drop=("blk.1.ffn_up.weight",)), "missing tensor blk.1.ffn_up.weight"),
    (dict(drop=("tokenizer.ggml.model",)), "the file has no tokenizer"),
    (dict(tensors={"blk.0.attn_norm.weight": np.ones(32, np.float32)}),
     "tensor blk.0.attn_norm.weight has shape [32], expected [64]"),
    (dict(tensors={"rope_freqs.weight": np.ones(8, np.float32)}),  # llama 3's rope scaling
     "tensor rope_freqs.weight belongs to a feature this model does not have"),
    (dict(drop=("blk.0.ffn_up.weight",),  # [128, 64] as Q8_1 blocks, which gguf-py cannot dequantize
          tensors={"blk.0.ffn_up.weight": (np.zeros((128, 64 // 32 * 40), np.uint8), None,
                                           gguf.GGMLQuantizationType.Q8_1)}),
     "blk.0.ffn_up.weight has type Q8_1, which the gguf package cannot dequantize"),
])
def test_bad_gguf_files_are_refused_in_one_line(change, message, good_gguf, tmp_path, capsys):
    bad = copy_gguf(good_gguf, tmp_path / "bad.gguf", **change)
    code, err = run(capsys, "--source", f"gguf:{bad}", "--workdir", tmp_path / "w")
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "w").exists()


def test_eval_refuses_a_gguf_without_a_tokenizer_in_one_line(good_gguf, tmp_path, capsys, shared_data):
    from shakti_jax.eval import main as eval_main

    bad = copy_gguf(good_gguf, tmp_path / "bad.gguf", drop=("tokenizer.ggml.model",))
    crows = shared_data / "eval" / "crows_pairs_anonymized.csv"
    with pytest.raises(SystemExit) as code:
        eval_main(["--model", f"gguf:{bad}", "--tasks", f"crows_pairs:{crows}", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.count("\n") == 0 and "the file has no tokenizer" in err, err
    assert not (tmp_path / "r.json").exists()


def test_a_truncated_gguf_is_refused(good_gguf, tmp_path, capsys):
    data = good_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) * 2 // 3])
    code, err = run(capsys, "--source", f"gguf:{bad}", "--workdir", tmp_path / "w")
    assert code == 2 and err.count("\n") == 0 and str(bad) in err, err
    assert not (tmp_path / "w").exists()


def test_bad_hf_folders_are_refused_in_one_line(tokenizer_path, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    config = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4}
    (no_weights / "config.json").write_text(json.dumps(config))
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}}))
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    cases = [(empty, "has no config.json"), (no_weights, "has no model.safetensors"),
             (scaled, "rope scaling (llama3) is not supported"), (gemma, "model_type 'gemma' is not supported"),
             (tmp_path / "missing", "is not a folder")]
    for folder, message in cases:
        code, err = run(capsys, "--source", f"hf:{folder}", "--workdir", tmp_path / "w")
        assert code == 2 and err.count("\n") == 0 and message in err, (folder, err)
        assert not (tmp_path / "w").exists()


def test_an_existing_workdir_is_never_overwritten(good_gguf, tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    code, err = run(capsys, "--source", f"gguf:{good_gguf}", "--workdir", workdir)
    assert code == 2 and "already exists and is not empty" in err
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]
