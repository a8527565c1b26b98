"""Sources, bad records, packing, determinism, resumption and per-host sharding."""

import gzip
import json

import numpy as np
import pytest

from data_pipelines.pipeline import (SkippedRecords, eval_batches, first_batches, open_sources,
                                     split_indices, train_batches)
from data_pipelines.sources import DataError, SourceSpec, open_source
from data_pipelines.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer
from data_pipelines.default_corpus import write_default_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_default_corpus(root / "corpus.txt", max_chars=300_000)
    return Tokenizer.load(train_tokenizer([corpus], 400, root / "tok"))


def _write(path, text, mode="w"):
    path.write_text(text) if mode == "w" else path.write_bytes(text)
    return path


def test_text_jsonl_parquet_array_record_sources(tmp_path):
    _write(tmp_path / "a.txt", "first para\nline two\n\n\nsecond para\n")
    docs = open_source(f"text:{tmp_path / 'a.txt'}")
    assert [d.text for d in docs] == ["first para\nline two", "second para"]
    assert [d.where.rsplit(":", 1)[1] for d in docs] == ["1", "5"]
    assert len(open_source(f"text:{tmp_path / 'a.txt'}?split=line")) == 3
    assert len(open_source(f"text:{tmp_path}?split=file")) == 1

    _write(tmp_path / "b.jsonl", '{"body": "x y"}\n\n{"body": "z"}\n')
    assert [d.text for d in open_source(f"jsonl:{tmp_path / 'b.jsonl'}?field=body")] == ["x y", "z"]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
    assert [d.text for d in open_source(f"parquet:{tmp_path / 'c.parquet'}")] == ["p1", "p2", "p3"]

    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for text in ("r1", "r2"):
        writer.write(text.encode())
    writer.close()
    assert [d.text for d in open_source(f"array_record:{tmp_path / 'd.array_record'}")] == ["r1", "r2"]


def test_bad_source_specs_fail_in_one_line(tmp_path):
    for spec, message in [("nope:x", "KIND:PATH"), (f"text:{tmp_path}/missing.txt", "does not exist"),
                          (f"jsonl:{tmp_path}", "no \\*.jsonl files"),
                          ("default:?weight=-1", "weight must be > 0"),
                          ("default:?colour=red", "unknown option")]:
        with pytest.raises(DataError, match=message) as err:
            open_source(spec)
        assert "\n" not in str(err.value)


@pytest.fixture
def bad_jsonl(tmp_path):
    lines = [b'{"text": "good one"}', b'{"text": ', b'{"other": 1}', b'{"text": "  "}',
             b'{"text": "caf\xe9"}', b'{"text": "good two"}']
    return _write(tmp_path / "bad.jsonl", b"\n".join(lines) + b"\n", mode="b")


def test_bad_records_error_names_file_and_line(bad_jsonl, tokenizer):
    sources = open_sources([f"jsonl:{bad_jsonl}"])
    with pytest.raises(DataError, match=rf"{bad_jsonl}:\d+: ") as err:
        list(first_batches(eval_batches(sources, tokenizer, batch_size=1, seq_len=8), 10))
    assert "\n" not in str(err.value)


def test_bad_records_skipped_and_counted(bad_jsonl, tokenizer):
    sources = open_sources([f"jsonl:{bad_jsonl}"])
    skipped = SkippedRecords()
    rows = list(first_batches(eval_batches(sources, tokenizer, batch_size=1, seq_len=4,
                                           bad_records="skip", skipped=skipped), 100))
    assert rows
    assert skipped.counts() == {"invalid JSON (Expecting value)": 1, "missing field 'text'": 1,
                                "empty document": 1, "not valid UTF-8 (byte 13)": 1}


def test_packing_keeps_documents_apart(tokenizer, tmp_path):
    texts = [f"document number {i} " * (1 + i % 7) for i in range(40)]
    _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    sources = open_sources([f"jsonl:{tmp_path / 'docs.jsonl'}"])
    batch = next(iter(train_batches(sources, tokenizer, batch_size=4, seq_len=64, seed=0)))
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for r in range(4):
        for t in range(64):
            starts_doc = t == 0 or seg[r, t] != seg[r, t - 1]
            assert pos[r, t] == (0 if starts_doc else pos[r, t - 1] + 1)
            if batch["inputs"][r, t] == BOS_ID:
                assert pos[r, t] == 0
            if batch["inputs"][r, t] == EOS_ID:  # never predict across a document boundary
                assert mask[r, t] == 0
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_iterator_is_deterministic_resumable_and_sharded(tokenizer):
    sources = open_sources(["default:"])
    kwargs = dict(batch_size=2, seq_len=32, seed=3)
    it = iter(train_batches(sources, tokenizer, **kwargs))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    expected = [next(it)["inputs"] for _ in range(4)]
    again = iter(train_batches(sources, tokenizer, **kwargs))
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again)["inputs"], want)
    fresh = iter(train_batches(sources, tokenizer, **kwargs))
    for _ in range(3):
        next(fresh)
    np.testing.assert_array_equal(next(fresh)["inputs"], expected[0])
    other_seed = next(iter(train_batches(sources, tokenizer, batch_size=2, seq_len=32, seed=4)))
    assert not np.array_equal(other_seed["inputs"], next(iter(train_batches(sources, tokenizer,
                                                                           **kwargs)))["inputs"])
    host0 = next(iter(train_batches(sources, tokenizer, process_index=0, process_count=2, **kwargs)))
    host1 = next(iter(train_batches(sources, tokenizer, process_index=1, process_count=2, **kwargs)))
    assert not np.array_equal(host0["inputs"], host1["inputs"])


def test_holdout_split_is_disjoint_and_complete():
    train, held = split_indices(103, 10, "train"), split_indices(103, 10, "eval")
    assert len(held) == 10 and set(train) | set(held) == set(range(103))
    assert not set(train) & set(held)


def test_mixture_follows_weights(tmp_path, tokenizer):
    _write(tmp_path / "a.jsonl", "".join(json.dumps({"text": "alpha"}) + "\n" for _ in range(50)))
    _write(tmp_path / "b.jsonl", "".join(json.dumps({"text": "beta"}) + "\n" for _ in range(50)))
    sources = open_sources([f"jsonl:{tmp_path / 'a.jsonl'}?weight=3", f"jsonl:{tmp_path / 'b.jsonl'}"])
    alpha = tokenizer.encode("alpha")[0]
    beta = tokenizer.encode("beta")[0]
    batch = next(iter(train_batches(sources, tokenizer, batch_size=16, seq_len=64, seed=0)))
    a, b = (batch["inputs"] == alpha).sum(), (batch["inputs"] == beta).sum()
    assert 2.4 < a / b < 3.6


def test_source_spec_parsing():
    spec = SourceSpec.parse("jsonl:/x/y.jsonl?field=body&weight=0.25")
    assert (spec.kind, spec.path, spec.options, spec.weight) == ("jsonl", "/x/y.jsonl", {"field": "body"}, 0.25)


def test_shared_pretraining_text(shared_data, tokenizer):
    sources = open_sources([f"text:{shared_data / 'pretrain' / 'tinyshakespeare.txt'}"])
    assert len(sources[0][1]) > 1000
    batch = next(iter(train_batches(sources, tokenizer, batch_size=2, seq_len=128, seed=0)))
    assert batch["loss_mask"].mean() > 0.9


def test_local_tfds_builder_round_trip(tmp_path, tokenizer):
    from data_pipelines.tfds_corpus import prepare_corpus

    _write(tmp_path / "a.jsonl", '{"text": "one doc"}\nnot json\n{"text": "two doc"}\n')
    builder = prepare_corpus("unit", [f"jsonl:{tmp_path / 'a.jsonl'}"], str(tmp_path / "tfds"))
    assert builder.skipped == {"invalid JSON (Expecting value)": 1}
    by_name = open_source(f"tfds:shakti_corpus/unit?data_dir={tmp_path / 'tfds'}")
    by_dir = open_source(f"tfds_dir:{builder.data_dir}")
    for docs in (by_name, by_dir):
        assert sorted(docs[i].text for i in range(len(docs))) == ["one doc", "two doc"]
    batch = next(iter(train_batches([(SourceSpec.parse("tfds_dir:x"), by_dir)], tokenizer,
                                    batch_size=1, seq_len=8, seed=0)))
    assert batch["inputs"].shape == (1, 8)
    with pytest.raises(DataError, match="tfds dataset 'missing_ds' split 'train'"):
        open_source(f"tfds:missing_ds?data_dir={tmp_path / 'tfds'}")
