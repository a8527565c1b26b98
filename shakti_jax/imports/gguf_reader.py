"""GGUF files (llama.cpp's format) as an `ImportSource`.

Architectures: `llama` (tied or untied embeddings; Mistral files use it too), `qwen2` (q/k/v
biases) and `granite_swa` (what this project exports for sliding-window models). Every key of
the architecture's namespace must be one this model understands, with a value it can run:
anything else (rope scaling, partial rotary, experts, logit soft-capping, ...) is refused in
one line before any weight is read. Weights dequantize with the `gguf` package (every type it
can dequantize); `llama`/`granite_swa` files hold Q and K rows permuted for llama.cpp's
interleaved RoPE, which is undone here (`qwen2` files rotate halves already).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from data_pipelines.bpe import BPETokenizer
from data_pipelines.errors import TokenizerError
from data_pipelines.spm_gguf import spm_tokenizer_from_gguf
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.imports.params import interleaved_to_halves
from shakti_jax.imports.source import ImportSource, ModelImportError, check_tensors, periodic_pattern

ARCHITECTURES = ("llama", "qwen2", "granite_swa")
_INTERLEAVED = ("llama", "granite_swa")
# Keys of the architecture namespace this model understands; any other is a missing feature.
_UNDERSTOOD = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "logit_scale", "attention.sliding_window", "attention.sliding_window_pattern",
    "embedding_scale", "residual_scale", "attention.scale",
}
_NEUTRAL = {"rope.scaling.type": ("none",), "logit_scale": (1.0,), "embedding_scale": (1.0,),
            "residual_scale": (1.0,)}
_SINK = -1e29  # sinks at or below this take no probability mass (the exporter writes -1e30)


def read_gguf(path: str | Path) -> ImportSource:
    """Config, lazily dequantized tensors and tokenizer of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
        raise ModelImportError(f"{path} is not a readable GGUF file "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    fields = {name: _value(field) for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelImportError(f"{path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    cfg = _config(path, arch, fields, reader)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
    sinks = [name for name in tensors if name.endswith(".attn_sinks.weight")]
    for name in sinks:
        if arch != "granite_swa" or not np.all(_dequantize(path, tensors[name]) <= _SINK):
            raise ModelImportError(f"{path}: {name}: attention sinks are not supported")
    check_tensors(str(path), cfg, shapes, ignored=lambda name: name in sinks)
    for t in tensors.values():
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                and t.tensor_type not in gguf.quants._type_traits:
            raise ModelImportError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                   f"which the gguf package cannot dequantize")

    def read(name: str) -> np.ndarray:
        w = _dequantize(path, tensors[name]).reshape(shapes[name])
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(name.split(".")[-2])
        if heads and arch in _INTERLEAVED:
            w = interleaved_to_halves(w, heads)
        return w

    try:
        tokenizer = _tokenizer(path, fields)
    except TokenizerError as err:
        raise ModelImportError(str(err)) from None
    types = {}
    for t in tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    description = {"format": "gguf", "path": str(path.absolute()), "architecture": arch,
                   "name": fields.get("general.name"), "tensor_types": types}
    return ImportSource(cfg, read, tokenizer, description)


def _value(field):
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a field gguf-py cannot decode is treated as absent
        return None


def _dequantize(path: Path, tensor) -> np.ndarray:
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except Exception as err:  # noqa: BLE001 - truncated data, unknown types
        raise ModelImportError(f"{path}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot "
                               f"be read ({type(err).__name__}: {err})") from None


def _config(path: Path, arch: str, fields: dict, reader) -> ModelConfig:
    prefix = f"{arch}."
    for key in sorted(k for k in fields if k.startswith(prefix)):
        short = key[len(prefix):]
        if short not in _UNDERSTOOD:
            raise ModelImportError(f"{path}: {key} = {_short(fields[key])}: this feature is not supported")
        if short in _NEUTRAL and fields[key] not in _NEUTRAL[short]:
            raise ModelImportError(f"{path}: {key} = {_short(fields[key])}: only "
                                   f"{_NEUTRAL[short][0]!r} is supported")

    def get(key, default=None, required=True):
        value = fields.get(prefix + key, default)
        if value is None and required:
            raise ModelImportError(f"{path}: missing metadata {prefix}{key}")
        return value

    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    for key, value in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
        if not isinstance(value, int):
            raise ModelImportError(f"{path}: {prefix}{key} = {_short(value)}: per-layer head "
                                   f"counts are not supported")
    d_model = get("embedding_length")
    head_dim = get("attention.key_length", d_model // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ModelImportError(f"{path}: {prefix}attention.value_length differs from key_length: "
                               f"not supported")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ModelImportError(f"{path}: {prefix}rope.dimension_count = {get('rope.dimension_count')} "
                               f"< head dim {head_dim}: partial rotary embeddings are not supported")
    scale = get("attention.scale", None, False)
    if scale not in (None, 0.0) and abs(scale - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        raise ModelImportError(f"{path}: {prefix}attention.scale = {scale}: only 1/sqrt(head dim) "
                               f"is supported")
    layers = get("block_count")
    tensor_names = {t.name for t in reader.tensors}
    # the embedding's rows (check_tensors then refuses a file without one)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embedding.shape[1]) if embedding is not None else get("vocab_size", 1, False)
    pattern, window = ("global",), 512
    if arch == "granite_swa":
        flags = list(get("attention.sliding_window_pattern"))
        if len(flags) != layers:
            raise ModelImportError(f"{path}: {prefix}attention.sliding_window_pattern has "
                                   f"{len(flags)} entries for {layers} layers")
        pattern = periodic_pattern(["window" if f else "global" for f in flags])
        window = get("attention.sliding_window")
    name = fields.get("general.basename") or fields.get("general.name") or path.stem
    try:
        return ModelConfig(
            name=str(name), vocab_size=vocab, num_layers=layers, d_model=d_model, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, ffn_dim=get("feed_forward_length"),
            max_seq_len=get("context_length"), mlp="swiglu", norm="rmsnorm",
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in tensor_names,
            rope_theta=float(get("rope.freq_base", 10000.0, False)),
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            attention_pattern=pattern, window=min(window, get("context_length")), dropout_rate=0.0)
    except ConfigError as err:
        raise ModelImportError(f"{path}: the hyperparameters give an invalid model ({err})") from None


def _tokenizer(path: Path, fields: dict):
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise ModelImportError(f"{path}: the file has no tokenizer (no tokenizer.ggml.model); its requests "
                               f"and vocabulary cannot be built without one")
    if model == "gpt2":
        return BPETokenizer.from_gguf(path)
    if model == "llama":
        return spm_tokenizer_from_gguf(path, fields)
    raise ModelImportError(f"{path}: tokenizer.ggml.model = {model!r} is not supported "
                           f"(supported: gpt2 byte-level BPE, llama sentencepiece)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
