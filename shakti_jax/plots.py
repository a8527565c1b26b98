"""Figures shared by the notebooks, the CLIs (`eval --figure`, `convert --report`) and the
benchmarks: matplotlib on the Agg backend, every figure written atomically as a PNG.

Each `*_figure` function takes plain data (dicts of numbers, metrics rows, mask specs) and a
path and returns the path; `new` and `save` are the two steps they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from shakti_jax.ops.masks import MaskSpec

# The headline metric of each evaluation task kind (the one its table in the paper reports).
HEADLINE = {"perplexity": "token_perplexity", "crows_pairs": "pct_stereotype", "toxigen": "acc",
            "bbq": "acc", "pubmedqa": "acc", "arc": "acc", "piqa": "acc", "hellaswag": "acc_norm",
            "mmlu": "acc", "winogrande": "acc", "mc": "acc", "pubmedqa_answers": "rouge_l"}


def new(ncols: int = 1, width: float = 4.5, height: float = 3.4):
    """A figure with `ncols` axes side by side (the axes as a list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: str | Path, title: str = "") -> Path:
    """Lay out, title, write `path` atomically (a temporary file renamed), close."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def curves(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
           xlabel: str = "step", ylabel: str = "", logx: bool = False, marker: str | None = None) -> None:
    """One line per label from (x, y) pairs of sequences."""
    for label, (x, y) in series.items():
        ax.plot(x, y, marker=marker, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def metric_series(rows: Sequence[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x, y) of `key` over the metrics rows that have it (metrics.jsonl as read_metrics gives)."""
    have = [r for r in rows if key in r and x in r]
    return [r[x] for r in have], [r[key] for r in have]


def bars(ax, groups: Mapping[str, Mapping[str, float]], *, title: str = "", ylabel: str = "") -> None:
    """Grouped bars: one group per key of `groups`, one bar per inner key (the same in every group)."""
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, [g.get(name, np.nan) for g in groups.values()], width, label=name)
    ax.set_xticks(np.arange(len(groups)), list(groups), fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    if len(names) > 1:
        ax.legend(fontsize=8)


def masks_figure(specs: Mapping[str, MaskSpec], seq_len: int, path: str | Path) -> Path:
    """Each mask as a seq_len x seq_len picture of `MaskSpec.allowed` (dark: the query sees the key)."""
    fig, axes = new(len(specs), width=3.0, height=3.2)
    positions = np.arange(seq_len)
    for ax, (name, spec) in zip(axes, specs.items()):
        allowed = np.asarray(spec.allowed(positions, positions))
        ax.imshow(allowed, cmap="Greys", interpolation="nearest")
        ax.set_title(f"{name}: {allowed.sum() / allowed.shape[0]:.1f} keys/query", fontsize=9)
        ax.set(xlabel="key position", ylabel="query position")
    return save(fig, path)


def quality_vs_size_figure(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """The paper's Figure 5 (file size per quant type) with quality added: file size against
    perplexity ratio and mean KL, one point per row (`quant`, `bytes`, `perplexity_ratio`, `kl_mean`)."""
    fig, axes = new(2)
    sizes = [r["bytes"] / 1e6 for r in rows]
    for ax, key, label in zip(axes, ("perplexity_ratio", "kl_mean"), ("perplexity / F32", "mean KL to F32 (nats)")):
        ax.plot(sizes, [r[key] for r in rows], "o-")
        for size, r in zip(sizes, rows):
            ax.annotate(r["quant"], (size, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="file size (MB)", ylabel=label)
        ax.grid(alpha=0.3)
    return save(fig, path, title)


def headline(task_name: str, metrics: Mapping[str, float]) -> tuple[str, float] | None:
    """A task's headline metric (name, value) from `eval`'s results, if it reports it."""
    key = HEADLINE.get(task_name.partition(":")[0].partition("@")[0])
    return (key, metrics[key]) if key in metrics else None


def eval_figure(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path,
                title: str = "") -> Path:
    """`eval` results of several models (label -> task -> metrics) as one panel per task: the
    task's headline metric, one bar per model."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    panels = {}
    for task in tasks:
        values = {label: headline(task, r[task]) for label, r in results.items() if task in r}
        values = {label: v for label, v in values.items() if v is not None}
        if values:
            panels[task] = values
    if not panels:
        raise ValueError("none of the tasks reports a headline metric")
    fig, axes = new(len(panels), width=3.4)
    for ax, (task, values) in zip(axes, panels.items()):
        metric = next(iter(values.values()))[0]
        ax.bar(range(len(values)), [v for _, v in values.values()], color=[f"C{i}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), list(values), fontsize=8, rotation=20)
        kind = task.partition(":")[0]
        ax.set_title(f"{kind}: {metric}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return save(fig, path, title)
