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
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset, index_shuffle

from data_pipelines.chat import Rendered, render, truncate
from data_pipelines.records import Conversation, PreferencePair
from data_pipelines.sources import DataError, Document, SourceSpec, open_source
from data_pipelines.tokenizer import BOS_ID, EOS_ID, Tokenizer

BAD_RECORD_POLICIES = ("error", "skip")
_EPOCHS = 1_000_000  # "forever": the index space covers this many passes over each source


class SkippedRecords:
    """Thread-safe counts of skipped records by problem (and of prompt tokens trimmed to fit
    the context), reported in the metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self.trimmed_tokens = 0

    def add(self, problem: str) -> None:
        with self._lock:
            self._counts[problem] += 1

    def add_trimmed(self, tokens: int) -> None:
        with self._lock:
            self.trimmed_tokens += tokens

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


class ConversationEncoder:
    """Conversation -> {"tokens", "loss_mask"} of at most `max_len` tokens, or None / DataError."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, bad_records: str,
                 skipped: SkippedRecords, last_turn_only: bool = False):
        self._tokenizer, self._max_len = tokenizer, max_len
        self._last_turn_only = last_turn_only
        self._policy = DocumentTokenizer(tokenizer, bad_records, skipped)
        self._skipped = skipped

    def reject(self, where: str, problem: str) -> None:
        self._policy(Document(None, where, problem))  # raises, or counts the skip

    def encode(self, messages, where: str, cut: int | None = None) -> Rendered | None:
        """Render and fit into the context; `cut` instead trims exactly that many prompt
        tokens (so two replies can share one trimmed prompt)."""
        full = render(self._tokenizer, messages, last_turn_only=self._last_turn_only)
        length = len(full.ids)
        rendered = truncate(full, min(self._max_len, length) if cut is None else length - cut)
        if rendered is None:
            self.reject(where, f"answer alone is longer than the context ({self._max_len} tokens)")
            return None
        self._skipped.add_trimmed(rendered.trimmed)
        return rendered

    def __call__(self, conversation: Conversation) -> dict[str, np.ndarray] | None:
        if conversation.messages is None:
            self.reject(conversation.where, conversation.problem)
            return None
        rendered = self.encode(conversation.messages, conversation.where)
        return None if rendered is None else {"tokens": rendered.ids, "loss_mask": rendered.loss_mask}


def sft_batches(sources: Sequence[tuple[str, Sequence[Conversation]]], tokenizer: Tokenizer, *,
                batch_size: int, seq_len: int, seed: int | None, holdout_every: int = 0,
                part: str = "train", bad_records: str = "error",
                skipped: SkippedRecords | None = None, process_index: int = 0,
                process_count: int = 1, num_threads: int = 2) -> grain.IterDataset:
    """Packed SFT batches: whole conversations (never split) packed first-fit into rows, with
    the loss on assistant tokens only. `seed=None` reads the `part` once in file order."""
    encode = ConversationEncoder(tokenizer, seq_len + 1, bad_records, skipped or SkippedRecords())
    ds = _records_dataset(sources, holdout_every, part, seed, process_index, process_count)
    ds = ds.map(encode).to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                          prefetch_buffer_size=256))
    length = {"tokens": seq_len + 1, "loss_mask": seq_len + 1}
    ds = FirstFitPackIterDataset(ds, length_struct=length, num_packing_bins=max(batch_size, 8),
                                 seed=seed or 0, shuffle_bins=seed is not None)
    return ds.batch(batch_size, drop_remainder=True).map(to_model_batch)


def _records_dataset(sources, holdout_every: int, part: str, seed: int | None,
                     process_index: int, process_count: int) -> grain.MapDataset:
    parts = []
    for s, (name, records) in enumerate(sources):
        indices = split_indices(len(records), holdout_every, part)
        if len(indices) == 0:
            raise DataError(f"data source {name} has no {part} records")
        if seed is None:
            parts.append(grain.MapDataset.source([records[int(i)] for i in indices]))
        else:
            parts.append(_shuffled_forever(records, indices, seed * 1009 + s))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts) if seed is None \
        else grain.MapDataset.mix(parts)
    return ds[process_index::process_count]


class PairEncoder:
    """PreferencePair -> chosen / rejected rows padded to `seq_len + 1`, sharing one prompt."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, bad_records: str,
                 skipped: SkippedRecords):
        self._encoder = ConversationEncoder(tokenizer, seq_len + 1, bad_records,
                                            skipped or SkippedRecords(), last_turn_only=True)
        self._tokenizer, self._length = tokenizer, seq_len + 1

    def __call__(self, item: tuple[int, PreferencePair]) -> dict[str, np.ndarray] | None:
        index, pair = item
        if pair.prompt is None:
            self._encoder.reject(pair.where, pair.problem)
            return None
        # Both sides drop the same prompt tokens, so they are scored on one shared prompt.
        turns = [[*pair.prompt, ("assistant", answer)] for answer in (pair.chosen, pair.rejected)]
        cut = max(0, max(len(render(self._tokenizer, t).ids) for t in turns) - self._length)
        chosen, rejected = (self._encoder.encode(t, pair.where, cut) for t in turns)
        if chosen is None or rejected is None:
            return None
        out = {"index": np.int32(index)}
        for name, r in (("chosen", chosen), ("rejected", rejected)):
            pad = self._length - len(r.ids)
            out[f"{name}_tokens"] = np.pad(r.ids, (0, pad))
            out[f"{name}_mask"] = np.pad(r.loss_mask, (0, pad))
            out[f"{name}_length"] = np.int32(len(r.ids))
        return out


def dpo_batches(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, *, batch_size: int,
                seq_len: int, seed: int | None, holdout_every: int = 0, part: str = "train",
                bad_records: str = "error", skipped: SkippedRecords | None = None,
                process_index: int = 0, process_count: int = 1,
                drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `batch_size` pairs as one forward batch of 2 x batch_size rows (chosen rows
    first), with `index` (position of each pair in `pairs`, for precomputed reference
    log-probs). `seed=None` reads the `part` once in order."""
    indices = split_indices(len(pairs), holdout_every, part)
    if len(indices) == 0:
        raise DataError(f"no {part} preference pairs")
    items = [(int(i), pairs[int(i)]) for i in indices]
    ds = grain.MapDataset.source(items)
    if seed is not None:
        ds = _shuffled_forever(items, np.arange(len(items)), seed)
    ds = ds[process_index::process_count].map(PairEncoder(tokenizer, seq_len, bad_records, skipped))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
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
    }
