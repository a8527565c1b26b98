"""Evaluate a training workdir, a GGUF file or an HF folder on the same requests.

    python -m shakti_jax.eval --model runs/smollm2 --tasks perplexity:../shared/data/pretrain/wikitext2_valid.txt
    python -m shakti_jax.eval --model gguf:exports/sft-135M-Q4_0.gguf --tasks perplexity:FILE --out results.json

Backends: JAX for workdirs, llama.cpp for `gguf:PATH`, transformers for `hf:DIR`. Requests are
token ids from the model's own tokenizer (the one in the workdir, the GGUF file or the folder),
so every backend scores the same tokens. Tasks, each on a local file:
- `perplexity:PATH`: a UTF-8 text file as one document; token / byte / word perplexity and bits
  per byte in rolling windows of `--max_len` (`--limit`: its first N characters);
- `crows_pairs:PATH`: a CrowS-Pairs CSV; likelihood_diff and pct_stereotype (`--limit` pairs);
- `toxigen:PATH`: JSONL `text` + `label` (hate/neutral or 1/0): ToxiGen's prompt, acc, acc_norm.
Results are written atomically as JSON (`--out`) and printed as a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from data_pipelines.atomic import write_atomic
from data_pipelines.cli import ArgumentParser, run_main
from data_pipelines.errors import UserError
from shakti_jax.evaluation.perplexity import perplexity
from shakti_jax.evaluation.tasks import crows_pairs, read_crows_pairs, read_labelled_texts, toxigen

TASK_KINDS = ("perplexity", "crows_pairs", "toxigen")


def open_model(spec: str, max_len: int, batch_size: int = 32):
    """(backend, tokenizer, description) of a workdir, `gguf:PATH` or `hf:DIR`."""
    kind, _, path = spec.partition(":")
    if kind == "gguf":
        from shakti_jax.evaluation.backends import LlamaCppBackend
        from shakti_jax.imports.gguf_reader import read_gguf

        source = read_gguf(path)  # validates the file and reads its tokenizer
        return LlamaCppBackend(path, max_len=max_len), source.tokenizer, {"backend": "llama.cpp", "path": path}
    if kind == "hf":
        from shakti_jax.evaluation.backends import TransformersBackend
        from shakti_jax.imports.hf_reader import read_hf

        source = read_hf(path)
        return TransformersBackend(path, max_len=max_len), source.tokenizer, {"backend": "transformers", "path": path}
    from data_pipelines.tokenizer import Tokenizer
    from shakti_jax.evaluation.backends import JaxBackend
    from shakti_jax.train.checkpoint import load_params

    if not Path(spec).is_dir():
        raise UserError(f"--model {spec!r}: not a workdir (or use gguf:PATH / hf:DIR)")
    loaded = load_params(spec)
    if loaded.tokenizer_path is None:
        raise UserError(f"--model {spec}: its checkpoint names no tokenizer")
    return (JaxBackend(loaded.model_def, loaded.params, batch_size=batch_size, max_len=max_len),
            Tokenizer.load(loaded.tokenizer_path),
            {"backend": "jax", "path": spec, "step": loaded.step})


def parse_tasks(text: str) -> list[tuple[str, Path]]:
    tasks = []
    for item in (t.strip() for t in text.split(",")):
        kind, _, path = item.partition(":")
        if kind not in TASK_KINDS or not path:
            raise UserError(f"--tasks: unknown task {item!r} (known: {', '.join(k + ':PATH' for k in TASK_KINDS)})")
        if not Path(path).is_file():
            raise UserError(f"--tasks {item}: {path} does not exist")
        tasks.append((kind, Path(path)))
    return tasks


def run_task(kind: str, path: Path, backend, tokenizer, max_len: int, limit: int | None) -> dict:
    if kind == "perplexity":
        return perplexity(backend, tokenizer, [path.read_text(encoding="utf-8")[:limit]], max_len)
    if kind == "crows_pairs":
        return crows_pairs(backend, tokenizer, read_crows_pairs(path, limit))
    return toxigen(backend, tokenizer, read_labelled_texts(path, limit))


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m shakti_jax.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="workdir, gguf:PATH or hf:DIR")
    parser.add_argument("--tasks", required=True, help="comma-separated, e.g. perplexity:FILE")
    parser.add_argument("--max_len", type=int, default=1024, help="tokens per scoring window")
    parser.add_argument("--limit", type=int, default=None,
                        help="perplexity: the first N characters; other tasks: the first N items")
    parser.add_argument("--batch_size", type=int, default=32, help="JAX backend: requests per batch")
    parser.add_argument("--out", default=None, help="results JSON")
    args = parser.parse_args(argv)

    def body() -> None:
        tasks = parse_tasks(args.tasks)  # checked before any model loads
        backend, tokenizer, model = open_model(args.model, args.max_len, args.batch_size)
        results = {"model": model, "max_len": args.max_len, "tasks": {}}
        for kind, path in tasks:
            start = time.perf_counter()
            metrics = run_task(kind, path, backend, tokenizer, args.max_len, args.limit)
            results["tasks"][f"{kind}:{path}"] = {**metrics, "seconds": time.perf_counter() - start}
        if args.out:
            write_atomic(Path(args.out), (json.dumps(results, indent=2) + "\n").encode())
        print("| task | metric | value |\n|---|---|---|")
        for name, metrics in results["tasks"].items():
            for key, value in metrics.items():
                print(f"| {name} | {key} | {value:.4f} |" if isinstance(value, float) else
                      f"| {name} | {key} | {value} |")

    run_main(body)


if __name__ == "__main__":
    main()
