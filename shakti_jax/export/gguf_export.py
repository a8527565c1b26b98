"""GGUF files for llama.cpp from the canonical form, streamed tensor by tensor.

F32/F16/BF16/Q8_0/Q5_0/Q4_0/Q4_1 come from the `gguf` package (byte-identical to ggml's own
quantizers); K-quants (Q4_K_M, Q5_K_M, Q6_K) from llama.cpp's quantizer via the optional
`edge` extra (llama-cpp-python), run on an F32 file written first. Norms stay F32.
A value head (a reward model's or PPO critic's) is left out: the file is the causal LM.

Architecture: `llama` when no layer has a sliding window; otherwise `granite_swa`, which runs a
Llama block with per-layer windows (sliding_window_pattern), logit scale 1 and attention sinks
of -1e30 (so the sinks take no probability mass).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from data_pipelines.atomic import atomic_file
from shakti_jax.config import ModelConfig
from shakti_jax.export.canonical import CanonicalModel, CanonicalTensor, ExportError, canonical_tensors

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclasses.dataclass(frozen=True)
class QuantType:
    name: str
    tensor_type: Q | None  # type of matrices written by the gguf package; None: llama.cpp's quantizer
    file_type: FT
    fallback: Q | None = None  # K-quants: llama.cpp's type for rows that are not multiples of 256

    @property
    def block(self) -> int:
        """Row lengths must be multiples of this (from the gguf package's block table)."""
        return gguf.GGML_QUANT_SIZES[self.fallback if self.tensor_type is None else self.tensor_type][0]


QUANT_TYPES = {q.name: q for q in (
    QuantType("f32", Q.F32, FT.ALL_F32),
    QuantType("f16", Q.F16, FT.MOSTLY_F16),
    QuantType("bf16", Q.BF16, FT.MOSTLY_BF16),
    QuantType("q8_0", Q.Q8_0, FT.MOSTLY_Q8_0),
    QuantType("q5_0", Q.Q5_0, FT.MOSTLY_Q5_0),
    QuantType("q4_0", Q.Q4_0, FT.MOSTLY_Q4_0),
    QuantType("q4_1", Q.Q4_1, FT.MOSTLY_Q4_1),
    QuantType("q4_k_m", None, FT.MOSTLY_Q4_K_M, fallback=Q.Q5_0),  # and Q8_0 for its Q6_K tensors
    QuantType("q5_k_m", None, FT.MOSTLY_Q5_K_M, fallback=Q.Q5_1),  # and Q8_0 for its Q6_K tensors
    QuantType("q6_k", None, FT.MOSTLY_Q6_K, fallback=Q.Q8_0),
)}
EDGE_EXTRA_HINT = "install the edge extra: pip install -e '.[edge]' (llama-cpp-python)"


def quant_type(name: str) -> QuantType:
    key = name.lower()
    if key not in QUANT_TYPES:
        raise ExportError(f"unknown quant type {name!r}; choose from {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[key]


def check_quantizable(canon: CanonicalModel, quant: QuantType) -> None:
    """Fail before writing anything when a row cannot be split into the type's blocks.

    K-quant rows that are not multiples of 256 are left to llama.cpp, which falls back to a
    legacy type for those tensors (as llama-quantize does), whose blocks they must still fit.
    """
    if canon.vocab.model == "gpt2" and canon.vocab.pre is None:
        raise ExportError(f"tokenizer {canon.vocab.path}: its pre-tokenizer is not one llama.cpp "
                          f"knows, so llama.cpp would split text differently; export as hf instead")
    if quant.tensor_type is None:
        _llama_cpp()
    for t in canon.lm_tensors:
        if t.is_matrix and t.shape[1] % quant.block:
            raise ExportError(f"{t.name} has rows of {t.shape[1]} values, not a multiple of "
                              f"{quant.name}'s block of {quant.block}")


def write_gguf(canon: CanonicalModel, path: str | Path, quant: str,
               on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write `canon` as a GGUF file of quant type `quant`, atomically. Returns the path."""
    q = quant_type(quant)
    check_quantizable(canon, q)
    path = Path(path)
    if q.tensor_type is not None:
        with atomic_file(path) as tmp:
            _write(canon, tmp, q, on_tensor)
        return path
    llama_cpp = _llama_cpp()
    with atomic_file(path) as tmp:
        f32_tmp = tmp.with_name(tmp.name + ".f32")  # a helper file of the temporary (atomic.py)
        try:
            _write(canon, f32_tmp, QUANT_TYPES["f32"], on_tensor)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = int(q.file_type)
            if llama_cpp.llama_model_quantize(str(f32_tmp).encode(), str(tmp).encode(), params) != 0:
                raise ExportError(f"llama.cpp could not quantize {path.name} to {q.name}")
        finally:
            f32_tmp.unlink(missing_ok=True)
    return path


def gguf_tensor_count(canon: CanonicalModel) -> int:
    """Tensors in the GGUF file: the LM's canonical ones plus granite_swa's attention sinks."""
    return len(canon.lm_tensors) + (canon.config.num_layers if any(canon.window_layers) else 0)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"K-quants use llama.cpp's quantizer: {EDGE_EXTRA_HINT}") from None
    return llama_cpp


def _tensor_type(t: CanonicalTensor, q: QuantType) -> Q:
    return q.tensor_type if t.is_matrix else Q.F32


def _write(canon: CanonicalModel, path: Path, q: QuantType, on_tensor) -> None:
    cfg = canon.config
    windows = canon.window_layers
    arch = "granite_swa" if any(windows) else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(cfg.name)
    writer.add_size_label(size_label(cfg))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(q.file_type))
    if arch == "granite_swa":
        writer.add_logit_scale(1.0)
        writer.add_sliding_window(cfg.window)
        writer.add_sliding_window_pattern(windows)
    _add_tokenizer(writer, canon)

    tensors = canon.lm_tensors
    if arch == "granite_swa":
        tensors += [_sink(i, cfg.num_heads) for i in range(cfg.num_layers)]
    for t in tensors:  # sizes from the gguf package's block table, for every type
        qtype = _tensor_type(t, q)
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(gguf.quants.quantize(t.load(), _tensor_type(t, q)).view(np.uint8))
        if on_tensor:
            on_tensor(t.name)
    writer.close()


def size_label(cfg: ModelConfig) -> str:
    """gguf's size label of the model's weights ("135M"), as llama.cpp's converter writes it."""
    total = sum(t.numel for t in canonical_tensors(cfg.replace(value_head=False), None, "halves"))
    return gguf.size_label(total, 0, 0, 0)


def _sink(layer: int, num_heads: int) -> CanonicalTensor:
    return CanonicalTensor(f"blk.{layer}.attn_sinks.weight", (num_heads,),
                           lambda: np.full((num_heads,), -1e30, np.float32))


def _add_tokenizer(writer: gguf.GGUFWriter, canon: CanonicalModel) -> None:
    vocab, tok = canon.vocab, canon.vocab.tokenizer
    writer.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.pieces)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.pieces)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_add_space_prefix(True)
    for add, token_id in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_eot_token_id, tok.eot_id), (writer.add_unk_token_id, tok.unk_id),
                          (writer.add_pad_token_id, tok.pad_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)
