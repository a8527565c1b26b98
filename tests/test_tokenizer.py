"""Tokenizer: exact round trips, Llama-style settings, reserved ids, CLI errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.default_corpus import default_corpus_text, write_default_corpus
from data_pipelines.tokenizer import CHAT_TOKENS, Tokenizer, TokenizerError, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

BATTERY = [
    "Hello, world!",
    "Crème brûlée à la façon d'Œdipe",
    "Ελληνικά και русский текст",
    "日本語のテキストと中文文本",
    "हिन्दी पाठ",
    "emoji 👩‍👩‍👧‍👦 and 🇮🇳 flags",
    "cafe\u0301 (combining accent, NFD must survive)",
    "ｆｕｌｌｗｉｄｔｈ and ﬁ ligature (no NFKC)",
    "  leading and trailing spaces  ",
    "many     spaces\tand\ttabs\n\nnewlines\r\nCRLF",
    "3.14159 1,000,000 2026-11-22 0x1F 007",
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(default_corpus_text(300_000), encoding="utf-8")
    return Tokenizer.load(train_tokenizer([corpus], 1000, d / "tok"))


@pytest.mark.parametrize("text", BATTERY)
def test_exact_round_trip_and_no_unk(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


def test_unseen_characters_fall_back_to_bytes(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("𓂀")]  # an Egyptian hieroglyph
    assert pieces[-4:] == ["<0xF0>", "<0x93>", "<0x82>", "<0x80>"]


def test_digits_are_split(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert [p.lstrip("\u2581") for p in pieces if p.lstrip("\u2581")] == list("12345")


def test_whitespace_is_not_collapsed(tok):
    assert tok.encode("a  b") != tok.encode("a b")
    assert tok.encode("a\tb") != tok.encode("a b")


def test_reserved_ids_and_chat_tokens(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    ids = tok.chat_token_ids
    assert list(ids) == list(CHAT_TOKENS) and sorted(ids.values()) == [4, 5, 6, 7]
    for piece, token_id in ids.items():
        assert tok.encode(piece) == [token_id] or tok.encode(piece)[-1:] == [token_id]
        assert tok.id_to_piece(token_id) == piece
    chat = tok.encode("<|user|>hi<|end|>")
    assert ids["<|user|>"] in chat and ids["<|end|>"] in chat
    assert tok.encode("x", add_bos=True, add_eos=True)[::len(tok.encode("x")) + 1] == [1, 2]
    assert tok.decode([3, *tok.encode("pad me"), 3]) == "pad me"


def test_trains_on_tinyshakespeare(shared_data, tmp_path):
    path = shared_data / "pretrain" / "tinyshakespeare.txt"
    t = Tokenizer.load(train_tokenizer([path], 600, tmp_path / "shakespeare"))
    text = path.read_text(encoding="utf-8")[:2000]
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert len(ids) < 0.6 * len(text)  # merges learnt: far fewer tokens than characters


def test_default_corpus_is_deterministic_and_large(tmp_path):
    a, b = default_corpus_text(), default_corpus_text()
    assert a == b and len(a) >= 200_000
    path = write_default_corpus(tmp_path / "c.txt", max_chars=10_000)
    assert path.read_text(encoding="utf-8") == a[:10_000]
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_training_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 1000, tmp_path / "t")
    small = tmp_path / "small.txt"
    small.write_text("just a few words", encoding="utf-8")
    with pytest.raises(TokenizerError, match="small.txt.*<= "):
        train_tokenizer([small], 5000, tmp_path / "t")
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer([small], 10, tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]  # nothing partial written
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.load(small)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.tokenizer", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_train_and_encode(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(default_corpus_text(100_000), encoding="utf-8")
    res = _cli("train", "--input", str(corpus), "--vocab_size", "400", "--out", str(tmp_path / "t"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "t.model").is_file()
    res = _cli("encode", "--model", str(tmp_path / "t.model"), "--text", "42")
    assert res.returncode == 0 and res.stdout.split()[-2:] == [
        str(Tokenizer.load(tmp_path / "t.model").piece_to_id(d)) for d in "42"]


@pytest.mark.parametrize("args, message", [
    (["train", "--input", "/no/such/file.txt", "--vocab_size", "1000", "--out", "/tmp/x"], "file.txt"),
    (["encode", "--model", "/no/such.model", "--text", "hi"], "such.model"),
    (["train", "--input", "README.md", "--vocab_size", "ten", "--out", "/tmp/x"], "vocab_size"),
    (["train", "--input", "Makefile", "--vocab_size", "30000", "--out", "/tmp/x"], "Makefile"),
])
def test_cli_errors_are_one_line(args, message):
    res = _cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and res.stderr.strip().count("\n") == 0, res.stderr
    assert message in res.stderr
