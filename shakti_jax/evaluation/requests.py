"""The one request every backend answers: the log-likelihood of a continuation given a context.

Requests hold token ids, tokenized once by the model's tokenizer, so every backend scores the
same tokens and per-request log-likelihoods are comparable across JAX, llama.cpp and
transformers. Rolling windows over a long text follow lm-evaluation-harness
(`get_rolling_token_windows` + `make_disjoint_window`): every token is predicted exactly once,
with up to `max_len - 1` tokens of context.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from data_pipelines.errors import UserError


@dataclasses.dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # at least one token (a prefix token for text that starts a document)
    continuation: tuple[int, ...]  # the scored tokens, at least one

    def __post_init__(self):
        if not self.context or not self.continuation:
            raise ValueError("a request needs a non-empty context and continuation")

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.context + self.continuation


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation's token log-probabilities (nats)
    greedy: bool  # whether greedy decoding from the context produces the continuation


def fit(request: Request, max_len: int) -> tuple[list[int], int]:
    """(input ids, number of scored positions at their end) within `max_len` inputs: the
    context is cut from the left when the whole does not fit (lm-eval's rule)."""
    tokens = list(request.tokens)[-(max_len + 1):]
    n = len(request.continuation)
    if n > max_len:
        raise UserError(f"a scored continuation of {n} tokens does not fit max_len={max_len} (raise --max_len)")
    return tokens[:-1], n


def rolling_requests(ids: Sequence[int], prefix_id: int, max_len: int) -> Iterator[Request]:
    """Disjoint windows that score every token of `ids` once (lm-eval's rolling log-likelihood
    with context_len 1): each window has `max_len` input tokens at most."""
    ids = list(ids)
    if not ids:
        return
    first = min(max_len, len(ids))
    yield Request((prefix_id,), tuple(ids[:first]))
    predicted = first
    while predicted < len(ids):
        n = min(len(ids) - predicted, max_len)
        end = predicted + n
        context = ids[max(end - max_len - 1, 0):end - 1]
        yield Request(tuple(context[:len(context) - (n - 1)]), tuple(ids[end - n:end]))
        predicted = end
