"""Pretraining batches: mixed sources -> tokenize -> pack -> batch, deterministic and resumable.

The order of documents is a pure function of (seed, epoch, index): each source is reshuffled
every epoch with grain's index shuffle, sources are mixed by weight, and each host takes
every `process_count`-th document. Packing concatenates documents into rows of `seq_len + 1`
tokens with segment ids and per-document positions; inputs are the first `seq_len` tokens,
targets the last `seq_len`, and a target counts only when it belongs to the same document as
its input. The iterator's `get_state()` / `set_state()` go into checkpoints, so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, index_shuffle

from data_pipelines.sources import DataError, Document, SourceSpec, open_source
from data_pipelines.tokenizer import BOS_ID, EOS_ID, Tokenizer

BAD_RECORD_POLICIES = ("error", "skip")
_EPOCHS = 1_000_000  # "forever": the index space covers this many passes over each source


class SkippedRecords:
    """Thread-safe counts of skipped records by problem, reported in the metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, problem: str) -> None:
        with self._lock:
            self._counts[problem] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self.counts().values())


class DocumentTokenizer:
    """Document -> int32 ids `[BOS] text [EOS]`, or None (skipped) / DataError (by policy)."""

    def __init__(self, tokenizer: Tokenizer, bad_records: str, skipped: SkippedRecords):
        if bad_records not in BAD_RECORD_POLICIES:
            raise DataError(f"data.bad_records={bad_records!r} must be one of {BAD_RECORD_POLICIES}")
        self._tokenizer, self._bad_records, self._skipped = tokenizer, bad_records, skipped

    def __call__(self, doc: Document) -> np.ndarray | None:
        if doc.text is None:
            if self._bad_records == "error":
                raise DataError(f"{doc.where}: {doc.problem}")
            self._skipped.add(doc.problem)
            return None
        ids = self._tokenizer.encode(doc.text)
        return np.asarray([BOS_ID, *ids, EOS_ID], np.int32)


def split_indices(n: int, holdout_every: int, part: str) -> np.ndarray:
    """Document indices of the train or eval part: every `holdout_every`-th is held out."""
    index = np.arange(n)
    if holdout_every <= 0:
        return index if part == "train" else index[:0]
    held = index % holdout_every == holdout_every - 1
    return index[~held] if part == "train" else index[held]


def _shuffled_forever(docs: Sequence[Document], indices: np.ndarray, seed: int) -> grain.MapDataset:
    n = len(indices)

    def pick(i: int) -> Document:
        epoch, within = divmod(int(i), n)
        j = within if n == 1 else index_shuffle(within, max_index=n - 1, seed=seed + epoch, rounds=4)
        return docs[int(indices[j])]

    return grain.MapDataset.range(n * _EPOCHS).map(pick)


def open_sources(specs: Sequence[str]) -> list[tuple[SourceSpec, Sequence[Document]]]:
    if not specs:
        raise DataError("data.sources is empty; give at least one KIND:PATH source")
    parsed = [SourceSpec.parse(s) for s in specs]
    return [(spec, open_source(spec)) for spec in parsed]


def train_batches(sources: Sequence[tuple[SourceSpec, Sequence[Document]]], tokenizer: Tokenizer, *,
                  batch_size: int, seq_len: int, seed: int, holdout_every: int = 0,
                  bad_records: str = "error", skipped: SkippedRecords | None = None,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2) -> grain.IterDataset:
    """Endless packed batches for this host: dicts of [batch_size, seq_len] int32 arrays."""
    parts = []
    for s, (spec, docs) in enumerate(sources):
        indices = split_indices(len(docs), holdout_every, "train")
        if len(indices) == 0:
            raise DataError(f"data source {spec.kind}:{spec.path} has no training documents")
        parts.append(_shuffled_forever(docs, indices, seed * 1009 + s))
    weights = [spec.weight for spec, _ in sources]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    mixed = mixed[process_index::process_count]
    return _pack(mixed, tokenizer, batch_size, seq_len, bad_records, skipped, num_threads)


def eval_batches(sources: Sequence[tuple[SourceSpec, Sequence[Document]]], tokenizer: Tokenizer, *,
                 batch_size: int, seq_len: int, holdout_every: int = 0,
                 bad_records: str = "error", skipped: SkippedRecords | None = None,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Held-out packed batches in a fixed order (one pass, the last partial batch dropped).

    With `holdout_every > 0` the held-out documents of the training sources; with 0, every
    document of `sources` (separate evaluation sources).
    """
    docs = []
    for spec, source in sources:
        part = "eval" if holdout_every > 0 else "train"
        docs.extend(source[int(i)] for i in split_indices(len(source), holdout_every, part))
    if not docs:
        raise DataError("no held-out documents for evaluation; lower data.holdout_every")
    ds = grain.MapDataset.source(docs)[process_index::process_count]
    return _pack(ds, tokenizer, batch_size, seq_len, bad_records, skipped, num_threads=1)


def _pack(docs: grain.MapDataset, tokenizer: Tokenizer, batch_size: int, seq_len: int,
          bad_records: str, skipped: SkippedRecords | None, num_threads: int) -> grain.IterDataset:
    to_ids = DocumentTokenizer(tokenizer, bad_records, skipped or SkippedRecords())
    ds = docs.map(to_ids).map(lambda ids: None if ids is None else {"tokens": ids})
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=256))
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    return ds.batch(batch_size, drop_remainder=True).map(to_model_batch)


def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of seq_len + 1 packed tokens -> inputs, targets, loss mask, segment ids, positions."""
    tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": same_doc.astype(np.float32),
        "segment_ids": seg[:, :-1].astype(np.int32),
        "positions": pos[:, :-1].astype(np.int32),
    }


def first_batches(dataset: grain.IterDataset, count: int) -> Iterator[dict[str, np.ndarray]]:
    """Up to `count` batches of a dataset, closing its iterator afterwards."""
    it = iter(dataset)
    try:
        for _ in range(count):
            try:
                yield next(it)
            except StopIteration:
                return
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
