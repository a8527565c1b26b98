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


def plot_quality_vs_size(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """The paper's Figure 5 (file size per quant type) with quality added: file size against
    perplexity ratio and mean KL, one point per row (`quant`, `bytes`, `perplexity_ratio`, `kl_mean`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.6))
    sizes = [r["bytes"] / 1e6 for r in rows]
    for ax, key, label in ((ax_ppl, "perplexity_ratio", "perplexity / F32"), (ax_kl, "kl_mean", "mean KL to F32 (nats)")):
        ax.plot(sizes, [r[key] for r in rows], "o-")
        for size, r in zip(sizes, rows):
            ax.annotate(r["quant"], (size, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
