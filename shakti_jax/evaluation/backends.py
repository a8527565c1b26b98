"""Backends that score `Request`s: JAX (training checkpoints), llama.cpp (GGUF files),
transformers (HF folders). Each returns one `Score` per request, in request order.

JAX: requests sorted by length, padded to power-of-two lengths and row counts (at most
`batch_size` rows and `tokens_per_batch` tokens), so the jitted scorer compiles for a few
shapes only; log-softmax in float32 on device, only the per-position target log-probs and
greedy flags come back.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.evaluation.requests import Request, Score, fit

MIN_BUCKET = 32


def _bucket(n: int, max_len: int) -> int:
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)


def _target_logprobs(logits: np.ndarray, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of log p(targets) and whether each target is the argmax, from [n, V] logits."""
    logits = np.asarray(logits, np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    rows = np.arange(len(targets))
    return float(logp[rows, targets].sum()), bool(np.all(logits.argmax(-1) == np.asarray(targets)))


class JaxBackend:
    """Scores with a ModelDef and its params (a workdir's checkpoint, or anything in memory)."""

    def __init__(self, model_def, params, *, batch_size: int = 8, max_len: int | None = None,
                 tokens_per_batch: int = 8192):
        self.max_len = min(max_len or model_def.config.max_seq_len, model_def.config.max_seq_len)
        self.batch_size, self.tokens_per_batch = batch_size, tokens_per_batch
        self.params = params

        def scorer(params, tokens_BT, targets_BT):
            logits = model_def.apply(params, tokens_BT).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets_BT

        self._scorer = jax.jit(scorer)

    def score(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        fitted = [fit(r, self.max_len) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(fitted[i][0]))
        scores: list[Score | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            T = _bucket(len(fitted[order[start]][0]), self.max_len)
            rows = max(1, min(self.batch_size, self.tokens_per_batch // T))  # long rows: fewer
            chunk = order[start:start + rows]
            start += len(chunk)
            rows = min(rows, 1 << (len(chunk) - 1).bit_length())  # a small last batch: fewer pad rows
            tokens = np.zeros((rows, T), np.int32)
            targets = np.zeros((rows, T), np.int32)
            for row, i in enumerate(chunk):
                inputs, _ = fitted[i]
                full = list(requests[i].tokens)[-(len(inputs) + 1):]
                tokens[row, :len(inputs)] = inputs
                targets[row, :len(inputs)] = full[1:]
            picked, greedy = jax.device_get(self._scorer(self.params, tokens, targets))
            for row, i in enumerate(chunk):
                length, n = len(fitted[i][0]), fitted[i][1]
                scores[i] = Score(float(np.sum(picked[row, length - n:length], dtype=np.float64)),
                                  bool(greedy[row, length - n:length].all()))
            if progress:
                progress(len(chunk))
        return scores


class LlamaCppBackend:
    """Scores with llama.cpp running a GGUF file exactly as it runs on a device (CPU)."""

    def __init__(self, path, *, max_len: int = 2048, n_threads: int | None = None):
        from shakti_jax.export import llama_runtime

        self.max_len = max_len
        # F32 KV cache: the file's own arithmetic, without f16 rounding of keys and values
        self.llm = llama_runtime.load(path, n_ctx=max_len + 1, n_threads=n_threads, type_k=0, type_v=0)

    def score(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        scores = []
        for request in requests:
            inputs, n = fit(request, self.max_len)
            self.llm.reset()
            self.llm.eval(inputs)
            logits = np.array(self.llm.scores[len(inputs) - n:len(inputs)])
            scores.append(Score(*_target_logprobs(logits, request.continuation)))
            if progress:
                progress(1)
        return scores

    def close(self) -> None:
        self.llm.close()


class TransformersBackend:
    """Scores with transformers (CPU torch, float32) running an HF folder."""

    def __init__(self, folder, *, max_len: int = 2048):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_len = max_len

    def score(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        scores = []
        for request in requests:
            inputs, n = fit(request, self.max_len)
            with self.torch.no_grad():
                logits = self.model(self.torch.tensor([inputs])).logits[0, len(inputs) - n:].double().numpy()
            scores.append(Score(*_target_logprobs(logits, request.continuation)))
            if progress:
                progress(1)
        return scores
