"""Hugging Face folders (config.json, model.safetensors, tokenizer) from the canonical form.

A sentencepiece tokenizer is written as tokenizer.json (see `tokenizer_json`) next to
tokenizer.model; a byte-level BPE tokenizer as its own tokenizer.json and tokenizer_config.json.
Both carry the chat template, and generation_config.json lists EOS and the end-of-turn token
as `eos_token_id`, so transformers' `generate` stops at the end of an assistant turn.
The class follows the attention pattern: Llama without windows, Mistral when every layer has
the same window, Qwen2 (per-layer `layer_types`, zero q/k/v biases) when only some do. A
model with a value head (`model.value_head`: a reward model) is written as that class's
`...ForSequenceClassification` with one label: the backbone, `score.weight` [1, D] and no LM
head; transformers reads the score at the last token that is not `pad_token_id` (the
tokenizer's pad, or EOS when it has none, so a row must not end in it). Weights
are written in safetensors format without torch, streamed tensor by tensor (the format is a
JSON header of shapes and offsets followed by raw little-endian data, so the header can be
written before any tensor is converted).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
from gguf import TokenType

from data_pipelines.atomic import atomic_dir
from data_pipelines.tokenizer import BOS, BOS_ID, CHAT_TOKENS, EOS, PAD, UNK
from shakti_jax.export.canonical import (OWN_CHAT_TEMPLATE, VALUE_HEAD, CanonicalModel, CanonicalTensor,
                                        ExportError, Vocabulary)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight",
                 VALUE_HEAD: "score.weight"}
# weight dtype: (safetensors code, config.json torch dtype, numpy dtype)
HF_DTYPES = {"f32": ("F32", "float32", np.dtype("<f4")),
             "bf16": ("BF16", "bfloat16", np.dtype(ml_dtypes.bfloat16)),
             "f16": ("F16", "float16", np.dtype("<f2"))}



def hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, layer, part, suffix = name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def architecture(canon: CanonicalModel) -> str:
    windows = canon.window_layers
    if canon.config.attention_bias:
        return "qwen2"  # Llama's attention_bias would add an o_proj bias too
    if not any(windows):
        return "llama"
    return "mistral" if all(windows) else "qwen2"


def hf_config(canon: CanonicalModel, dtype: str = "f32") -> dict:
    cfg = canon.config
    arch = architecture(canon)
    head = "ForSequenceClassification" if cfg.value_head else "ForCausalLM"
    config = {
        "architectures": [{"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch] + head],
        "model_type": arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0, "dtype": HF_DTYPES[dtype][1], **_special_ids(canon),
    }
    if cfg.value_head:
        config.update(num_labels=1)
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        config.update(sliding_window=cfg.window)
    else:
        windows = canon.window_layers
        config.update(use_sliding_window=any(windows), sliding_window=cfg.window if any(windows) else None,
                      max_window_layers=0,
                      layer_types=["sliding_attention" if w else "full_attention" for w in windows])
    return config


def write_hf(canon: CanonicalModel, out_dir: str | Path, dtype: str = "f32",
             on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write a Hugging Face model folder atomically (a finished folder, or none). Returns it."""
    if canon.rope_pairing != "halves":
        raise ExportError("HF Llama/Mistral/Qwen2 rotate halves: canonicalize with rope_pairing='halves'")
    if dtype not in HF_DTYPES:
        raise ExportError(f"HF weights are {', '.join(HF_DTYPES)}, not {dtype!r}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        _write_safetensors(tmp / "model.safetensors", list(_hf_tensors(canon)), dtype, on_tensor)
        (tmp / "config.json").write_text(json.dumps(hf_config(canon, dtype), indent=2) + "\n")
        if canon.vocab.model == "gpt2":
            for name, text in canon.vocab.tokenizer.hf_files().items():
                (tmp / name).write_text(text)
        else:
            shutil.copyfile(canon.vocab.tokenizer.model_path, tmp / "tokenizer.model")
            (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(canon.vocab), ensure_ascii=False))
            (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(canon), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(canon), indent=2) + "\n")
    return out_dir


def _special_ids(canon: CanonicalModel) -> dict:
    tok = canon.vocab.tokenizer
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id}


def generation_config(canon: CanonicalModel) -> dict:
    """transformers' `generate` stops at any id of the `eos_token_id` list: EOS and end of turn."""
    return {**_special_ids(canon), "eos_token_id": list(canon.vocab.tokenizer.stop_ids)}


def is_hf_export(path: str | Path) -> bool:
    """Whether `path` is a folder `write_hf` may replace: an earlier export, or empty."""
    path = Path(path)
    return path.is_dir() and (not any(path.iterdir()) or
                              all((path / name).is_file() for name in ("config.json", "model.safetensors")))


def hf_tensor_count(canon: CanonicalModel) -> int:
    """Tensors in model.safetensors (the canonical ones plus Qwen2's zero biases)."""
    return sum(1 for _ in _hf_tensors(canon))


def _hf_tensors(canon: CanonicalModel) -> Iterator[tuple[str, CanonicalTensor]]:
    qkv_bias = architecture(canon) == "qwen2" and not canon.config.attention_bias  # zeros
    for t in canon.tensors:
        if canon.config.value_head and t.name == "output.weight":
            continue  # a sequence classifier has no LM head
        yield hf_name(t.name), t
        if qkv_bias and t.name.split(".")[-2] in ("attn_q", "attn_k", "attn_v"):
            rows = t.shape[0]
            bias = CanonicalTensor(t.name.replace(".weight", ".bias"), (rows,),
                                   lambda rows=rows: np.zeros((rows,), np.float32))
            yield hf_name(bias.name), bias


def _write_safetensors(path: Path, tensors: list[tuple[str, CanonicalTensor]], dtype: str,
                       on_tensor) -> None:
    code, _, np_dtype = HF_DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        size = np_dtype.itemsize * int(np.prod(t.shape))
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, t in tensors:
            f.write(to_dtype(t.load(), dtype).tobytes())
            if on_tensor:
                on_tensor(name)


def to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` in HF weight dtype `dtype` (little-endian; bf16 by ml_dtypes: nearest even, NaN kept)."""
    with np.errstate(invalid="ignore"):  # NaN casts quietly, as NaN
        return np.ascontiguousarray(x, np.float32).astype(HF_DTYPES[dtype][2])


def tokenizer_json(vocab: Vocabulary) -> dict:
    """A `tokenizers` BPE tokenizer that encodes exactly as sentencepiece and llama.cpp do.

    Written by hand rather than left to transformers' converter, whose Metaspace pre-tokenizer
    skips the dummy prefix when text already starts with a space. Here the prefix is a
    normalizer, so every stretch between special tokens gets it, as in llama.cpp. Merges are
    every split of a normal piece into two vocabulary pieces, ranked by the merged piece's score.
    """
    ids = {piece: i for i, piece in enumerate(vocab.pieces)}
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(vocab.pieces, vocab.scores, vocab.types)):
        if kind != TokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    special = [i for i, kind in enumerate(vocab.types) if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
               or vocab.pieces[i] in CHAT_TOKENS]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": vocab.pieces[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": ids, "merges": [[m[4], m[5]] for m in ranked]},
    }


def _tokenizer_config(canon: CanonicalModel) -> dict:
    added = {str(i): {"content": p, "special": True, "normalized": False, "lstrip": False,
                      "rstrip": False, "single_word": False}
             for i, p in enumerate(canon.vocab.pieces) if p in (UNK, BOS, EOS, PAD) + CHAT_TOKENS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "unk_token": UNK, "pad_token": PAD, "added_tokens_decoder": added,
        "additional_special_tokens": list(CHAT_TOKENS), "clean_up_tokenization_spaces": False,
        "model_max_length": canon.config.max_seq_len, "chat_template": OWN_CHAT_TEMPLATE,
    }
