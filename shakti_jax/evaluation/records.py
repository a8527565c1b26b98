"""Records of local evaluation files (JSONL, JSON, CSV), each with its `file:line` for errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from data_pipelines.errors import DataError


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
    count = 0
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield _record(f"{path}:{reader.line_num}", row)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise DataError(f"{path}: not JSON ({err})") from None
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            if limit is not None and count >= limit:
                return
            if not isinstance(value, dict):
                raise DataError(f"{path}:{key}: a record must be a JSON object")
            count += 1
            yield _record(f"{path}:{key}", {"id": key, **value} if isinstance(data, dict) else value)
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if limit is not None and count >= limit:
                    return
                try:
                    value = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}:{number}: not JSON ({err})") from None
                if not isinstance(value, dict):
                    raise DataError(f"{path}:{number}: a record must be a JSON object")
                count += 1
                yield _record(f"{path}:{number}", value)
    else:
        raise DataError(f"{path}: unknown format {suffix!r} (.jsonl, .json or .csv)")


def files_of(path: Path, suffixes: Sequence[str] = (".jsonl", ".json", ".csv")) -> list[Path]:
    """`path` itself, or the data files of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{path}: a directory without {' / '.join(suffixes)} files")
        return files
    return [path]
