"""Byte-level BPE: ids identical to llama.cpp's and transformers' for the same GGUF (SmolLM2, and
its vocabulary under the qwen2 / llama-bpe / gpt-2 pre-tokenizers), save/load round trips,
and one-line errors for tokenizers it cannot read."""

import copy
import json
import pickle
import unicodedata

from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers

from data_pipelines.bpe import BPETokenizer
from data_pipelines.tokenizer import Tokenizer, TokenizerError

BATTERY = [
    "Hello, world! How are you?", "", " ", "\n", "naïve café résumé Ångström façade",
    "e\u0301 a\u0300 n\u0303 combining marks", "Ελληνικά Русский текст עברית العربية हिन्दी ไทย",
    "日本語のテキストと中文字符，한국어 텍스트。", "👩‍👩‍👧‍👦 🎉🇺🇸 ❤️ 🤖x", "a  b   c    d",
    "  leading and trailing  ", "\t\ttabs\tand\nnewlines\n\n\nend", "line\r\nwindows\r\n\r\n",
    "x\u00a0y\u2003z\u3000w\u2028v", "3.14159 1,000,000 12345678901234567890 2²", "½ ²³ ٣٤٥ Ⅻ",
    "0x1F 007 2024-11-05 $19.99 -42 +7e10",
    "def f(x):\n    return x**2  # square\n\tif (a&&b) { c->d[0] = \"s\"; }\n", "    indented\n        more",
    "don't I'll we've they're she'd it's DON'T I'M You'Re 'quoted' o'clock ''", "ſ long s, K Kelvin",
    "a\u200bb zero width, soft\u00adhyphen", "private \ue000\uf8ff use",
    "https://example.com/p?q=1&r=2#f a@b.org",
    "!!!???... ---- ==== ****", "a" * 60, "ᚠᛇᚻ᛫ runes ⅋ ∑∫√ ≠≤",
    "unassigned \u0378\u0379, controls \x00\x01\x1f\x7f\x85, \U0001F9FF\U000E0001",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><repo_name>x<file_sep>y", "<|im_start|<|im_end|>>",
    "text<|endoftext|>more<|im_end|>",
]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "wikitext2_valid.txt"


def _spaced_numeral(text: str) -> bool:
    """A space before a non-ASCII number: transformers' GGUF converter splits smollm text with the
    GPT-2 regex alone, without llama.cpp's (and SmolLM2's own tokenizer.json's) digit split
    first, so " ½" becomes "ĠÂ" "½" there."""
    return any(a == " " and ord(b) > 127 and unicodedata.category(b)[0] == "N"
               for a, b in zip(text, text[1:]))


@pytest.fixture(scope="module")
def reader(smollm_gguf):
    return gguf.GGUFReader(smollm_gguf)


@pytest.fixture(scope="module")
def tok(reader):
    return BPETokenizer.from_gguf(reader)


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _wikitext(lines: int) -> list[str]:
    """The first lines of the shared WikiText-2 validation text ([] when it is absent)."""
    return WIKITEXT.read_text(encoding="utf-8").splitlines()[:lines] if WIKITEXT.is_file() else []


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    return _llama(smollm_gguf)


def test_smollm2_metadata(tok):
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == \
        ("bpe", 49152, 1, 2, 2, 0)
    assert tok.eot_id == 2 and tok.stop_ids == (2,) and tok.add_bos is False  # <|im_end|>, from the template
    assert list(tok.special_ids)[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert sorted(tok.special_ids.values()) == list(range(17))
    assert tok.chat_template.startswith("{% for message in messages %}")
    lengths = tok.byte_lengths()
    assert lengths.shape == (49152,) and not lengths[:17].any()
    for text in BATTERY:
        assert lengths[tok.encode(text, special=True)].sum() == len(text.encode()) - sum(
            len(t.encode()) * text.count(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                                      "<repo_name>", "<file_sep>"))


def test_battery_matches_llama_cpp(tok, llm):
    for text in BATTERY:
        for special in (False, True):
            ids = tok.encode(text, special=special)
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=special), (text, special)
            assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>", special=True) == [2] and 2 not in tok.encode("<|im_end|>")
    again = pickle.loads(pickle.dumps(tok))  # as grain worker processes get it
    assert again.encode(BATTERY[-1]) == tok.encode(BATTERY[-1]) != again.encode(BATTERY[-1], special=True)


def test_battery_matches_transformers(tok, smollm_hf_tokenizer):
    for text in BATTERY:
        if _spaced_numeral(text):  # transformers' converter lacks smollm's digit split there
            continue
        for special in (False, True):
            assert tok.encode(text, special=special) == \
                smollm_hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special), (text, special)


def test_wikitext_matches_llama_cpp_and_transformers(tok, llm, smollm_hf_tokenizer, shared_data):
    lines = (shared_data / "pretrain" / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()[:2000]
    ours = [tok.encode(line) for line in lines]
    assert ours == [llm.tokenize(line.encode(), add_bos=False, special=False) for line in lines]
    assert ours == smollm_hf_tokenizer(lines, add_special_tokens=False)["input_ids"]
    assert all(tok.decode(ids) == line for ids, line in zip(ours, lines))
    assert len(lines) == 2000 and sum(map(len, ours)) > 100_000


def _write_gguf(path, reader, pre: str, *, tiny: bool = False, **fields):
    """A vocabulary-only llama GGUF with SmolLM2's tokens and merges (or two tokens) under
    another pre-tokenizer."""
    get = lambda key: reader.fields[key].contents()  # noqa: E731
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(fields.pop("model", "gpt2"))
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b"] if tiny else get("tokenizer.ggml.tokens"))
    w.add_token_types([1, 1] if tiny else get("tokenizer.ggml.token_type"))
    w.add_token_merges(["a b"] if tiny else get("tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(1 if tiny else 2)
    for name, value in fields.items():
        getattr(w, f"add_{name}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_other_pre_tokenizers_match_llama_cpp(reader, tmp_path, pre):
    path = _write_gguf(tmp_path / f"{pre}.gguf", reader, pre)  # no add_bos_token: llama.cpp's default
    tok, llm = BPETokenizer.from_gguf(path), _llama(path)
    assert tok.add_bos is (pre == "llama-bpe")
    for text in BATTERY + _wikitext(300):
        for special in (False, True):
            assert tok.encode(text, add_bos=tok.add_bos, special=special) == \
                llm.tokenize(text.encode(), add_bos=True, special=special), (pre, text, special)
    assert tok.gguf_vocab()["pre"] == pre


def test_save_and_load_round_trip(tok, reader, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file()
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["eot_token"] == "<|im_end|>" and config["gguf_pre"] == "smollm"
    assert config["add_bos_token"] is False and config["chat_template"] == tok.chat_template
    for again in (Tokenizer.load(path), Tokenizer.load(path.parent), BPETokenizer.from_hf(path.parent)):
        assert isinstance(again, BPETokenizer) and again.fingerprint() == tok.fingerprint()
        assert [again.encode(t, special=s) for t in BATTERY for s in (False, True)] == \
            [tok.encode(t, special=s) for t in BATTERY for s in (False, True)]
        assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.eot_id, again.add_bos,
                again.chat_template, again.special_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id,
                                                            tok.eot_id, tok.add_bos, tok.chat_template,
                                                            tok.special_ids)
        assert (again.byte_lengths() == tok.byte_lengths()).all()
    vocab = again.gguf_vocab()
    assert vocab["tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert vocab["token_types"] == reader.fields["tokenizer.ggml.token_type"].contents()
    assert vocab["merges"] == reader.fields["tokenizer.ggml.merges"].contents() and vocab["pre"] == "smollm"
    changed = copy.copy(tok)
    changed.add_bos = True
    assert changed.fingerprint() != tok.fingerprint()


def test_saved_folder_works_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in BATTERY:
        assert hf.encode(text, add_special_tokens=True) == tok.encode(text, add_bos=tok.add_bos, special=True)
    assert hf.eos_token == "<|im_end|>" and hf.decode(tok.encode("naïve 日本")) == "naïve 日本"


def test_workdir_keeps_its_own_copy(tok, tmp_path):
    from ml_collections import ConfigDict

    from shakti_jax.train.workdir import prepare_tokenizer, workdir_tokenizer

    config = ConfigDict({"stage": "sft", "data": {"tokenizer": str(tok.save(tmp_path / "src"))}})
    copied = prepare_tokenizer(config, tmp_path / "run", None, 49152)
    assert workdir_tokenizer(tmp_path / "run") == tmp_path / "run" / "tokenizer.json"
    assert (tmp_path / "run" / "tokenizer_config.json").is_file() and copied.fingerprint() == tok.fingerprint()
    config.data.tokenizer = ""  # a resumed run reads the workdir's copy
    assert prepare_tokenizer(config, tmp_path / "run", None, 49152).fingerprint() == tok.fingerprint()


def test_pre_tokenizer_of_hf_folders_is_recognised(tmp_path):
    """HF's own spellings (SmolLM2: Digits + ByteLevel regex; Qwen2: Split with (?i:...))."""
    vocab = {c: i for i, c in enumerate([*"abcĠ", "ab"])}
    forms = {
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "qwen2": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        None: pre_tokenizers.ByteLevel(add_prefix_space=True),
    }
    for name, pre in forms.items():
        hf = HFTokenizer(models.BPE(vocab, [("a", "b")]))
        hf.pre_tokenizer, hf.decoder = pre, decoders.ByteLevel()
        hf.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "c"}))
        assert BPETokenizer.from_hf(tmp_path).gguf_vocab()["pre"] == name


def _one_line_error(match: str, load, *args):
    with pytest.raises(TokenizerError, match=match) as err:
        load(*args)
    assert "\n" not in str(err.value)


def test_bad_tokenizers_are_one_line_errors(reader, tmp_path):
    _one_line_error(r"spm\.gguf: tokenizer.ggml.model is 'llama', not 'gpt2'", BPETokenizer.from_gguf,
                    _write_gguf(tmp_path / "spm.gguf", reader, "default", tiny=True, model="llama"))
    _one_line_error(r"odd\.gguf: tokenizer.ggml.pre 'tekken' is not a supported", BPETokenizer.from_gguf,
                    _write_gguf(tmp_path / "odd.gguf", reader, "tekken", tiny=True))
    _one_line_error(r"empty has no tokenizer.json", BPETokenizer.from_hf, tmp_path / "empty")
    _one_line_error(r"holds no tokenizer.json or tokenizer.model", Tokenizer.load, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "WordPiece": (models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), None,
                      "is a WordPiece tokenizer"),
        "Unigram": (models.Unigram([("a", -1.0), ("b", -2.0)], 0), None, "is a Unigram tokenizer"),
        "Llama-2": (models.BPE({"<unk>": 0, "▁a": 1}, [], byte_fallback=True, unk_token="<unk>"),
                    pre_tokenizers.Metaspace(), "is a sentencepiece-style BPE"),
        "no ByteLevel": (models.BPE({"a": 0}, []), pre_tokenizers.Whitespace(), "has no ByteLevel"),
    }
    for model, pre, match in cases.values():
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre
        hf.save(str(bad / "tokenizer.json"))
        _one_line_error(rf"bad/tokenizer.json {match}", Tokenizer.load, bad / "tokenizer.json")
    (bad / "tokenizer.json").write_text("{not json")
    _one_line_error(r"tokenizer.json is unreadable", Tokenizer.load, bad)
