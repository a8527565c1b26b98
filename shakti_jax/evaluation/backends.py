"""Backends that answer `Request`s: JAX (training checkpoints), llama.cpp (GGUF files),
transformers (HF folders). Each has the same three calls:

- `score(requests)`: one `Score` per request, in request order;
- `logprobs(requests)`: per request, the float32 [n, V] next-token log-distributions at the
  continuation's positions (the quantization report's KL divergence), in request order;
- `generate(prompts, max_new_tokens, stop_ids)`: greedy continuations, cut at a stop id.

JAX: requests sorted by length, padded to power-of-two lengths and row counts (at most
`batch_size` rows and `tokens_per_batch` tokens), so the jitted scorer compiles for a few
shapes only; log-softmax in float32 on device, only the per-position target log-probs and
greedy flags come back.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shakti_jax.evaluation.requests import Request, Score, fit

MIN_BUCKET = 32
Progress = Callable[[int], None] | None


def _bucket(n: int, max_len: int) -> int:
    """`n` rounded up to a multiple of a quarter of the power of two below it (above 128
    tokens at most 1.25x padding and 4 compiled lengths per octave), at least MIN_BUCKET,
    at most `max_len`."""
    step = max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length() - 3))
    return min(max(MIN_BUCKET, -(-n // step) * step), max_len)


def _until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    stops = set(stop_ids)
    return list(ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _score_of(logp: np.ndarray, targets: Sequence[int]) -> Score:
    """The Score of [n, V] log-probs for `targets`."""
    rows = np.arange(len(targets))
    return Score(float(np.sum(logp[rows, targets], dtype=np.float64)),
                 bool(np.all(logp.argmax(-1) == np.asarray(targets))))


class JaxBackend:
    """Scores with a ModelDef and its params (a workdir's checkpoint, or anything in memory)."""

    def __init__(self, model_def, params, *, batch_size: int = 8, max_len: int | None = None,
                 tokens_per_batch: int = 8192):
        self.max_len = min(max_len or model_def.config.max_seq_len, model_def.config.max_seq_len)
        self.batch_size, self.tokens_per_batch = batch_size, tokens_per_batch
        self.model_def, self.params = model_def, params
        self._generator = None

        def log_probs(params, tokens_BT):
            return jax.nn.log_softmax(model_def.apply(params, tokens_BT).astype(jnp.float32), axis=-1)

        def scorer(params, tokens_BT, at_BK, targets_BK):
            """Log-probs and greedy hits of `targets_BK` at the input indices `at_BK` only: the
            LM head and log-softmax skip the context positions nobody scores."""
            logits_BKV = model_def.apply(params, tokens_BT, logits_at_BK=at_BK)
            logp_BKV = jax.nn.log_softmax(logits_BKV.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp_BKV, targets_BK[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logp_BKV, axis=-1) == targets_BK

        self._scorer, self._log_probs = jax.jit(scorer), jax.jit(log_probs)

    def _batches(self, requests: Sequence[Request], ordered: bool) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """([(request index, input length, scored positions)], tokens [rows, T], targets [rows, T])
        batches; longest first unless `ordered` (request order, for streams that keep it)."""
        fitted = [fit(r, self.max_len) for r in requests]
        order = list(range(len(requests)))
        if not ordered:
            order.sort(key=lambda i: -len(fitted[i][0]))
        start = 0
        while start < len(order):
            T = _bucket(max(len(fitted[i][0]) for i in order[start:start + self.batch_size]), self.max_len)
            rows = max(1, min(self.batch_size, self.tokens_per_batch // T))  # long rows: fewer
            chunk = order[start:start + rows]
            T = _bucket(max(len(fitted[i][0]) for i in chunk), self.max_len)
            start += len(chunk)
            rows = min(rows, 1 << (len(chunk) - 1).bit_length())  # a small last batch: fewer pad rows
            tokens = np.zeros((rows, T), np.int32)
            targets = np.zeros((rows, T), np.int32)
            for row, i in enumerate(chunk):
                inputs, _ = fitted[i]
                full = list(requests[i].tokens)[-(len(inputs) + 1):]
                tokens[row, :len(inputs)] = inputs
                targets[row, :len(inputs)] = full[1:]
            yield [(i, len(fitted[i][0]), fitted[i][1]) for i in chunk], tokens, targets

    def score(self, requests: Sequence[Request], progress: Progress = None) -> list[Score]:
        scores: list[Score | None] = [None] * len(requests)
        for chunk, tokens, targets in self._batches(requests, ordered=False):
            # the scored positions of each row, left-aligned and padded by repeating the last
            # one; K is a power of two (at least 8) so few shapes compile
            K = min(tokens.shape[1], max(8, 1 << (max(n for _, _, n in chunk) - 1).bit_length()))
            at = np.zeros((tokens.shape[0], K), np.int32)
            for row, (_, length, n) in enumerate(chunk):
                at[row] = np.minimum(np.arange(length - n, length - n + K), length - 1)
            picked, greedy = jax.device_get(self._scorer(self.params, tokens, at,
                                                         np.take_along_axis(targets, at, axis=1)))
            for row, (i, _, n) in enumerate(chunk):
                scores[i] = Score(float(np.sum(picked[row, :n], dtype=np.float64)),
                                  bool(greedy[row, :n].all()))
            if progress:
                progress(len(chunk))
        return scores

    def logprobs(self, requests: Sequence[Request]) -> Iterator[np.ndarray]:
        for chunk, tokens, _ in self._batches(requests, ordered=True):
            logp = jax.device_get(self._log_probs(self.params, tokens))
            for row, (_, length, n) in enumerate(chunk):
                yield logp[row, length - n:length]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations (compile-once generator, `batch_size` prompts at a time), each
        cut before its first stop id; prompts are cut from the left to fit."""
        from shakti_jax.generate import Generator

        self._generator = self._generator or Generator(self.model_def, self.params)
        keep = self.model_def.config.max_seq_len - max_new_tokens
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [list(p)[-keep:] for p in prompts[start:start + self.batch_size]]
            generation = self._generator(chunk, max_new_tokens=max_new_tokens, eos_id=stop_ids[0])
            out += [_until_stop(ids, stop_ids) for ids in generation.tokens]
        return out


class _OneByOne:
    """Runtimes scored one request at a time: subclasses give `_logits(inputs, n)`, the raw
    [n, V] logits of the last `n` input positions."""

    max_len: int

    def _logits(self, inputs: list[int], n: int) -> np.ndarray:
        raise NotImplementedError

    def logprobs(self, requests: Sequence[Request]) -> Iterator[np.ndarray]:
        for request in requests:
            inputs, n = fit(request, self.max_len)
            yield _log_softmax(self._logits(inputs, n)).astype(np.float32)

    def score(self, requests: Sequence[Request], progress: Progress = None) -> list[Score]:
        """Requests in token order, so the choices of one item (one context, several
        continuations) come one after another and a runtime can keep their common prefix."""
        fitted = [fit(r, self.max_len) for r in requests]
        scores: list[Score | None] = [None] * len(requests)
        for i in sorted(range(len(requests)), key=lambda i: fitted[i][0]):
            inputs, n = fitted[i]
            scores[i] = _score_of(_log_softmax(self._logits(inputs, n)), requests[i].continuation)
            if progress:
                progress(1)
        return scores


class LlamaCppBackend(_OneByOne):
    """Scores with llama.cpp running a GGUF file exactly as it runs on a device (CPU)."""

    def __init__(self, path, *, max_len: int = 2048, n_threads: int | None = None):
        from shakti_jax.export import llama_runtime

        self.max_len = max_len
        # F32 KV cache: the file's own arithmetic, without f16 rounding of keys and values
        self.llm = llama_runtime.load(path, n_ctx=max_len + 1, n_threads=n_threads, type_k=0, type_v=0)

    def _logits(self, inputs: list[int], n: int) -> np.ndarray:
        """The KV cache of the longest prefix shared with the previous input is kept (as
        llama.cpp's own prompt cache does), only the rest is evaluated."""
        cached = self.llm.input_ids[:self.llm.n_tokens]
        keep = min(len(inputs) - 1, len(cached))
        differs = np.flatnonzero(cached[:keep] != np.asarray(inputs[:keep]))
        self.llm.n_tokens = int(differs[0]) if differs.size else keep
        self.llm.eval(inputs[self.llm.n_tokens:])
        return np.array(self.llm.scores[len(inputs) - n:len(inputs)])

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations as llama.cpp samples them (top_k 1), cut at a stop id."""
        out = []
        for prompt in prompts:
            self.llm.reset()
            ids: list[int] = []
            stream = self.llm.generate(list(prompt)[-(self.max_len - max_new_tokens):], top_k=1, temp=0.0)
            for token in stream:
                if token in stop_ids or token == self.llm.token_eos():
                    break
                ids.append(token)
                if len(ids) == max_new_tokens:
                    break
            out.append(ids)
        return out

    def close(self) -> None:
        self.llm.close()


class TransformersBackend(_OneByOne):
    """Scores with transformers (CPU torch, float32) running an HF folder."""

    def __init__(self, folder, *, max_len: int = 2048):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_len = max_len

    def _logits(self, inputs: list[int], n: int) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([inputs])).logits[0, len(inputs) - n:].double().numpy()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations (`generate(do_sample=False)`), cut at a stop id."""
        out = []
        for prompt in prompts:
            inputs = self.torch.tensor([list(prompt)[-(self.max_len - max_new_tokens):]])
            with self.torch.no_grad():
                ids = self.model.generate(inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=list(stop_ids), pad_token_id=stop_ids[0])
            out.append(_until_stop(ids[0, inputs.shape[1]:].tolist(), stop_ids))
        return out
