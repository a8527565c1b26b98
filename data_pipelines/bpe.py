"""Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2.5, Llama 3), on Hugging Face `tokenizers`.

`BPETokenizer.from_gguf` builds one from a GGUF file's metadata so that its ids are
llama.cpp's for that file: the vocabulary and merges as stored, control (and unknown) tokens as
special added tokens (matched in text only with `special=True`, like llama.cpp's
`parse_special`), user-defined tokens as plain added tokens (always matched), and the text
split before BPE by the regexes llama.cpp picks for `tokenizer.ggml.pre` (llama-vocab.cpp),
each an isolating `Split`, then mapped to GPT-2's byte alphabet. `from_hf` reads a Hugging Face
folder (tokenizer.json + tokenizer_config.json) as it is; `save` writes such a folder.

The models' own chat templates are rendered here as transformers renders them
(`render_template`); `data_pipelines.chat` turns renderings into ids and loss masks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

import gguf
import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from data_pipelines.atomic import write_atomic
from data_pipelines.cli import one_line
from data_pipelines.errors import DataError, TokenizerError

# llama.cpp's regexes (llama-vocab.cpp); HF tokenizer.json files spell the contractions (?i:...).
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class _Pre:
    splits: tuple[str, ...]  # regexes applied in turn, each splitting the pieces of the last
    ignore_merges: bool = False  # a word that is a token is taken whole
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_PRE = {"gpt-2": _Pre((_GPT2,)), "smollm": _Pre((r"\p{N}", _GPT2)), "qwen2": _Pre((_QWEN2,)),
        "llama-bpe": _Pre((_LLAMA3,), ignore_merges=True, add_bos=True)}
_CANONICAL = tuple(_PRE)  # the names `gguf_vocab` reports for HF tokenizers
# Other names llama.cpp gives exactly the same splits and flags.
_PRE |= {alias: _PRE[name] for alias, name in (("phi-2", "gpt-2"), ("starcoder", "smollm"),
                                               ("deepseek-r1-qwen", "qwen2"), ("llama3", "llama-bpe"),
                                               ("llama-v3", "llama-bpe"))}


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(rest)}}


_BYTE_OF = _byte_alphabet()


class BPETokenizer:
    """A byte-level BPE tokenizer with its special tokens, BOS rule and chat template.
    Implements `data_pipelines.tokenizer.Tokenizer`."""

    kind = "bpe"

    def __init__(self, tok: tokenizers.Tokenizer, *, eos: int, bos: int | None = None,
                 pad: int | None = None, unk: int | None = None, eot: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None, pre: str | None = None):
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())  # special strings stay text
        self._plain.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._pieces = [f"[PAD{i}]" for i in range(self.vocab_size)]  # gaps: unused ids
        for piece, i in vocab.items():
            self._pieces[i] = piece
        added = tok.get_added_tokens_decoder()
        self.special_ids = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._bytes = [added[i].content.encode() if i in added else _piece_bytes(p)
                       for i, p in enumerate(self._pieces)]  # what each id decodes to
        special = set(self.special_ids.values())
        self._lengths = np.array([0 if i in special else len(b) for i, b in enumerate(self._bytes)],
                                 np.int64)
        if add_bos and bos is None:
            raise TokenizerError("the tokenizer asks for a BOS token (add_bos_token) but names none")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos, eos, pad, unk
        self.add_bos, self.chat_template, self._pre = add_bos, chat_template, pre
        if eot is None and chat_template:
            eot = self.special_ids.get(_template_end_of_turn(chat_template, self))
        self.eot_id = eos if eot is None else eot
        # Decoding drops a BOS the tokenizer adds itself and padding that is no other token.
        self._skip = {i for i in ((bos if add_bos else None),
                                  (pad if pad not in (eos, self.eot_id, bos) else None)) if i is not None}

    def __setstate__(self, state: dict) -> None:
        """Unpickling (grain worker processes) loses `encode_special_tokens`; set it again."""
        self.__dict__.update(state)
        self._plain.encode_special_tokens = True

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | Path | gguf.GGUFReader) -> BPETokenizer:
        """The tokenizer of a GGUF file (`tokenizer.ggml.model = gpt2`), as llama.cpp reads it."""
        if isinstance(source, gguf.GGUFReader):
            reader, name = source, getattr(source.data, "filename", "the GGUF file")
        else:
            try:
                reader, name = gguf.GGUFReader(source), source
            except (OSError, ValueError) as err:
                raise TokenizerError(f"{source} is not a readable GGUF file ({one_line(err)})") from None

        def field(key: str, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
        if model != "gpt2":
            raise TokenizerError(f"{name}: tokenizer.ggml.model is {model!r}, not 'gpt2' (byte-level BPE)")
        if pre not in _PRE:
            raise TokenizerError(f"{name}: tokenizer.ggml.pre {pre!r} is not a supported pre-tokenizer "
                                 f"(supported: {', '.join(sorted(_PRE))})")
        tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
        types = field("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens or ())
        if not tokens or merges is None or len(types) != len(tokens):
            raise TokenizerError(f"{name}: a gpt2 tokenizer needs tokenizer.ggml.tokens, merges and "
                                 f"token_type (of the tokens' length)")
        ids = {key: field(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding",
                                                                       "unknown", "eot")}
        ids = {key: int(i) if i is not None and 0 <= i < len(tokens) else None for key, i in ids.items()}
        if ids["eos"] is None:
            raise TokenizerError(f"{name}: names no eos token (tokenizer.ggml.eos_token_id)")
        spec = _PRE[pre]
        add_bos = bool(field("tokenizer.ggml.add_bos_token", spec.add_bos))
        tok = _build(tokens, merges, types, spec, ids["bos"] if add_bos else None, name)
        return cls(tok, eos=ids["eos"], bos=ids["bos"], pad=ids["padding"], unk=ids["unknown"],
                   eot=ids["eot"], add_bos=add_bos, chat_template=field("tokenizer.chat_template"),
                   pre=pre)

    @classmethod
    def from_hf(cls, directory: str | Path) -> BPETokenizer:
        """The tokenizer of a Hugging Face folder: tokenizer.json (byte-level BPE only) with
        tokenizer_config.json, special_tokens_map.json, generation_config.json and
        chat_template.jinja where present."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory} has no tokenizer.json")
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
        except (OSError, UnicodeError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{path} is unreadable as tokenizer.json ({err})") from None
        problem = _not_byte_level(spec)
        if problem:
            raise TokenizerError(f"{path} {problem}")
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # noqa: BLE001 - the Rust loader raises plain Exceptions
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({err})") from None
        config = _read_json(directory / "tokenizer_config.json")
        tokens_map = _read_json(directory / "special_tokens_map.json")
        generation = _read_json(directory / "generation_config.json")

        def token_id(name: str) -> int | None:
            value = config.get(name, tokens_map.get(name))
            content = value.get("content") if isinstance(value, dict) else value
            return tok.token_to_id(content) if isinstance(content, str) else None

        eos, bos = token_id("eos_token"), token_id("bos_token")
        if eos is None:
            gen_eos = generation.get("eos_token_id")
            eos = gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos
        if not isinstance(eos, int):
            raise TokenizerError(f"{directory} names no eos token (tokenizer_config.json eos_token)")
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos is not None and _post_processor_adds(spec.get("post_processor"),
                                                               tok.id_to_token(bos))
        pre = config["gguf_pre"] if "gguf_pre" in config else _pre_name(spec)
        return cls(tok, eos=eos, bos=bos, pad=token_id("pad_token"), unk=token_id("unk_token"),
                   eot=token_id("eot_token"), add_bos=add_bos,
                   chat_template=_chat_template(config, directory), pre=pre)

    # -- the interface ---------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.eos_id, self.eot_id)))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               special: bool = False) -> list[int]:
        """Ids of `text`; special-token strings are plain text unless `special=True`."""
        ids = (self._tok if special else self._plain).encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens decode to their text, except a BOS the tokenizer adds
        itself (`add_bos`) and padding that is not also EOS or end of turn."""
        data = b"".join(self._bytes[i] for i in map(int, ids) if i not in self._skip)
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[int(token_id)]

    def byte_lengths(self) -> np.ndarray:
        return self._lengths.copy()

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer_config.json, then tokenizer.json (atomically); returns the latter."""
        files = self.hf_files()
        write_atomic(Path(directory) / "tokenizer_config.json", files["tokenizer_config.json"].encode())
        return write_atomic(Path(directory) / "tokenizer.json", files["tokenizer.json"].encode())

    def fingerprint(self) -> bytes:
        return hashlib.sha256(json.dumps(self.hf_files(), sort_keys=True).encode()).digest()

    # -- for the exporters -----------------------------------------------------------------

    def hf_files(self) -> dict[str, str]:
        """File name -> text of the Hugging Face folder files (tokenizer.json, tokenizer_config.json)."""
        tokens = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
                  "unk_token": self.unk_id, "eot_token": self.eot_id}  # eot_token: ours
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **{name: None if i is None else self._pieces[i] for name, i in tokens.items()},
                  "add_bos_token": self.add_bos, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "gguf_pre": self._pre}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return {"tokenizer.json": self._tok.to_str(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}

    def gguf_vocab(self) -> dict:
        """The vocabulary as GGUF stores it: `tokens` (id order), `token_types` (gguf.TokenType
        values), `merges` ("a b"), `pre` (llama.cpp's pre-tokenizer name; None if it has none)."""
        added = self._tok.get_added_tokens_decoder()
        vocab = set(self._tok.get_vocab(with_added_tokens=True).values())
        types = [gguf.TokenType.CONTROL if i in added and added[i].special else
                 gguf.TokenType.USER_DEFINED if i in added else
                 gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED
                 for i in range(self.vocab_size)]
        merges = json.loads(self._tok.to_str())["model"]["merges"]
        return {"tokens": list(self._pieces), "token_types": [int(t) for t in types],
                "merges": [m if isinstance(m, str) else " ".join(m) for m in merges], "pre": self._pre}


def _piece_bytes(piece: str) -> bytes:
    """The bytes a byte-level vocabulary entry stands for."""
    return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode() for c in piece)


def _build(tokens: list[str], merges: list[str], types: list[int], spec: _Pre, bos: int | None,
           name) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a GGUF vocabulary, splitting text as llama.cpp does; `bos`
    is the BOS it adds when transformers encodes with special tokens."""
    vocab = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise TokenizerError(f"{name}: token {token!r} appears twice (ids {vocab[token]} and {i})")
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp splits them
        pairs.append((merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, ""))
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])
    if bos is not None:  # so transformers adds BOS as llama.cpp does
        text = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{text}:0 $A:0", pair=f"{text}:0 $A:0 {text}:1 $B:1", special_tokens=[(text, bos)])
    return tok


def _types(node) -> set[str]:
    """Component types in a tokenizer.json pre_tokenizer / decoder (nested Sequences too)."""
    if not isinstance(node, dict):
        return set()
    found = {node.get("type")}
    for key in ("pretokenizers", "decoders", "processors"):
        for child in node.get(key) or ():
            found |= _types(child)
    return found


def _not_byte_level(spec: dict) -> str | None:
    """Why a tokenizer.json is not byte-level BPE, or None."""
    model = spec.get("model") or {}
    kind = model.get("type")
    parts = _types(spec.get("pre_tokenizer")) | _types(spec.get("decoder"))
    if kind != "BPE":
        return f"is a {kind or 'unknown'} tokenizer, not byte-level BPE"
    if model.get("byte_fallback") or "Metaspace" in parts:
        return "is a sentencepiece-style BPE (Metaspace, byte fallback), not byte-level BPE"
    if "ByteLevel" not in _types(spec.get("pre_tokenizer")) or "ByteLevel" not in _types(spec.get("decoder")):
        return "has no ByteLevel pre-tokenizer and decoder, so it is not byte-level BPE"
    return None


def _splits(node: dict) -> list[str] | None:
    """The regexes a tokenizer.json pre_tokenizer splits with, in llama.cpp's spelling; None
    for anything llama.cpp cannot do."""
    kind = node.get("type")
    if kind == "Sequence":
        parts = [_splits(child) for child in node["pretokenizers"]]
        return None if None in parts else [r for p in parts for r in p]
    if kind == "Split" and node.get("behavior") == "Isolated" and not node.get("invert") \
            and "Regex" in node.get("pattern", {}):
        return [node["pattern"]["Regex"].replace(_HF_CONTRACTIONS, _CONTRACTIONS)]
    if kind == "Digits" and node.get("individual_digits"):
        return [r"\p{N}"]
    if kind == "ByteLevel" and not node.get("add_prefix_space"):
        return [_GPT2] if node.get("use_regex", True) else []
    return None


def _pre_name(spec: dict) -> str | None:
    """llama.cpp's name for a tokenizer.json's pre-tokenization, or None if it has none."""
    splits = _splits(spec.get("pre_tokenizer") or {})
    ignore = bool((spec.get("model") or {}).get("ignore_merges"))
    return next((name for name in _CANONICAL if splits is not None
                 and (tuple(splits), ignore) == (_PRE[name].splits, _PRE[name].ignore_merges)), None)


def _post_processor_adds(node, bos: str) -> bool:
    """Whether a tokenizer.json post_processor puts `bos` in front of a single sequence."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Sequence":
        return any(_post_processor_adds(p, bos) for p in node.get("processors") or ())
    first = (node.get("single") or [{}])[0] if node.get("type") == "TemplateProcessing" else {}
    return first.get("SpecialToken", {}).get("id") == bos


def _chat_template(config: dict, directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path} is unreadable ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


# -- chat templates ----------------------------------------------------------------------

def template_variables(tokenizer) -> dict[str, str]:
    """The special-token names templates read (`bos_token`, ...), for the tokens it has."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
           "unk_token": tokenizer.unk_id, "pad_token": tokenizer.pad_id}
    return {name: tokenizer.id_to_piece(i) for name, i in ids.items() if i is not None}


def render_template(template: str, messages: Sequence[tuple[str, str]], *,
                    add_generation_prompt: bool = False, variables: dict[str, str]) -> str:
    """A chat template rendered as transformers' `apply_chat_template` renders it; a template
    that refuses the conversation (`raise_exception`) is a one-line DataError."""
    try:
        return _compile(template).render(
            messages=[{"role": role, "content": content} for role, content in messages],
            tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as err:
        raise DataError(f"the chat template refused the conversation: {one_line(err)}") from None


def _template_end_of_turn(template: str, tokenizer: BPETokenizer) -> str | None:
    """The first special token `template` writes after an assistant turn's content (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`), or None."""
    try:
        text = render_template(template, [("user", "\ue000"), ("assistant", "\ue001")],
                               variables=template_variables(tokenizer))
    except (TokenizerError, DataError):
        return None
    after = text.partition("\ue001")[2]
    found = [(after.find(t), -len(t), t) for t in tokenizer.special_ids if t in after]
    return min(found)[2] if found else None


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template in a sandbox set up as transformers sets it up for `apply_chat_template`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as err:
        raise TokenizerError(f"the chat template does not compile: {one_line(err)}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
