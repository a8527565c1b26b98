"""The tokenizer interface, its loader, and the tokenizer CLI.

    python -m data_pipelines.tokenizer train --input corpus.txt --vocab_size 32000 --out tok
    python -m data_pipelines.tokenizer train --default_corpus --vocab_size 512 --out tok
    python -m data_pipelines.tokenizer encode --model tok.model --text "Hello" [--special] [--json]

Two implementations, registered as (virtual) subclasses of `Tokenizer` so that they need not
import this module: this project's sentencepiece models (`data_pipelines.spm_tokenizer`,
trained by `train_tokenizer`; its names stay importable from here) and the byte-level BPE
tokenizers of imported pretrained models (`data_pipelines.bpe`). Either way, `encode` reads
special-token strings in text as plain characters unless `special=True`, so data can never
fake control tokens; only the chat renderer (`data_pipelines.chat`) puts them in.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipelines.bpe import BPETokenizer
from data_pipelines.cli import ArgumentParser, run_main
from data_pipelines.errors import TokenizerError
from data_pipelines.spm_tokenizer import (BOS, BOS_ID, CHAT_TOKENS, EOS, EOS_ID, MIN_VOCAB, PAD, PAD_ID,
                                          SPECIAL_TOKENS, UNK, UNK_ID, SentencePieceTokenizer,
                                          small_default_tokenizer, train_tokenizer)

__all__ = ["Tokenizer", "TokenizerError", "BPETokenizer", "SentencePieceTokenizer", "train_tokenizer",
           "small_default_tokenizer",
           "BOS", "BOS_ID", "CHAT_TOKENS", "EOS", "EOS_ID", "MIN_VOCAB", "PAD", "PAD_ID",
           "SPECIAL_TOKENS", "UNK", "UNK_ID", "main"]


class Tokenizer(abc.ABC):
    """What the data pipelines, training, generation and the exporters use of a tokenizer."""

    kind: str  # "spm" or "bpe"
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    eot_id: int  # ends an assistant turn (the chat template's end-of-turn token)
    add_bos: bool  # documents and prompts start with BOS
    chat_template: str | None  # jinja source; None for this project's own template
    special_ids: dict[str, int]  # special (control) token text -> id
    stop_ids: tuple[int, ...]  # the ids that end generation: EOS and end of turn, once each

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               special: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it are plain text unless `special=True`."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: BOS and padding decode to nothing, other special tokens to their text."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`."""

    @abc.abstractmethod
    def byte_lengths(self) -> np.ndarray:
        """int [vocab_size]: UTF-8 bytes each token adds to decoded text, 0 for special tokens."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer's files atomically into `directory`; returns the path `load` takes."""

    @abc.abstractmethod
    def fingerprint(self) -> bytes:
        """A digest of everything that decides the ids (stable across processes and saves)."""

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """A `.model` (sentencepiece), or `tokenizer.json` / a folder holding one (byte-level
        BPE). Raises a one-line `TokenizerError` naming `path` for anything else."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return BPETokenizer.from_hf(path)
            if (path / "tokenizer.model").is_file():
                return SentencePieceTokenizer.from_file(path / "tokenizer.model")
            raise TokenizerError(f"folder {path} holds no tokenizer.json or tokenizer.model")
        if path.name == "tokenizer.json":
            return BPETokenizer.from_hf(path.parent)
        return SentencePieceTokenizer.from_file(path)


Tokenizer.register(SentencePieceTokenizer)
Tokenizer.register(BPETokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data_pipelines.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece tokenizer")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="UTF-8 text files")
    source.add_argument("--default_corpus", action="store_true",
                        help="the embedded corpus (standard-library docstrings), saved as PREFIX.corpus.txt")
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    encode = commands.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--model", required=True, help="a .model, tokenizer.json or a folder holding one")
    encode.add_argument("--text", required=True)
    encode.add_argument("--special", action="store_true",
                        help="read special-token strings such as <|end|> as their ids")
    encode.add_argument("--json", action="store_true", help="print ids and pieces as JSON")
    for sub in (train, encode):
        sub.error = parser.error  # one-line usage errors for subcommands too
    args = parser.parse_args(argv)
    if args.command == "train":
        _train(args)
    else:
        tok = Tokenizer.load(args.model)
        ids = tok.encode(args.text, special=args.special)
        print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]})
              if args.json else " ".join(map(str, ids)))
    return 0


def _train(args) -> None:
    if args.default_corpus:
        from data_pipelines.default_corpus import write_default_corpus

        inputs = [write_default_corpus(Path(f"{args.out}.corpus.txt"))]
    else:
        inputs = args.input
    path = train_tokenizer(inputs, args.vocab_size, args.out)
    tok = SentencePieceTokenizer.from_file(path)
    print(path)
    print(f"{tok.vocab_size} pieces from {', '.join(map(str, inputs))}; unk/bos/eos/pad = "
          f"{tok.unk_id}/{tok.bos_id}/{tok.eos_id}/{tok.pad_id}; chat tokens {tok.chat_token_ids}")


if __name__ == "__main__":
    run_main(main)
