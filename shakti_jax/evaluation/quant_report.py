"""How far a model (a quantized export) is from a reference on the same text: what
`llama-perplexity --kl-divergence` reports, from any two backends.

KL(reference || model) of the next-token distributions at every scored position, its mean,
median, 99th / 99.9th percentiles and maximum; the share of positions where both models' top-1
token agree; both perplexities and their ratio. The requests are the perplexity task's rolling
windows, so the numbers are over exactly the tokens perplexity is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from shakti_jax.evaluation.requests import Request


def compare(model, reference, requests: Sequence[Request]) -> dict:
    """KL / top-1 / perplexity of `model` against `reference` (both backends) on `requests`."""
    kl_parts, same_top1, ll_model, ll_reference, tokens = [], 0, 0.0, 0.0, 0
    for request, logp_model, logp_ref in zip(requests, model.logprobs(requests), reference.logprobs(requests)):
        logp_model = np.asarray(logp_model, np.float64)
        logp_ref = np.asarray(logp_ref, np.float64)
        kl_parts.append(np.sum(np.exp(logp_ref) * (logp_ref - logp_model), axis=-1))
        same_top1 += int(np.sum(logp_model.argmax(-1) == logp_ref.argmax(-1)))
        rows, targets = np.arange(len(request.continuation)), list(request.continuation)
        ll_model += float(logp_model[rows, targets].sum())
        ll_reference += float(logp_ref[rows, targets].sum())
        tokens += len(targets)
    kl = np.maximum(np.concatenate(kl_parts), 0.0)  # float rounding can make a zero slightly negative
    ppl_model, ppl_reference = math.exp(-ll_model / tokens), math.exp(-ll_reference / tokens)
    return {"perplexity": ppl_model, "reference_perplexity": ppl_reference,
            "perplexity_ratio": ppl_model / ppl_reference, "kl_mean": float(kl.mean()),
            "kl_median": float(np.median(kl)), "kl_p99": float(np.percentile(kl, 99)),
            "kl_p99_9": float(np.percentile(kl, 99.9)), "kl_max": float(kl.max()),
            "top1_agreement": same_top1 / tokens, "tokens": tokens}


def deltas(results: dict[str, dict], reference: dict[str, dict]) -> dict[str, dict]:
    """model - reference for every numeric metric the two share, per task."""
    out = {}
    for task, metrics in results.items():
        base = reference.get(task, {})
        out[task] = {k: v - base[k] for k, v in metrics.items()
                     if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float))
                     and k not in ("n", "seconds", "tokens", "bytes", "words")}
    return out


def export_report(results, text: str, out: Path, *, max_len: int = 512, step: int | None = None) -> str:
    """For `convert`'s GGUF results: each file in llama.cpp against its checkpoint in JAX on
    `text`; writes `quant_report.json` and `quality_vs_size.png` beside the exports and
    returns the table."""
    import json

    from data_pipelines.atomic import write_atomic
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.evaluation.backends import JaxBackend, LlamaCppBackend
    from shakti_jax.evaluation.perplexity import perplexity_requests
    from shakti_jax.plots import quality_vs_size_figure
    from shakti_jax.train.checkpoint import load_params

    folder = out if out.is_dir() else out.parent
    rows = []
    for checkpoint in dict.fromkeys(r.job.checkpoint for r in results):
        loaded = load_params(checkpoint, step)
        reference = JaxBackend(loaded.model_def, loaded.params, max_len=max_len)
        requests = perplexity_requests(Tokenizer.load(loaded.tokenizer_path), [text], reference.max_len)
        for result in (r for r in results if r.job.checkpoint == checkpoint):
            model = LlamaCppBackend(result.job.out, max_len=reference.max_len)
            rows.append({"checkpoint": checkpoint.name, "quant": result.job.quant, "bytes": result.bytes,
                         "file": str(result.job.out), **compare(model, reference, requests)})
            model.close()
        del loaded, reference
    write_atomic(folder / "quant_report.json", (json.dumps(rows, indent=2) + "\n").encode())
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = sorted((r for r in rows if r["checkpoint"] == checkpoint), key=lambda r: r["bytes"])
        name = "quality_vs_size.png" if len(rows) == len(mine) else f"{checkpoint}-quality_vs_size.png"
        quality_vs_size_figure(mine, folder / name, title=f"{checkpoint}: llama.cpp vs the JAX checkpoint")
    lines = ["| checkpoint | quant | MB | perplexity | vs JAX | mean KL | KL p99.9 | top-1 agree |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['quant']} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
              f"{r['perplexity_ratio']:.4f} | {r['kl_mean']:.5f} | {r['kl_p99_9']:.4f} | {r['top1_agreement']:.4f} |"
              for r in rows]
    return "\n".join(lines)
