"""Random-access document sources: text, JSONL, Parquet, ArrayRecord and tfds.

Each source is a sequence of `Document`s (`len` + indexing), so grain can shuffle, mix and
shard it deterministically. A record that cannot be read (invalid JSON, missing field,
non-UTF-8 bytes, empty text) comes back as a `Document` with `text=None` and a `problem`,
located by `where` ("file:line"); the pipeline then raises or skips it, by config.

A source is named by a spec string, `KIND:PATH[?key=value&...]`:
  text:PATH            a file or a folder of *.txt files; `split=paragraph|line|file`
  jsonl:PATH           a file or folder of *.jsonl; `field=text`
  parquet:PATH         a file or folder of *.parquet; `field=text`
  array_record:PATH    a file or folder of *.array_record; records are UTF-8 text, or JSON
                       objects when `field=` is given
  tfds:NAME            `tfds.data_source(NAME, split=..., data_dir=...)`; `field=text`
  tfds_dir:PATH        a prepared tfds dataset folder (see `data_pipelines.tfds_corpus`)
  default:             the embedded standard-library corpus (no download)
Every spec also takes `weight=W` (mixture weight, default 1).
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_pipelines.cli import one_line
from data_pipelines.errors import DataError

KINDS = ("text", "jsonl", "parquet", "array_record", "tfds", "tfds_dir", "default")
_SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "parquet": ".parquet",
             "array_record": ".array_record"}


@dataclasses.dataclass(frozen=True)
class Document:
    text: str | None
    where: str
    problem: str = ""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    options: dict[str, str]
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str, kinds: tuple[str, ...] = KINDS) -> SourceSpec:
        kind, sep, rest = spec.partition(":")
        if not sep or kind not in kinds:
            raise DataError(f"data source {spec!r}: expected KIND:PATH with KIND one of {kinds}")
        path, _, query = rest.partition("?")
        options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False))
        try:
            weight = float(options.pop("weight", 1.0))
        except ValueError:
            raise DataError(f"data source {spec!r}: weight must be a number") from None
        if weight <= 0:
            raise DataError(f"data source {spec!r}: weight must be > 0")
        if kind != "default" and not path:
            raise DataError(f"data source {spec!r}: missing PATH")
        return cls(kind, path, options, weight)


def open_source(spec: str | SourceSpec) -> Sequence[Document]:
    """The random-access document sequence for a spec; fails in one line if it is unusable."""
    spec = SourceSpec.parse(spec) if isinstance(spec, str) else spec
    opts = dict(spec.options)
    field = opts.pop("field", "text")
    if spec.kind == "text":
        source = TextSource(_files(spec), split=opts.pop("split", "paragraph"))
    elif spec.kind == "jsonl":
        source = JsonlSource(_files(spec), field)
    elif spec.kind == "parquet":
        source = ParquetSource(_files(spec), field)
    elif spec.kind == "array_record":
        source = ArrayRecordSource(_files(spec), spec.options.get("field"))
    elif spec.kind == "tfds":
        source = TfdsSource(spec.path, field, split=opts.pop("split", "train"),
                            data_dir=opts.pop("data_dir", None))
    elif spec.kind == "tfds_dir":
        source = TfdsSource(spec.path, field, split=opts.pop("split", "train"), from_dir=True)
    else:
        source = DefaultCorpusSource()
    opts.pop("split", None)
    if opts and spec.kind != "array_record":
        raise DataError(f"data source {spec.kind}:{spec.path}: unknown option(s) {sorted(opts)}")
    if len(source) == 0:
        raise DataError(f"data source {spec.kind}:{spec.path} has no documents")
    return source


def source_files(spec: str | SourceSpec) -> list[Path]:
    """The local files a spec reads, sorted; none for `tfds:` names and the default corpus."""
    spec = SourceSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.kind == "tfds_dir":
        return sorted(p for p in Path(spec.path).rglob("*") if p.is_file())
    return _files(spec) if spec.kind in _SUFFIXES else []


def _files(spec: SourceSpec) -> list[Path]:
    path = Path(spec.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{_SUFFIXES[spec.kind]}") if p.is_file())
        if not files:
            raise DataError(f"data folder {path} has no *{_SUFFIXES[spec.kind]} files")
        return files
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return [path]


def _decode(raw: bytes, where: str) -> Document:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Document(None, where, f"not valid UTF-8 (byte {err.start})")
    if not text.strip():
        return Document(None, where, "empty document")
    return Document(text, where)


class TextSource:
    """Plain UTF-8 text; documents are paragraphs (blank-line separated), lines, or files."""

    def __init__(self, files: Sequence[Path], split: str = "paragraph"):
        if split not in ("paragraph", "line", "file"):
            raise DataError(f"text source split={split!r} must be paragraph, line or file")
        self._files = list(files)
        self._spans: list[tuple[int, int, int, int]] = []  # file, first line, byte start, end
        for f, path in enumerate(self._files):
            self._spans.extend((f, *span) for span in _text_spans(path, split))

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> Document:
        f, line, start, end = self._spans[index]
        with self._files[f].open("rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
        return _decode(raw.strip(b"\r\n"), f"{self._files[f]}:{line}")


def _text_spans(path: Path, split: str):
    """(first line, byte start, byte end) of each document of a text file."""
    size = path.stat().st_size
    if split == "file":
        yield (1, 0, size)
        return
    offset, start, first = 0, None, 1
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            blank = not line.strip()
            if split == "line":
                if not blank:
                    yield (number, offset, offset + len(line))
            elif blank and start is not None:
                yield (first, start, offset)
                start = None
            elif not blank and start is None:
                start, first = offset, number
            offset += len(line)
    if split == "paragraph" and start is not None:
        yield (first, start, offset)


class JsonlSource:
    """One JSON object per line; the document is `obj[field]`."""

    def __init__(self, files: Sequence[Path], field: str):
        self._files, self._field = list(files), field
        self._lines: list[tuple[int, int, int]] = []  # file, line number, byte offset
        for f, path in enumerate(self._files):
            offset = 0
            with path.open("rb") as fh:
                for number, line in enumerate(fh, start=1):
                    if line.strip():
                        self._lines.append((f, number, offset))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> Document:
        f, number, offset = self._lines[index]
        where = f"{self._files[f]}:{number}"
        with self._files[f].open("rb") as fh:
            fh.seek(offset)
            raw = fh.readline()
        return _field_of_json(raw, self._field, where)


def _field_of_json(raw: bytes, field: str, where: str) -> Document:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as err:
        return Document(None, where, f"not valid UTF-8 (byte {err.start})")
    except json.JSONDecodeError as err:
        return Document(None, where, f"invalid JSON ({err.msg})")
    if not isinstance(obj, dict) or field not in obj:
        return Document(None, where, f"missing field {field!r}")
    return _text_value(obj[field], field, where)


def _text_value(value: Any, field: str, where: str) -> Document:
    if isinstance(value, bytes):
        return _decode(value, where)
    if not isinstance(value, str):
        return Document(None, where, f"field {field!r} is {type(value).__name__}, not text")
    if not value.strip():
        return Document(None, where, "empty document")
    return Document(value, where)


class ParquetSource:
    """One column of Parquet files; rows are located as `file:row N` (1-based)."""

    def __init__(self, files: Sequence[Path], field: str):
        self._files, self._field = list(files), field
        self._columns = [_parquet_column(path, field) for path in self._files]
        self._offsets = np.cumsum([0] + [len(c) for c in self._columns])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> Document:
        f = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - int(self._offsets[f])
        value = self._columns[f][row]
        return _text_value(value, self._field, f"{self._files[f]}:row {row + 1}")


def _parquet_column(path: Path, field: str) -> list[Any]:
    """One column of a Parquet file as a list; a one-line DataError for a file that is not
    Parquet, or that lacks the column (naming the columns it has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a Parquet file ({one_line(err)})") from None
    with parquet:
        columns = parquet.schema_arrow.names
        if field not in columns:
            raise DataError(f"{path}: no column {field!r} (columns: {', '.join(columns)})")
        return parquet.read(columns=[field]).column(field).to_pylist()


class ArrayRecordSource:
    """ArrayRecord files of UTF-8 text records (or JSON objects, when `field` is given)."""

    def __init__(self, files: Sequence[Path], field: str | None):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._files, self._field = list(files), field
        self._source = ArrayRecordDataSource([str(f) for f in self._files])
        self._offsets = np.cumsum([0] + [_record_count(f) for f in self._files])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Document:
        f = int(np.searchsorted(self._offsets, index, side="right")) - 1
        where = f"{self._files[f]}:record {index - int(self._offsets[f]) + 1}"
        raw = self._source[index]
        return _decode(raw, where) if self._field is None else _field_of_json(raw, self._field, where)


def _record_count(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


class TfdsSource:
    """A tfds dataset read through its ArrayRecord data source (no TensorFlow needed)."""

    def __init__(self, name: str, field: str, split: str = "train", data_dir: str | None = None,
                 from_dir: bool = False):
        import tensorflow_datasets as tfds

        self._name, self._field, self._split = name, field, split
        try:
            if from_dir:
                self._source = tfds.builder_from_directory(name).as_data_source(split=split)
            else:
                self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                                download=False)
        except Exception as err:  # tfds raises many types; all mean "cannot open this"
            reason = " ".join(str(err).split()).split(" Available datasets")[0][:300]
            raise DataError(f"tfds dataset {name!r} split {split!r}: {reason}") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Document:
        record = self._source[index]
        where = f"tfds {self._name}[{self._split}]:record {index + 1}"
        if self._field not in record:
            return Document(None, where, f"missing field {self._field!r}")
        return _text_value(record[self._field], self._field, where)


class DefaultCorpusSource:
    """The embedded default corpus (standard-library docstrings), one document per docstring."""

    def __init__(self):
        from data_pipelines.default_corpus import default_corpus_text

        self._docs = [d for d in default_corpus_text().split("\n\n") if d.strip()]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> Document:
        return _text_value(self._docs[index], "text", f"<default corpus>:doc {index + 1}")
