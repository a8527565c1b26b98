"""Running exported GGUF files in llama.cpp (the optional `edge` extra): greedy decoding and
decode speed, for the demo and the edge benchmarks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from shakti_jax.export.gguf_export import EDGE_EXTRA_HINT
from shakti_jax.export.canonical import ExportError


def load(path: str | Path, n_ctx: int = 0, n_threads: int | None = None, **options):
    """A llama_cpp.Llama for `path`: CPU, no flash attention, n_ctx 0 meaning the model's own
    context, logits kept for every position (llama-cpp-python only exposes them that way);
    `options` go to `llama_cpp.Llama` (e.g. type_k=0, type_v=0 for an F32 KV cache)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"running GGUF files needs llama.cpp: {EDGE_EXTRA_HINT}") from None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                           logits_all=True, flash_attn=False, verbose=False, **options)


def greedy(llm, prompt: Sequence[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
    """Greedy continuation of `prompt` (token ids, BOS included), without the stop token."""
    llm.reset()
    llm.eval(list(prompt))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token == stop_id:
            break
        out.append(token)
        llm.eval([token])
    return out


def decode_tokens_per_sec(llm, prompt: Sequence[int], new_tokens: int) -> float:
    """Greedy decode speed after a prefill of `prompt`, one token per llama.cpp call."""
    llm.reset()
    llm.eval(list(prompt))
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    return new_tokens / (time.perf_counter() - start)
