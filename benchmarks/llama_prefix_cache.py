"""llama.cpp scoring with the shared-prefix KV cache vs every request from scratch (a script).

    python -m benchmarks.llama_prefix_cache GGUF [--items 4]

The first `--items` BBQ items per category and PubMedQA questions (their requests as the
evaluation harness builds them), scored by `LlamaCppBackend.score` (token order, the KV
cache of the prefix shared with the previous input kept) and then one by one from an empty
cache: seconds of each and the largest per-request log-likelihood difference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shakti_jax.evaluation.backends import _log_softmax, _score_of
from shakti_jax.evaluation.models import open_model
from shakti_jax.evaluation.requests import Score, fit
from shakti_jax.evaluation.suite import parse_tasks, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class _Recorder:
    """A backend that only collects the requests a task sends."""

    def __init__(self):
        self.requests = []

    def score(self, requests, progress=None):
        self.requests += list(requests)
        return [Score(-1.0, False)] * len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=1024)
    args = parser.parse_args()
    model = open_model(f"gguf:{args.gguf}", max_len=args.max_len)
    recorder = _Recorder()
    tasks = f"bbq@{args.items}:{SHARED}/eval/bbq,pubmedqa@{args.items}:{SHARED}/domain/pubmedqa_pqal.json"
    for task in parse_tasks(tasks):
        prepare(task)(recorder, model.tokenizer, args.max_len)
    requests, llm = recorder.requests, model.backend.llm
    start = time.perf_counter()
    shared = model.backend.score(requests)
    shared_s = time.perf_counter() - start
    start = time.perf_counter()
    scratch = []
    for request in requests:
        llm.reset()
        inputs, n = fit(request, args.max_len)
        llm.eval(inputs)
        scratch.append(_score_of(_log_softmax(np.array(llm.scores[len(inputs) - n:len(inputs)])),
                                 request.continuation))
    scratch_s = time.perf_counter() - start
    diff = max(abs(a.logprob - b.logprob) for a, b in zip(shared, scratch))
    print(f"{Path(args.gguf).name}: {len(requests)} requests; shared prefix {shared_s:.1f} s, from scratch "
          f"{scratch_s:.1f} s ({scratch_s / shared_s:.1f}x); max |logprob diff| {diff:.2e}; greedy flags "
          f"{'equal' if all(a.greedy == b.greedy for a, b in zip(shared, scratch)) else 'differ'}")
    model.close()


if __name__ == "__main__":
    main()
