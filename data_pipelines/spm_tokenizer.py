"""Sentencepiece tokenizers trained Llama-style, so llama.cpp and transformers agree with us.

Training settings that matter for parity with llama.cpp's SPM tokenizer: identity
normalisation (no NFKC), whitespace kept as written, byte fallback (no `<unk>` for unseen
characters), digits split one per piece, and a dummy prefix space (exported as
`tokenizer.ggml.add_space_prefix = true`).

Special tokens (`<unk> <s> </s> <pad>` and the chat tokens) are control or unknown pieces,
which sentencepiece never matches inside text: `encode` reads "<|end|>" or "</s>" in data or
prompts as plain characters, and only the chat renderer (`data_pipelines.chat`) inserts their
ids. `encode(text, special=True)` instead reads special-token strings as their ids, as
llama.cpp's `parse_special` and transformers' added tokens do: it cuts the text at them and
encodes each stretch of plain text on its own, so every stretch gets the dummy prefix space:
"<|user|>hi" -> [<|user|>, "▁hi"].
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

from data_pipelines.atomic import write_atomic
from data_pipelines.errors import TokenizerError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *CHAT_TOKENS)
# 256 byte pieces + 4 control pieces + the chat tokens, plus room for some characters and merges.
MIN_VOCAB = 300
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
_CHUNK = 1 << 20


def _check_input(path: Path) -> None:
    """Refuse a missing, unreadable or empty file, or one that is not UTF-8 text."""
    try:
        with path.open("rb") as f:
            size = _check_utf8_text(f, path)
    except FileNotFoundError:
        raise TokenizerError(f"input file {path} does not exist") from None
    except OSError as err:
        raise TokenizerError(f"input file {path} is unreadable: {err.strerror}") from None
    if size == 0:
        raise TokenizerError(f"input file {path} is empty")


def _check_utf8_text(f, path: Path) -> int:
    """Bytes in `f`; raises if they hold a NUL byte or are not UTF-8 (binary files)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while chunk := f.read(_CHUNK):
        nul = chunk.find(b"\0")
        if nul >= 0:
            raise TokenizerError(f"input file {path} is not text: NUL byte at offset {offset + nul}")
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise TokenizerError(f"input file {path} is not UTF-8 text: invalid byte at offset "
                                 f"{offset - pending + err.start}") from None
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise TokenizerError(f"input file {path} is not UTF-8 text: it ends inside a character") from None
    return offset


def train_tokenizer(input_files: Sequence[str | Path], vocab_size: int, out_prefix: str | Path, *,
                    model_type: str = "bpe", character_coverage: float = 0.9995,
                    max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000,
                    seed: int = 0) -> Path:
    """Train on UTF-8 text files (one sentence per line) and write `<out_prefix>.model` / `.vocab`.

    Deterministic for given inputs and seed (`seed` drives sentencepiece's global generator, used
    to sample `input_sentence_size` lines from larger corpora): the same inputs give a
    byte-identical `.model`. Files are written atomically. Returns the `.model` path.
    """
    inputs = [Path(f) for f in input_files]
    if not inputs:
        raise TokenizerError("no input files given")
    for path in inputs:
        _check_input(path)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise TokenizerError(f"vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB} "
                             f"(256 byte-fallback pieces + special tokens + characters)")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs], model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=list(CHAT_TOKENS), num_threads=2, minloglevel=2,
        )
    except RuntimeError as err:
        raise _training_error(err, inputs, vocab_size) from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize()))
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    # .vocab first: a .model that exists is always complete and matches its .vocab.
    write_atomic(Path(f"{out_prefix}.vocab"), vocab.encode("utf-8"))
    return write_atomic(Path(f"{out_prefix}.model"), model.getvalue())


def small_default_tokenizer(folder: str | Path) -> Path:
    """`folder/tok.model`: a 512-piece tokenizer of the first 400,000 characters of the embedded
    default corpus (the tests', the notebooks' and the CPU benchmarks'), trained once."""
    from data_pipelines.default_corpus import write_default_corpus

    folder = Path(folder)
    model = folder / "tok.model"
    if not model.exists():
        train_tokenizer([write_default_corpus(folder / "corpus.txt", max_chars=400_000)], 512, folder / "tok")
    return model


def _training_error(err: RuntimeError, inputs: list[Path], vocab_size: int) -> TokenizerError:
    names = ", ".join(map(str, inputs))
    message = " ".join(str(err).split())
    if "!sentences_.empty()" in message:
        return TokenizerError(f"{names} has no usable text (only blank or over-long lines)")
    limit = re.search(r"Vocabulary size too high.*<= (\d+)", message)
    if limit and int(limit.group(1)) < MIN_VOCAB:
        return TokenizerError(f"{names} has too little text for any vocab_size >= {MIN_VOCAB} "
                              f"(it supports at most {limit.group(1)})")
    if limit:
        return TokenizerError(f"vocab_size={vocab_size} is too large for {names}; "
                              f"this corpus supports at most {limit.group(1)}")
    return TokenizerError(f"training on {names} failed: {message.split('] ')[-1]}")


class SentencePieceTokenizer:
    """A sentencepiece model trained by `train_tokenizer`, with the project's special tokens
    and chat template (`chat_template` is None: `data_pipelines.chat` renders it). Implements
    `data_pipelines.tokenizer.Tokenizer`."""

    kind = "spm"
    add_bos = True
    chat_template = None

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: Path):
        self._sp = processor
        self._model_path = model_path
        self._special_ids = {piece: processor.PieceToId(piece) for piece in SPECIAL_TOKENS}
        self._chat_ids = {piece: self._special_ids[piece] for piece in CHAT_TOKENS}
        self._chat_pieces = {i: piece for piece, i in self._chat_ids.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        """Load a `.model`; raises a one-line `TokenizerError` for a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (RuntimeError, OSError):
            raise TokenizerError(f"{path} is not a sentencepiece model") from None
        reserved = [processor.IdToPiece(i) if i < processor.GetPieceSize() else None for i in range(4)]
        missing = [p for p in CHAT_TOKENS if processor.PieceToId(p) == UNK_ID]
        if reserved != [UNK, BOS, EOS, PAD] or missing:
            raise TokenizerError(f"{path} was not trained by data_pipelines.tokenizer "
                                 f"(needs ids 0-3 = {UNK} {BOS} {EOS} {PAD} and chat tokens "
                                 f"{' '.join(CHAT_TOKENS)})")
        return cls(_chat_tokens_as_control(processor), path)

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def eot_id(self) -> int:
        return self._chat_ids["<|end|>"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return EOS_ID, self.eot_id

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    @property
    def chat_token_ids(self) -> dict[str, int]:
        return dict(self._chat_ids)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               special: bool = False) -> list[int]:
        """Token ids of `text` as plain text: "<|end|>" or "</s>" in it are ordinary characters.

        `special=True` reads special-token strings in `text` as their ids instead (llama.cpp's
        `parse_special`, transformers' default), for chat templates written out by hand.
        """
        ids = [BOS_ID] if add_bos else []
        if not special:
            ids += self._sp.EncodeAsIds(text)
        else:
            for part in _SPECIAL_SPLIT.split(text):
                if part in self._special_ids:
                    ids.append(self._special_ids[part])
                elif part:
                    ids.extend(self._sp.EncodeAsIds(part))
        return ids + [EOS_ID] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, the inverse of `encode`; chat tokens decode to their strings, BOS, EOS
        and padding to nothing."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._chat_pieces:
                out += [self._sp.DecodeIds(run), self._chat_pieces[i]]
                run = []
            elif i != PAD_ID:
                run.append(i)
        return "".join(out) + self._sp.DecodeIds(run)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each piece stands for (byte pieces 1, "▁" one space, special pieces 0)."""
        lengths = np.zeros(self.vocab_size, np.int64)
        special = set(self._special_ids.values())
        for i in range(self.vocab_size):
            piece = self._sp.IdToPiece(i)
            if i in special:
                continue
            if self._sp.IsByte(i):
                lengths[i] = 1
            else:
                lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return lengths

    def save(self, directory: str | Path) -> Path:
        """Write the model as `directory/tokenizer.model` (atomically); returns that path."""
        return write_atomic(Path(directory) / "tokenizer.model", self._model_path.read_bytes())

    def fingerprint(self) -> bytes:
        return hashlib.sha256(self._model_path.read_bytes()).digest()


def _chat_tokens_as_control(processor: spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """The processor with its chat tokens as control pieces, never matched inside text.

    Models trained before this project made them control pieces hold them as user-defined
    pieces, which sentencepiece cuts out of any text that contains them.
    """
    from sentencepiece import sentencepiece_model_pb2

    if all(processor.IsControl(processor.PieceToId(p)) for p in CHAT_TOKENS):
        return processor
    proto = sentencepiece_model_pb2.ModelProto.FromString(processor.serialized_model_proto())
    for piece in proto.pieces:
        if piece.piece in CHAT_TOKENS:
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
