"""Evaluate a training workdir, a GGUF file or an HF folder on the same requests.

    python -m shakti_jax.eval --model runs/smollm2 --tasks perplexity:../shared/data/pretrain/wikitext2_valid.txt
    python -m shakti_jax.eval --model gguf:exports/sft-135M-Q4_0.gguf --tasks bbq:../shared/data/eval/bbq \\
        --reference runs/sft --out results.json

Backends: JAX for workdirs, llama.cpp for `gguf:PATH`, transformers for `hf:DIR`. Requests are
token ids from the model's own tokenizer (the one in the workdir, the GGUF file or the folder),
so every backend scores the same tokens. Tasks are `kind:PATH` on local files (see --help for
the kinds). `--reference MODEL` scores the reference on the same tasks, reports the deltas, and
for perplexity tasks the KL divergence / top-1 agreement of the two models' next-token
distributions (what `llama-perplexity --kl-divergence` reports).

Results are written atomically as JSON (`--out`) after every task with `"complete": false`,
and once more with `"complete": true` at the end; a markdown table is printed.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from data_pipelines.atomic import write_atomic
from data_pipelines.cli import ArgumentParser, run_main
from data_pipelines.errors import UserError
from shakti_jax.evaluation.models import open_model
from shakti_jax.evaluation.perplexity import perplexity_requests
from shakti_jax.evaluation.quant_report import compare, deltas
from shakti_jax.evaluation.suite import TASK_HELP, Runner, Task, parse_tasks, prepare


class _Progress:
    """A backend whose `score` calls advance one progress bar (requests, with ETA)."""

    def __init__(self, backend, bar: tqdm):
        self.backend, self.bar = backend, bar

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def score(self, requests, progress=None):
        self.bar.reset(total=len(requests))
        return self.backend.score(requests, progress=self.bar.update)


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for name, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                lines.append(f"| {name} | {key} | {value:.4f} |" if isinstance(value, float)
                             else f"| {name} | {key} | {value} |")
    return "\n".join(lines)


def evaluate(model, runners: dict[str, Runner], *, max_len: int, label: str, progress: bool,
             on_task=None) -> dict[str, dict]:
    """Every prepared task on `model`, with a progress bar; `on_task(results so far)` after each."""
    results = {}
    with tqdm(desc=label, unit="req", disable=not progress, leave=False) as bar:
        backend = _Progress(model.backend, bar)
        for name, run in runners.items():
            bar.set_description(f"{label} {name.partition(':')[0]}")
            start = time.perf_counter()
            metrics = run(backend, model.tokenizer, max_len)
            results[name] = {**metrics, "seconds": time.perf_counter() - start}
            if on_task:
                on_task(results)
    return results


def kl_reports(model, reference, task_list: Sequence[Task], max_len: int, limit: int | None) -> dict:
    """The quantization report of every perplexity task (the same token windows for both)."""
    out = {}
    for task in (t for t in task_list if t.kind == "perplexity"):
        requests = perplexity_requests(model.tokenizer, [task.path.read_text(encoding="utf-8")[:limit]],
                                       min(max_len, model.backend.max_len))
        out[task.name] = compare(model.backend, reference.backend, requests)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m shakti_jax.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="workdir, gguf:PATH or hf:DIR")
    parser.add_argument("--tasks", required=True, help="comma-separated kind:PATH; kinds: " + "; ".join(
        f"{k}: {v}" for k, v in TASK_HELP.items()))
    parser.add_argument("--reference", default=None, help="a model to compare with (workdir, gguf:, hf:)")
    parser.add_argument("--max_len", type=int, default=1024, help="tokens per scoring window")
    parser.add_argument("--limit", type=int, default=None,
                        help="perplexity: the first N characters; other tasks: the first N items per file")
    parser.add_argument("--batch_size", type=int, default=32, help="JAX backend: requests per batch")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="each task's headline metric as a bar chart (model and reference side by side)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    def body() -> None:
        task_list = parse_tasks(args.tasks)
        runners = {task.name: prepare(task, args.limit) for task in task_list}  # data read before any model loads
        if args.max_len < 2:
            raise UserError(f"--max_len {args.max_len}: needs at least 2 tokens")
        out = Path(args.out) if args.out else None
        if out is not None and out.is_dir():
            raise UserError(f"--out {out}: is a directory (give a .json file)")
        if args.figure is not None and not args.figure.endswith(".png"):
            raise UserError(f"--figure {args.figure}: give a .png path")
        model = open_model(args.model, max_len=args.max_len, batch_size=args.batch_size)
        reference = (open_model(args.reference, max_len=args.max_len, batch_size=args.batch_size,
                                flag="--reference") if args.reference else None)
        document = {"complete": False, "model": model.info,
                    "settings": {"max_len": args.max_len, "limit": args.limit, "batch_size": args.batch_size},
                    "data": {t.name: {"sha256": t.data_sha256()} for t in task_list},
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "tasks": {}}

        def save(tasks: dict | None = None) -> None:
            if tasks is not None:
                document["tasks"] = tasks
            if out is not None:
                write_atomic(out, (json.dumps(document, indent=2) + "\n").encode())

        progress = not args.no_progress
        results = evaluate(model, runners, max_len=args.max_len, label="model", progress=progress, on_task=save)
        if reference is not None:
            document["reference"] = reference.info
            document["reference_tasks"] = evaluate(reference, runners, max_len=args.max_len,
                                                   label="reference", progress=progress)
            document["deltas"] = deltas(results, document["reference_tasks"])
            document["kl"] = kl_reports(model, reference, task_list, args.max_len, args.limit)
        document["complete"] = True
        save(results)
        print(markdown_table(results))
        if args.figure is not None:
            from shakti_jax.plots import eval_figure

            shown = {"model": results, **({"reference": document["reference_tasks"]} if reference else {})}
            eval_figure(shown, args.figure, title=str(args.model))
        if reference is not None:
            print("\nvs reference\n" + markdown_table({**document["deltas"], **{
                f"{name} (KL)": report for name, report in document["kl"].items()}}))

    run_main(body)


if __name__ == "__main__":
    main()
