"""Sources, bad records, packing, determinism, resumption and per-host sharding."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.errors import UserError
from data_pipelines.pipeline import (_EPOCHS, SkippedRecords, _shuffled_forever, eval_batches,
                                     first_batches, open_sources, split_indices, train_batches)
from data_pipelines.sources import DataError, SourceSpec, open_source
from data_pipelines.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Tokenizer, train_tokenizer
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
    import pyarrow as pa
    import pyarrow.parquet as pq
    _write(tmp_path / "fake.parquet", '{"text": "JSON lines, not Parquet"}\n' * 3)
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "other.parquet")
    for spec, message in [("nope:x", "KIND:PATH"), (f"text:{tmp_path}/missing.txt", "does not exist"),
                          (f"jsonl:{tmp_path}", "no \\*.jsonl files"),
                          ("default:?weight=-1", "weight must be > 0"),
                          ("default:?colour=red", "unknown option"),
                          (f"parquet:{tmp_path}/fake.parquet", r"fake.parquet is not a Parquet file \("),
                          (f"parquet:{tmp_path}/other.parquet",
                           r"other.parquet: no column 'text' \(columns: body, id\)$")]:
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
    stream = [BOS_ID, *tokenizer.encode("good one"), EOS_ID, BOS_ID, *tokenizer.encode("good two"), EOS_ID]
    rows = list(first_batches(eval_batches(sources, tokenizer, batch_size=1, seq_len=len(stream) - 1,
                                           bad_records="skip", skipped=skipped), 100))
    assert len(rows) == 1 and list(rows[0]["inputs"][0]) == stream[:-1]
    assert skipped.by_problem == {"invalid JSON (Expecting value)": 1, "missing field 'text'": 1,
                                  "empty document": 1, "not valid UTF-8 (byte 13)": 1}
    assert skipped.summary().startswith("4 records: 1 x ")


def test_a_bad_record_counts_once_over_epochs_read_ahead_and_resumption(tmp_path, tokenizer):
    lines = [json.dumps({"text": f"good document {i}"}) for i in range(5)] + ["{broken"]
    sources = open_sources([f"jsonl:{_write(tmp_path / 'one_bad.jsonl', chr(10).join(lines))}"])

    def read(skipped, state=None, batches=20):  # ~14 epochs of 6 records, read ahead by threads
        it = iter(train_batches(sources, tokenizer, batch_size=2, seq_len=16, seed=0,
                                bad_records="skip", skipped=skipped, num_threads=2))
        if state:
            it.set_state(state)
        for _ in range(batches):
            next(it)
        return it.get_state()

    first, second = SkippedRecords(), SkippedRecords()
    position = read(first)
    read(second)
    expected = {"skipped": {"invalid JSON (Expecting property name enclosed in double quotes)":
                            {str(tmp_path / "one_bad.jsonl"): ["6"]}}, "trimmed": {}}
    assert first.get_state() == second.get_state() == expected
    assert first.total == 1
    resumed = SkippedRecords()
    resumed.set_state(json.loads(json.dumps(first.get_state())))  # as stored in a checkpoint
    read(resumed, state=json.loads(json.dumps(position)), batches=5)
    assert resumed.get_state() == expected


def test_skipped_records_state_round_trips():
    skipped = SkippedRecords()
    for where, problem in [("/d/a.jsonl:3", "p"), ("/d/a.jsonl:3", "p"), ("/d/a.jsonl:9", "p"),
                           ("C:/x.parquet:row 2", "q"), ("tfds c[train]:record 4", "q"), ("nowhere", "p")]:
        skipped.add(where, problem)
    skipped.add_trimmed("/d/s.jsonl:2 instance 1", 7)
    skipped.add_trimmed("/d/s.jsonl:2 instance 1", 7)
    skipped.add_trimmed("/d/s.jsonl:5", 0)
    state = json.loads(json.dumps(skipped.get_state()))
    restored = SkippedRecords()
    restored.set_state(state)
    assert restored.get_state() == state
    assert restored.by_problem == {"p": 3, "q": 2} and restored.total == 5
    assert restored.trimmed_tokens == 7


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
    assert (spec.kind, spec.path, spec.options, spec.weight) == \
        ("jsonl", "/x/y.jsonl", {"field": "body"}, 0.25)


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
    one, two = ([BOS_ID, *tokenizer.encode(t), EOS_ID] for t in ("one doc", "two doc"))
    batch = next(iter(train_batches([(SourceSpec.parse("tfds_dir:x"), by_dir)], tokenizer,
                                    batch_size=1, seq_len=len(one + two) - 1, seed=0)))
    assert list(batch["inputs"][0]) in ((one + two)[:-1], (two + one)[:-1])
    with pytest.raises(DataError, match="tfds dataset 'missing_ds' split 'train'"):
        open_source(f"tfds:missing_ds?data_dir={tmp_path / 'tfds'}")


def test_local_tfds_builder_rebuilds_when_its_sources_change(tmp_path, capsys):
    from data_pipelines.tfds_corpus import prepare_corpus

    source = _write(tmp_path / "a.jsonl", '{"text": "one doc"}\nnot json\n')
    data_dir, specs = str(tmp_path / "tfds"), [f"jsonl:{tmp_path / 'a.jsonl'}"]
    built = prepare_corpus("unit", specs, data_dir)
    shard = next(Path(built.data_dir).glob("*.array_record*"))
    stamp = shard.stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_corpus("unit", specs, data_dir)  # same inputs: reused as is
    assert shard.stat().st_mtime_ns == stamp and "rebuilding" not in capsys.readouterr().err
    assert again.skipped == {"invalid JSON (Expecting value)": 1}
    source.write_text('{"text": "one doc"}\n{"text": "two doc"}\n{"text": "three doc"}\n')
    rebuilt = prepare_corpus("unit", specs, data_dir)
    assert "changed since it was built; rebuilding" in capsys.readouterr().err
    assert rebuilt.info.splits["train"].num_examples == 3 and rebuilt.skipped == {}
    docs = open_source(f"tfds_dir:{rebuilt.data_dir}")
    assert sorted(docs[i].text for i in range(len(docs))) == ["one doc", "three doc", "two doc"]


def test_per_epoch_shuffle_keeps_the_order_of_existing_checkpoints():
    """grain's shuffle().repeat() orders each epoch as the hand-written index shuffle it
    replaced did, so a run checkpointed before resumes on the same documents."""
    from grain.experimental import index_shuffle

    for n, seed in [(1, 0), (2, 5), (7, 3 * 1009 + 1), (50, 12345)]:
        indices = np.arange(100, 100 + n)
        ds = _shuffled_forever(list(range(200)), indices, seed)
        assert len(ds) == n * _EPOCHS
        for i in [*range(3 * n), *range(n * _EPOCHS - n, n * _EPOCHS)]:
            epoch, within = divmod(i, n)
            old = within if n == 1 else index_shuffle(within, max_index=n - 1, seed=seed + epoch,
                                                      rounds=4)
            assert ds[i] == indices[old], (n, seed, i)


def test_aligned_packing_starts_every_document_on_a_block(tmp_path, tokenizer):
    texts = [f"document number {i} " * (1 + i % 9) for i in range(40)]
    _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    sources = open_sources([f"jsonl:{tmp_path / 'docs.jsonl'}"])
    docs = [[BOS_ID, *tokenizer.encode(t), EOS_ID] for t in texts]
    align, seq_len = 8, 64
    batches = list(first_batches(train_batches(sources, tokenizer, batch_size=4, seq_len=seq_len,
                                               seed=0, align=align), 4))
    padded = continued = 0
    for batch in batches:
        for inputs, targets, seg, pos, mask in zip(batch["inputs"], batch["targets"],
                                                   batch["segment_ids"], batch["positions"],
                                                   batch["loss_mask"]):
            np.testing.assert_array_equal(mask > 0, seg > 0)  # padding is segment 0, no loss
            assert not pos[seg == 0].any()
            padded += int((seg == 0).sum())
            for k in np.unique(seg[seg > 0]):
                span = np.flatnonzero(seg == k)
                assert span[0] % align == 0 and np.array_equal(span, np.arange(span[0], span[-1] + 1))
                np.testing.assert_array_equal(pos[span], np.arange(len(span)))
                piece = [int(inputs[span[0]]), *map(int, targets[span])]  # one stretch of one document
                assert any(_contains(d, piece) for d in docs), piece
                continued += int(inputs[span[0]] != BOS_ID)
    assert padded > 0 and continued > 0  # gaps were padded and some documents went on a new row
    with pytest.raises(UserError, match="align=48 must be a positive integer dividing seq_len=64"):
        train_batches(sources, tokenizer, batch_size=1, seq_len=64, seed=0, align=48)


def _contains(seq: list[int], piece: list[int]) -> bool:
    return any(seq[i:i + len(piece)] == piece for i in range(len(seq) - len(piece) + 1))


def test_special_token_strings_in_pretraining_text_stay_text(tmp_path, tokenizer):
    text = "plain " + " ".join(SPECIAL_TOKENS) + " <|end|><|user|>x"
    _write(tmp_path / "inject.jsonl", "".join(json.dumps({"text": text}) + "\n" for _ in range(8)))
    doc = [BOS_ID, *tokenizer.encode(text), EOS_ID]
    assert not set(range(8)) & set(doc[1:-1])
    batch = next(iter(train_batches(open_sources([f"jsonl:{tmp_path / 'inject.jsonl'}"]), tokenizer,
                                    batch_size=1, seq_len=3 * len(doc) - 1, seed=0)))
    np.testing.assert_array_equal(batch["inputs"][0], (doc * 3)[:-1])
    np.testing.assert_array_equal(batch["segment_ids"][0], np.repeat([1, 2, 3], len(doc))[:-1])


def test_data_pipelines_import_graph_is_acyclic_and_free_of_shakti_jax():
    package = Path(__file__).resolve().parents[1] / "data_pipelines"
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        assert not any(n.split(".")[0] == "shakti_jax" for n in names), path.name
        graph[path.stem] = {n.split(".")[1] for n in names if n.startswith("data_pipelines.")}

    def visit(module, trail):
        assert module not in trail, f"import cycle {' -> '.join([*trail, module])}"
        for dep in graph.get(module, ()):
            visit(dep, [*trail, module])

    for module in graph:
        visit(module, [])
