"""Hugging Face folders (config.json + safetensors + tokenizer) as an `ImportSource`.

Model types: `llama`, `mistral` (one sliding window for every layer) and `qwen2` (q/k/v biases,
per-layer windows). Config keys that change the computation in ways this model cannot follow
(rope scaling, partial rotary, o_proj / MLP biases, other activations, experts) are refused in
one line. Weights are read lazily with the `safetensors` library (numpy, no torch), one tensor
at a time, from `model.safetensors` or the shards named by `model.safetensors.index.json`; the
tensor names are the HF export's own map (`shakti_jax.export.hf_export.hf_name`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from data_pipelines.bpe import BPETokenizer
from data_pipelines.errors import TokenizerError
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.export.canonical import canonical_tensors
from shakti_jax.export.hf_export import hf_name
from shakti_jax.imports.source import ImportSource, ModelImportError, check_tensors, periodic_pattern

MODEL_TYPES = ("llama", "mistral", "qwen2")
_INDEX = "model.safetensors.index.json"


def read_hf(directory: str | Path) -> ImportSource:
    """Config, lazily read tensors and tokenizer of a Hugging Face model folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelImportError(f"{directory} is not a folder")
    config_path = directory / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelImportError(f"{directory} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as err:
        raise ModelImportError(f"{config_path} is not readable JSON ({err})") from None
    cfg = _config(config_path, hf)
    files = _weight_files(directory)
    shapes, where, dtypes = {}, {}, {}
    canonical_of = {hf_name(t.name): t.name
                    for t in canonical_tensors(cfg.replace(tie_embeddings=False), None, "halves")}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    name = canonical_of.get(key, key)
                    shapes[name], where[name] = tuple(info.get_shape()), file
                    dtypes[info.get_dtype()] = dtypes.get(info.get_dtype(), 0) + 1
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelImportError(f"{file} is not a readable safetensors file "
                                   f"({' '.join(str(err).split())[:160]})") from None
    reverse = {v: k for k, v in canonical_of.items()}

    def read(name: str) -> np.ndarray:
        with safe_open(where[name], framework="numpy") as f:
            return np.asarray(f.get_tensor(reverse.get(name, name)), np.float32)

    biases = [n for n in shapes if n.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias"))]
    zero_biases = bool(biases) and all(not read(n).any() for n in biases)
    if zero_biases:  # Qwen2 folders of models without biases (this project's window exports)
        cfg = cfg.replace(attention_bias=False)
    tied_copy = cfg.tie_embeddings and "output.weight" in shapes
    check_tensors(str(directory), cfg, shapes, ignored=lambda n: n.endswith("rotary_emb.inv_freq") or (
        tied_copy and n == "output.weight") or (zero_biases and n in biases))

    description = {"format": "hf", "path": str(directory.absolute()), "architecture": hf["model_type"],
                   "name": cfg.name, "tensor_types": dtypes}
    return ImportSource(cfg, read, _tokenizer(directory), description)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelImportError(f"{index} is not a safetensors index ({err})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelImportError(f"{index} names {missing[0].name}, which does not exist")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    torch_only = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" (only PyTorch {torch_only[0]}; re-save with safe_serialization=True)" if torch_only else ""
    raise ModelImportError(f"{directory} has no model.safetensors or {_INDEX}{hint}")


def _config(path: Path, hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelImportError(f"{path}: model_type {model_type!r} is not supported "
                               f"(supported: {', '.join(MODEL_TYPES)})")

    def refuse(key: str, why: str):
        raise ModelImportError(f"{path}: {key} = {json.dumps(hf.get(key))}: {why}")

    rope = hf.get("rope_scaling") or {}
    rope_params = hf.get("rope_parameters") or {}
    for key, spec in (("rope_scaling", rope), ("rope_parameters", rope_params)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            refuse(key, f"rope scaling ({kind}) is not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "partial rotary embeddings are not supported")
    if model_type in ("llama", "mistral") and hf.get("attention_bias"):
        refuse("attention_bias", "biases on every attention projection (o_proj too) are not supported")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) MLPs are supported")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            refuse(key, "mixture-of-experts models are not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    for key in required:
        if not isinstance(hf.get(key), int):
            refuse(key, "required, a positive integer")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kinds = _layer_kinds(hf, model_type, layers)
    window = hf.get("sliding_window") or 512
    theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_len = hf.get("max_position_embeddings", 2048)
    try:
        return ModelConfig(
            name=str(hf.get("_name_or_path") or model_type).split("/")[-1] or model_type,
            vocab_size=hf["vocab_size"], num_layers=layers, d_model=hf["hidden_size"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            ffn_dim=hf["intermediate_size"], max_seq_len=max_len, mlp="swiglu", norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta),
            attention_bias=model_type == "qwen2", attention_pattern=periodic_pattern(kinds),
            window=min(window, max_len), dropout_rate=0.0)
    except ConfigError as err:
        raise ModelImportError(f"{path}: the config gives an invalid model ({err})") from None


def _layer_kinds(hf: dict, model_type: str, layers: int) -> list[str]:
    """Per-layer "window"/"global" as transformers runs the config."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return ["window" if window else "global"] * layers
    if model_type == "qwen2":
        if not hf.get("use_sliding_window") or not window:
            return ["global"] * layers
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
            for i in range(layers)]
        return ["window" if t == "sliding_attention" else "global" for t in types]
    if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
        raise ModelImportError(f"llama config with layer_types {hf['layer_types']}: not supported")
    return ["global"] * layers


def _tokenizer(directory: Path) -> Tokenizer:
    try:
        if (directory / "tokenizer.model").is_file():  # this project's own exports
            return Tokenizer.load(directory / "tokenizer.model")
        return BPETokenizer.from_hf(directory)
    except TokenizerError as err:
        raise ModelImportError(str(err)) from None
