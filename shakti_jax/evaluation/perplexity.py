"""Perplexity, bits per byte and word perplexity of texts, in lm-eval's rolling windows.

Corpus-level sums: every token of every document is scored once (`rolling_requests`), the
first one after a prefix token (BOS, or EOS for tokenizers without one). bits_per_byte is
-sum LL / UTF-8 bytes / ln 2 (independent of the tokenizer); word_perplexity is
exp(-sum LL / whitespace-separated words).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from data_pipelines.tokenizer import Tokenizer
from shakti_jax.evaluation.requests import Request, rolling_requests


def perplexity_requests(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[Request]:
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return [r for text in texts for r in rolling_requests(tokenizer.encode(text), prefix, max_len)]


def perplexity(backend, tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> dict:
    """The metrics of `texts` under `backend` (anything with `score(requests)`)."""
    requests = perplexity_requests(tokenizer, texts, min(max_len, backend.max_len))
    total = sum(s.logprob for s in backend.score(requests))
    tokens = sum(len(r.continuation) for r in requests)
    utf8 = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(re.split(r"\s+", t.strip())) for t in texts if t.strip())
    return {"token_perplexity": math.exp(-total / tokens), "bits_per_byte": -total / utf8 / math.log(2),
            "byte_perplexity": math.exp(-total / utf8), "word_perplexity": math.exp(-total / words),
            "loglikelihood": total, "tokens": tokens, "bytes": utf8, "words": words}
