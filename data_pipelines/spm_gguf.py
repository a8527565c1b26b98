"""A sentencepiece model rebuilt from a GGUF file's `llama` tokenizer (tokens, scores, types).

llama.cpp's SPM tokenizer encodes with exactly these pieces and scores, so the rebuilt model
(BPE, byte fallback, identity normalisation, the file's `add_space_prefix`) gives the same ids.
It is how this project's own GGUF exports come back in (`shakti_jax.import_model`); the result
must still pass `Tokenizer.load`'s checks (the project's special tokens).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from data_pipelines.errors import TokenizerError
from data_pipelines.tokenizer import Tokenizer

_KEEP_ALIVE: list[tempfile.TemporaryDirectory] = []  # rebuilt models live until exit


def spm_model_from_gguf(path: Path, fields: dict) -> bytes:
    """The serialized sentencepiece ModelProto of GGUF tokenizer `fields` (values by key)."""
    tokens = fields.get("tokenizer.ggml.tokens")
    scores = fields.get("tokenizer.ggml.scores")
    types = fields.get("tokenizer.ggml.token_type")
    if not tokens or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"{path}: the llama tokenizer needs tokenizer.ggml.tokens, scores and "
                             f"token_type of one length")
    proto = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        if kind not in range(1, 7):
            raise TokenizerError(f"{path}: token {piece!r} has unknown token type {kind}")
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))  # same numbering
    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    for key, attr in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        value = fields.get(f"tokenizer.ggml.{key}_token_id")
        setattr(spec, attr, -1 if value is None else int(value))
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def spm_tokenizer_from_gguf(path: Path, fields: dict) -> Tokenizer:
    """`spm_model_from_gguf` loaded as this project's sentencepiece tokenizer."""
    directory = tempfile.TemporaryDirectory(prefix="spm-from-gguf-")
    _KEEP_ALIVE.append(directory)
    model = Path(directory.name) / "tokenizer.model"
    model.write_bytes(spm_model_from_gguf(path, fields))
    try:
        return Tokenizer.load(model)
    except TokenizerError as err:
        raise TokenizerError(f"{path}: its sentencepiece tokenizer is not one of this project's "
                             f"({err})") from None
