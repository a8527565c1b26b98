"""Records of local evaluation files (JSONL, JSON, CSV), each with its `file:line` for errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Sequence

from data_pipelines.errors import DataError
from data_pipelines.records import read_records as read_json_records
from data_pipelines.sources import SourceSpec


class Record(dict):
    """One row of a file; `where` is `file:line` (or `file:key` for a JSON object)."""

    where: str

    def need(self, *names: str) -> list[Any]:
        missing = [n for n in names if n not in self or self[n] is None]
        if missing:
            raise DataError(f"{self.where}: missing field(s) {', '.join(missing)}")
        return [self[n] for n in names]


def _record(where: str, fields: dict) -> Record:
    record = Record(fields)
    record.where = where
    return record


def read_records(path: Path, limit: int | None = None) -> list[Record]:
    """The rows of a `.jsonl`, `.json` (a list, or an object keyed by id: the key becomes
    `id`) or `.csv` file; the first `limit` only."""
    return list(_iter_records(Path(path), limit))


def _iter_records(path: Path, limit: int | None) -> Iterator[Record]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for count, row in enumerate(reader):
                if limit is not None and count >= limit:
                    return
                yield _record(f"{path}:{reader.line_num}", row)
        return
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown format {suffix!r} (.jsonl, .json or .csv)")
    keyed = suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("{")
    spec = SourceSpec(suffix[1:], str(path), {})
    for count, (where, value) in enumerate(read_json_records(spec)):  # the SFT/DPO readers' parser
        if limit is not None and count >= limit:
            return
        if isinstance(value, Exception):
            raise DataError(f"{where}: not JSON ({value})")
        if not isinstance(value, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        yield _record(where, {"id": where.rpartition(":")[2], **value} if keyed else value)


def files_of(path: Path, suffixes: Sequence[str] = (".jsonl", ".json", ".csv")) -> list[Path]:
    """`path` itself, or the data files of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{path}: a directory without {' / '.join(suffixes)} files")
        return files
    return [path]
