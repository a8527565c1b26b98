"""Sentencepiece tokenizers trained Llama-style, so llama.cpp and transformers agree with us.

    python -m data_pipelines.tokenizer train --input corpus.txt --vocab_size 32000 --out tok
    python -m data_pipelines.tokenizer train --default_corpus --vocab_size 512 --out tok
    python -m data_pipelines.tokenizer encode --model tok.model --text "Hello" [--json]

Training settings that matter for parity with llama.cpp's SPM tokenizer: identity
normalisation (no NFKC), whitespace kept as written, byte fallback (no `<unk>` for unseen
characters), digits split one per piece, and a dummy prefix space (exported as
`tokenizer.ggml.add_space_prefix = true`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from shakti_jax.cli import ArgumentParser, fail

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# 256 byte pieces + 4 control pieces + the chat tokens, plus room for some merges.
MIN_VOCAB = 256 + 4 + len(CHAT_TOKENS) + 16


class TokenizerError(ValueError):
    """Bad tokenizer input; the message is one line naming the file or value."""


def train_tokenizer(input_files: Sequence[str | Path], vocab_size: int, out_prefix: str | Path, *,
                    model_type: str = "bpe", character_coverage: float = 0.9995,
                    input_sentence_size: int = 2_000_000) -> Path:
    """Train and write `<out_prefix>.model` / `.vocab` atomically; returns the .model path."""
    if not input_files:
        raise TokenizerError("no input files given")
    for f in input_files:
        path = Path(f)
        if not path.is_file():
            raise TokenizerError(f"input file {path} does not exist")
        if path.stat().st_size == 0:
            raise TokenizerError(f"input file {path} is empty")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise TokenizerError(f"vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB} "
                             f"(256 byte-fallback pieces + special tokens + merges)")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=out_prefix.parent, prefix=f".{out_prefix.name}.")
    tmp_prefix = Path(tmp_dir) / out_prefix.name
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in input_files], model_prefix=str(tmp_prefix),
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, split_by_whitespace=True,
            max_sentence_length=1 << 16, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(CHAT_TOKENS), num_threads=2, minloglevel=2,
        )
        for suffix in (".model", ".vocab"):
            os.replace(f"{tmp_prefix}{suffix}", f"{out_prefix}{suffix}")
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        names = ", ".join(str(f) for f in input_files)
        raise TokenizerError(f"training on {names} failed: {reason}") from None
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink()
        os.rmdir(tmp_dir)
    return Path(f"{out_prefix}.model")


class Tokenizer:
    """A loaded sentencepiece model with the project's special-token conventions."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: Path):
        self._sp = processor
        self.model_path = model_path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (RuntimeError, OSError):
            raise TokenizerError(f"{path} is not a sentencepiece model") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def chat_token_ids(self) -> dict[str, int]:
        return {piece: self._sp.PieceToId(piece) for piece in CHAT_TOKENS}

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids if i != self.pad_id])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a tokenizer")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="UTF-8 text files")
    source.add_argument("--default_corpus", action="store_true",
                        help="the embedded corpus (standard-library docstrings)")
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    encode = commands.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--model", required=True)
    encode.add_argument("--text", required=True)
    encode.add_argument("--json", action="store_true")
    for sub in (train, encode):
        sub.error = parser.error  # one-line usage errors for subcommands too
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        else:
            tok = Tokenizer.load(args.model)
            ids = tok.encode(args.text)
            print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]})
                  if args.json else " ".join(map(str, ids)))
    except (TokenizerError, OSError) as err:
        fail(str(err))
    return 0


def _train(args) -> None:
    if args.default_corpus:
        from data_pipelines.default_corpus import write_default_corpus

        inputs = [write_default_corpus(Path(f"{args.out}.corpus.txt"))]
    else:
        inputs = args.input
    path = train_tokenizer(inputs, args.vocab_size, args.out)
    tok = Tokenizer.load(path)
    print(f"wrote {path}: {tok.vocab_size} pieces (bos {tok.bos_id}, eos {tok.eos_id}, "
          f"pad {tok.pad_id}, chat {tok.chat_token_ids})")


if __name__ == "__main__":
    sys.exit(main())
