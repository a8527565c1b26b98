"""Pretraining batches: mixed sources -> tokenize -> pack -> batch, deterministic and resumable.

The order of documents is a pure function of (seed, epoch, index): each source is reshuffled
every epoch by grain (`MapDataset.shuffle().repeat()`), sources are mixed by weight, and each
host takes every `process_count`-th document. Packing concatenates documents into rows of
`seq_len + 1` tokens with segment ids and per-document positions; inputs are the first `seq_len`
tokens, targets the last `seq_len`, and a target counts only when it belongs to the same
document as its input. The iterator's `get_state()` / `set_state()` go into checkpoints, so a
resumed run sees exactly the batches it would have seen.

Bad records (`data.bad_records`) raise a one-line `DataError`, or are skipped and counted in a
`SkippedRecords`; a stream in which no record is usable raises instead of spinning forever.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from data_pipelines.chat import render, truncate
from data_pipelines.errors import DataError, UserError
from data_pipelines.records import Conversation, PreferencePair
from data_pipelines.sources import Document, SourceSpec, open_source
from data_pipelines.tokenizer import Tokenizer

BAD_RECORD_POLICIES = ("error", "skip")
_EPOCHS = 1_000_000  # "forever": the index space covers this many passes over each source

READ_AHEAD, PAIR_READ_AHEAD = 256, 64  # records grain's reader threads may map ahead


class SkippedRecords:
    """Bad records skipped, by problem, and prompt tokens trimmed to fit the context.

    Each record counts once, told apart by its `where` (file:line): read-ahead, later epochs
    and a resumed run that read a record again do not count it again. Thread-safe;
    `get_state()` is JSON-ready for checkpoints and `set_state()` restores it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}  # where -> problem
        self._trimmed: dict[str, int] = {}  # where -> prompt tokens trimmed

    def add(self, where: str, problem: str) -> None:
        with self._lock:
            self._problems.setdefault(where, problem)

    def add_trimmed(self, where: str, tokens: int) -> None:
        if tokens > 0:
            with self._lock:
                self._trimmed[where] = tokens

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._problems)

    @property
    def by_problem(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(self._problems.values()))

    @property
    def trimmed_tokens(self) -> int:
        with self._lock:
            return sum(self._trimmed.values())

    def summary(self) -> str:
        """One line: "N records: K x problem; ..."."""
        counts = sorted(self.by_problem.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"{sum(n for _, n in counts)} records: " + "; ".join(f"{n} x {p}" for p, n in counts)

    def get_state(self) -> dict[str, Any]:
        """`{"skipped": {problem: {file: [line, ...]}}, "trimmed": {file: {line: tokens}}}`."""
        skipped: dict[str, dict[str, list[str]]] = {}
        trimmed: dict[str, dict[str, int]] = {}
        with self._lock:
            for where, problem in self._problems.items():
                file, line = _split_where(where)
                skipped.setdefault(problem, {}).setdefault(file, []).append(line)
            for where, tokens in self._trimmed.items():
                file, line = _split_where(where)
                trimmed.setdefault(file, {})[line] = tokens
        return {"skipped": skipped, "trimmed": trimmed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        problems = {_join_where(file, line): problem
                    for problem, files in state["skipped"].items()
                    for file, lines in files.items() for line in lines}
        trimmed = {_join_where(file, line): int(tokens)
                   for file, lines in state["trimmed"].items() for line, tokens in lines.items()}
        with self._lock:
            self._problems, self._trimmed = problems, trimmed


def _split_where(where: str) -> tuple[str, str]:
    file, _, line = where.rpartition(":")
    return (file, line) if file else ("", where)


def _join_where(file: str, line: str) -> str:
    return f"{file}:{line}" if file else line


class BadRecords:
    """`data.bad_records` for one dataset: raise on a bad record, or skip it into `skipped`.

    Skipping gives up with a `DataError` after `patience` bad records in a row: a whole pass
    for a one-pass dataset, `_patience` for an endless one; by then every record has been read,
    so none is usable and the stream would otherwise spin forever.
    """

    def __init__(self, policy: str, skipped: SkippedRecords | None, patience: int):
        if policy not in BAD_RECORD_POLICIES:
            raise DataError(f"data.bad_records={policy!r} must be one of {BAD_RECORD_POLICIES}")
        self.skipped = skipped if skipped is not None else SkippedRecords()
        self._policy, self._patience = policy, patience
        self._lock = threading.Lock()
        self._in_a_row = 0

    def reject(self, where: str, problem: str) -> None:
        if self._policy == "error":
            raise DataError(f"{where}: {problem}")
        self.skipped.add(where, problem)
        with self._lock:
            self._in_a_row += 1
            stuck = self._in_a_row >= self._patience
        if stuck:
            raise DataError(f"data.bad_records=skip: no usable record in {self._patience} "
                            f"records in a row; skipped {self.skipped.summary()}")

    def accept(self) -> None:
        with self._lock:
            self._in_a_row = 0


def _patience(lengths: Sequence[int], weights: Sequence[float], process_count: int,
              read_ahead: int) -> int:
    """Bad records in a row after which an endless mixture has shown every record: any 2n
    picks in a row of a source of n records hold a whole epoch of it, and a source of weight w
    is picked once per sum(weights) / w records. Each host reads every `process_count`-th
    record, so the bound is scaled by `process_count` (generous there, not exact). Reader
    threads may map up to `read_ahead` later records before a good one is counted, so that
    many are added."""
    total = sum(weights)
    return read_ahead + process_count * max(math.ceil((2 * n + 1) * total / w)
                                            for n, w in zip(lengths, weights))


class DocumentTokenizer:
    """Document -> int32 ids `[BOS] text [EOS]` (text read as plain text), or None if skipped."""

    def __init__(self, tokenizer: Tokenizer, bad: BadRecords):
        self._tokenizer, self._bad = tokenizer, bad

    def __call__(self, doc: Document) -> np.ndarray | None:
        if doc.text is None:
            self._bad.reject(doc.where, doc.problem)
            return None
        self._bad.accept()
        tok = self._tokenizer
        return np.asarray(tok.encode(doc.text, add_bos=tok.add_bos, add_eos=True), np.int32)


def split_indices(n: int, holdout_every: int, part: str) -> np.ndarray:
    """Document indices of the train or eval part: every `holdout_every`-th is held out."""
    index = np.arange(n)
    if holdout_every <= 0:
        return index if part == "train" else index[:0]
    held = index % holdout_every == holdout_every - 1
    return index[~held] if part == "train" else index[held]


def _shuffled_forever(docs: Sequence[Any], indices: np.ndarray, seed: int) -> grain.MapDataset:
    """`docs[indices]`, reshuffled every epoch by grain: the order is a pure function of
    (seed, epoch, index), the same as `index_shuffle(seed=seed + epoch, rounds=4)`."""
    shuffled = grain.MapDataset.range(len(indices)).shuffle(seed).repeat(_EPOCHS)
    return shuffled.map(lambda j: docs[int(indices[j])])


def open_sources(specs: Sequence[str]) -> list[tuple[SourceSpec, Sequence[Document]]]:
    if not specs:
        raise DataError("data.sources is empty; give at least one KIND:PATH source")
    parsed = [SourceSpec.parse(s) for s in specs]
    return [(spec, open_source(spec)) for spec in parsed]


def train_batches(sources: Sequence[tuple[SourceSpec, Sequence[Document]]], tokenizer: Tokenizer, *,
                  batch_size: int, seq_len: int, seed: int, holdout_every: int = 0,
                  bad_records: str = "error", skipped: SkippedRecords | None = None,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                  align: int = 1) -> grain.IterDataset:
    """Endless packed batches for this host: dicts of [batch_size, seq_len] arrays.

    `align > 1` starts every document (and every piece of one split across rows) at a row
    position that is a multiple of `align`, which must divide `seq_len`; see `_pack_aligned`.
    """
    parts, lengths = [], []
    for s, (spec, docs) in enumerate(sources):
        indices = split_indices(len(docs), holdout_every, "train")
        if len(indices) == 0:
            raise DataError(f"data source {spec.kind}:{spec.path} has no training documents")
        parts.append(_shuffled_forever(docs, indices, seed * 1009 + s))
        lengths.append(len(indices))
    weights = [spec.weight for spec, _ in sources]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    bad = BadRecords(bad_records, skipped, _patience(lengths, weights, process_count, READ_AHEAD))
    return _pack(mixed[process_index::process_count], tokenizer, batch_size, seq_len, bad,
                 num_threads, align)


def eval_batches(sources: Sequence[tuple[SourceSpec, Sequence[Document]]], tokenizer: Tokenizer, *,
                 batch_size: int, seq_len: int, holdout_every: int = 0,
                 bad_records: str = "error", skipped: SkippedRecords | None = None,
                 process_index: int = 0, process_count: int = 1,
                 align: int = 1) -> grain.IterDataset:
    """Held-out packed batches in a fixed order (one pass, the last partial batch dropped).

    With `holdout_every > 0` the held-out documents of the training sources; with 0, every
    document of `sources` (separate evaluation sources). `align` as in `train_batches`.
    """
    docs = []
    for spec, source in sources:
        part = "eval" if holdout_every > 0 else "train"
        docs.extend(source[int(i)] for i in split_indices(len(source), holdout_every, part))
    if not docs:
        raise DataError("no held-out documents for evaluation; lower data.holdout_every")
    ds = grain.MapDataset.source(docs)[process_index::process_count]
    bad = BadRecords(bad_records, skipped, patience=len(ds))
    return _pack(ds, tokenizer, batch_size, seq_len, bad, 1, align)


def _pack(docs: grain.MapDataset, tokenizer: Tokenizer, batch_size: int, seq_len: int,
          bad: BadRecords, num_threads: int, align: int) -> grain.IterDataset:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or seq_len % align:
        raise UserError(f"align={align!r} must be a positive integer dividing seq_len={seq_len}")
    ds = docs.map(DocumentTokenizer(tokenizer, bad))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=READ_AHEAD)
    if align > 1:
        pad_id = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
        return _pack_aligned(ds, read, batch_size, seq_len, align, pad_id)
    ds = ds.map(lambda ids: {"tokens": ids}).to_iter_dataset(read)
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    return ds.batch(batch_size, drop_remainder=True).map(to_model_batch)


_PAIR_FEATURES = ("inputs", "targets", "real")


def _pack_aligned(ids: grain.MapDataset, read: grain.ReadOptions, batch_size: int, seq_len: int,
                  align: int, pad_id: int) -> grain.IterDataset:
    """Pack (input, target) pairs of each document, padded to a multiple of `align`, into rows
    of `seq_len`: every element starts at a multiple of `align`, and so does the rest of one
    split at a row end. Padding has segment id 0, position 0 and no loss."""
    ds = ids.map(functools.partial(_aligned_pairs, align=align, pad_id=pad_id)).to_iter_dataset(read)
    ds = ConcatThenSplitIterDataset(ds, length_struct=dict.fromkeys(_PAIR_FEATURES, seq_len))
    return ds.batch(batch_size, drop_remainder=True).map(_aligned_model_batch)


def _aligned_pairs(ids: np.ndarray, align: int, pad_id: int) -> dict[str, np.ndarray]:
    pairs = len(ids) - 1
    pad = (0, -pairs % align)
    return {"inputs": np.pad(ids[:-1], pad, constant_values=pad_id),
            "targets": np.pad(ids[1:], pad, constant_values=pad_id),
            "real": np.pad(np.ones(pairs, np.int32), pad)}


def _aligned_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    real = packed["real"] > 0
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "loss_mask": real.astype(np.float32),
        "segment_ids": np.where(real, packed["inputs_segment_ids"], 0).astype(np.int32),
        "positions": np.where(real, packed["inputs_positions"], 0).astype(np.int32),
    }


def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of seq_len + 1 packed tokens -> inputs, targets, loss mask, segment ids, positions.

    A target counts when it is in its input's document and, if the rows carry a per-token
    `loss_mask` (SFT: assistant tokens), when that mask is set on the target token.
    """
    tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
    weight = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    if "loss_mask" in packed:
        weight = weight & (packed["loss_mask"][:, 1:] > 0)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": weight.astype(np.float32),
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


def _too_long(max_len: int) -> str:
    return f"answer alone is longer than the context ({max_len} tokens)"


class ConversationEncoder:
    """Conversation -> {"tokens", "loss_mask"} of at most `max_len` tokens, or None if skipped."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, bad: BadRecords):
        self._tokenizer, self._max_len, self._bad = tokenizer, max_len, bad

    def __call__(self, conversation: Conversation) -> dict[str, np.ndarray] | None:
        where = conversation.where
        if conversation.messages is None:
            self._bad.reject(where, conversation.problem)
            return None
        rendered = truncate(render(self._tokenizer, conversation.messages), self._max_len)
        if rendered is None:
            self._bad.reject(where, _too_long(self._max_len))
            return None
        self._bad.accept()
        self._bad.skipped.add_trimmed(where, rendered.trimmed)
        return {"tokens": rendered.ids, "loss_mask": rendered.loss_mask}


def sft_batches(sources: Sequence[tuple[str, Sequence[Conversation]]], tokenizer: Tokenizer, *,
                batch_size: int, seq_len: int, seed: int | None, holdout_every: int = 0,
                part: str = "train", bad_records: str = "error",
                skipped: SkippedRecords | None = None, process_index: int = 0,
                process_count: int = 1, num_threads: int = 2,
                weights: Sequence[float] | None = None) -> grain.IterDataset:
    """Packed SFT batches: whole conversations (never split) packed first-fit into rows, with
    the loss on assistant tokens only. Several sources are sampled by `weights` (default
    equal); `seed=None` reads the `part` once in file order."""
    ds, patience = records_dataset(sources, holdout_every, part, seed, process_index,
                                   process_count, weights)
    encode = ConversationEncoder(tokenizer, seq_len + 1, BadRecords(bad_records, skipped, patience))
    ds = ds.map(encode).to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                          prefetch_buffer_size=READ_AHEAD))
    length = {"tokens": seq_len + 1, "loss_mask": seq_len + 1}
    ds = FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=max(batch_size, 8),
                                 seed=seed or 0, shuffle_bins=seed is not None)
    return ds.batch(batch_size, drop_remainder=True).map(to_model_batch)


def records_dataset(sources: Sequence[tuple[str, Sequence[Any]]], holdout_every: int, part: str,
                    seed: int | None, process_index: int = 0, process_count: int = 1,
                    weights: Sequence[float] | None = None) -> tuple[grain.MapDataset, int]:
    """This host's records of the `part` (endless and mixed by `weights` with a seed, one pass
    in order without) and the patience for bad records in a row."""
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources) or min(weights, default=1.0) <= 0:
        raise UserError(f"weights {weights} must be one positive number per source")
    parts, lengths = [], []
    for s, (name, records) in enumerate(sources):
        indices = split_indices(len(records), holdout_every, part)
        if len(indices) == 0:
            raise DataError(f"data source {name} has no {part} records")
        lengths.append(len(indices))
        if seed is None:
            parts.append(grain.MapDataset.source([records[int(i)] for i in indices]))
        else:
            parts.append(_shuffled_forever(records, indices, seed * 1009 + s))
    if len(parts) == 1:
        ds = parts[0]
    else:
        ds = grain.MapDataset.concatenate(parts) if seed is None else grain.MapDataset.mix(parts, weights)
    ds = ds[process_index::process_count]
    if seed is None:
        return ds, len(ds)
    return ds, _patience(lengths, weights, process_count, READ_AHEAD)


class PairEncoder:
    """(index, PreferencePair) -> chosen / rejected rows padded to `seq_len + 1`, sharing one
    trimmed prompt; None if skipped."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, bad: BadRecords):
        self._tokenizer, self._length, self._bad = tokenizer, seq_len + 1, bad

    def __call__(self, item: tuple[int, PreferencePair]) -> dict[str, np.ndarray] | None:
        index, pair = item
        if pair.prompt is None:
            self._bad.reject(pair.where, pair.problem)
            return None
        # Both sides drop the same prompt tokens, so they are scored on one shared prompt.
        full = [render(self._tokenizer, [*pair.prompt, ("assistant", answer)], last_turn_only=True)
                for answer in (pair.chosen, pair.rejected)]
        cut = max(0, max(len(r.ids) for r in full) - self._length)
        chosen, rejected = (truncate(r, len(r.ids) - cut) for r in full)
        if chosen is None or rejected is None:
            self._bad.reject(pair.where, _too_long(self._length))
            return None
        self._bad.accept()
        self._bad.skipped.add_trimmed(pair.where, cut)
        out = {"index": np.int32(index)}
        for name, r in (("chosen", chosen), ("rejected", rejected)):
            pad = self._length - len(r.ids)
            out[f"{name}_tokens"] = np.pad(r.ids, (0, pad))
            out[f"{name}_mask"] = np.pad(r.loss_mask, (0, pad))
            out[f"{name}_length"] = np.int32(len(r.ids))
        return out


def dpo_batches(sources: Sequence[tuple[str, Sequence[PreferencePair]]], tokenizer: Tokenizer, *,
                batch_size: int, seq_len: int, seed: int | None, holdout_every: int = 0,
                part: str = "train", bad_records: str = "error", skipped: SkippedRecords | None = None,
                process_index: int = 0, process_count: int = 1, drop_remainder: bool = True,
                weights: Sequence[float] | None = None, first_index: int = 0) -> grain.IterDataset:
    """Batches of `batch_size` pairs as one forward batch of 2 x batch_size rows (chosen rows
    first), with `index`: the pair's position in all sources' pairs in order, plus
    `first_index` (for precomputed reference log-probs). Sources are sampled by `weights`;
    `seed=None` reads the `part` once in order."""
    indexed, offset = [], first_index
    for name, pairs in sources:
        indexed.append((name, [(offset + i, pair) for i, pair in enumerate(pairs)]))
        offset += len(pairs)
    ds, _ = records_dataset(indexed, holdout_every, part, seed, process_index, process_count, weights)
    patience = len(ds) if seed is None else _patience(
        [len(split_indices(len(p), holdout_every, part)) for _, p in indexed],
        weights or [1.0] * len(indexed), process_count, PAIR_READ_AHEAD)
    ds = ds.map(PairEncoder(tokenizer, seq_len, BadRecords(bad_records, skipped, patience)))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=PAIR_READ_AHEAD))
    return ds.batch(batch_size, drop_remainder=drop_remainder).map(to_pair_batch)


def to_pair_batch(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked [chosen; rejected] model inputs; padding has segment id 0 and no loss."""
    tokens = np.concatenate([rows["chosen_tokens"], rows["rejected_tokens"]])
    mask = np.concatenate([rows["chosen_mask"], rows["rejected_mask"]])
    lengths = np.concatenate([rows["chosen_length"], rows["rejected_length"]])
    width = tokens.shape[1] - 1
    real = np.arange(width)[None, :] < lengths[:, None]
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": (mask[:, 1:] * real).astype(np.float32),
        "segment_ids": real.astype(np.int32),
        "positions": np.broadcast_to(np.arange(width, dtype=np.int32), real.shape).copy(),
        "index": rows["index"].astype(np.int32),
        "lengths": lengths.astype(np.int32),  # tokens per row (a reward model reads the last)
    }
