"""`data.bad_records=skip` on data with no usable record fails in one line instead of spinning.

The datasets are read in a subprocess with a timeout, so a pipeline that spins forever fails
the test instead of hanging the suite.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.tokenizer import Tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

READ = r"""
import json, sys
from data_pipelines.errors import DataError
from data_pipelines.pipeline import (SkippedRecords, dpo_batches, eval_batches, first_batches,
                                     open_sources, sft_batches, train_batches)
from data_pipelines.records import load_conversations, load_pairs
from data_pipelines.tokenizer import Tokenizer

tok, root = Tokenizer.load(sys.argv[1]), sys.argv[2]
skip = dict(bad_records="skip", batch_size=1, seq_len=8)
sft = lambda name: [(name, load_conversations(f"jsonl:{root}/{name}.jsonl?format=prompt_completion"))]
cases = {
    "pretrain": lambda s: train_batches(open_sources([f"jsonl:{root}/bad.jsonl"]), tok, seed=0,
                                        skipped=s, **skip),
    "pretrain_eval": lambda s: eval_batches(open_sources([f"jsonl:{root}/bad.jsonl"]), tok,
                                            skipped=s, **skip),
    "sft": lambda s: sft_batches(sft("long"), tok, seed=0, skipped=s, **skip),
    "sft_one_pass": lambda s: sft_batches(sft("long"), tok, seed=None, skipped=s, **skip),
    "dpo": lambda s: dpo_batches([("pairs", load_pairs(f"jsonl:{root}/pairs.jsonl?format=pairs"))], tok,
                                 seed=0, skipped=s, **skip),
    "one_good_record": lambda s: train_batches(open_sources([f"jsonl:{root}/one_good.jsonl"]), tok,
                                               seed=0, skipped=s, **skip),
}
for name, make in cases.items():
    skipped = SkippedRecords()
    try:
        got = len(list(first_batches(make(skipped), 30)))
    except DataError as err:
        got = str(err)
    print(json.dumps([name, got, skipped.by_problem]), flush=True)
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    corpus = write_default_corpus(root / "corpus.txt", max_chars=100_000)
    return Tokenizer.load(train_tokenizer([corpus], 400, root / "tok"))


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_skipping_every_record_fails_in_one_line_instead_of_spinning(tmp_path, tokenizer):
    long = "an answer far longer than eight tokens " * 3
    _jsonl(tmp_path / "bad.jsonl", ["{broken", {"body": "no text field"}, {"text": "  "}])
    _jsonl(tmp_path / "long.jsonl", [{"prompt": "q", "completion": long}] * 2)
    _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": long, "rejected": "no " + long}] * 2)
    _jsonl(tmp_path / "one_good.jsonl", ["{broken"] * 5 + [{"text": "the one good document"}])
    try:
        res = subprocess.run([sys.executable, "-c", READ, str(tokenizer.model_path), str(tmp_path)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"reading data with no usable record did not end; got so far: {err.stdout}")
    assert res.returncode == 0, res.stderr
    got = {name: (outcome, problems) for name, outcome, problems in map(json.loads, res.stdout.splitlines())}
    bad = {"invalid JSON (Expecting property name enclosed in double quotes)": 1,
           "missing field 'text'": 1, "empty document": 1}
    too_long = {"answer alone is longer than the context (9 tokens)": 2}
    # endless streams: a whole epoch is sure after 2n + 1 picks, plus what reader threads map ahead
    for name, in_a_row, problems in [("pretrain", 7 + 256, bad), ("pretrain_eval", 3, bad),
                                     ("sft", 5 + 256, too_long), ("sft_one_pass", 2, too_long),
                                     ("dpo", 5 + 64, too_long)]:
        message, counted = got[name]
        summary = "; ".join(f"{n} x {p}" for p, n in sorted(problems.items()))
        assert message == (f"data.bad_records=skip: no usable record in {in_a_row} records in a row; "
                           f"skipped {sum(problems.values())} records: {summary}"), name
        assert counted == problems, name
    broken = "invalid JSON (Expecting property name enclosed in double quotes)"
    assert got["one_good_record"] == (30, {broken: 5})
