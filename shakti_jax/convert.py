"""Convert training checkpoints to edge formats, in batches.

    python -m shakti_jax.convert --checkpoint runs/pretrain --format gguf --quant q4_0 --out model.gguf
    python -m shakti_jax.convert --checkpoint 'runs/*' --format gguf --quant q4_0,q8_0,q4_k_m --out exports/
    python -m shakti_jax.convert --checkpoint runs/sft --format hf --out hf_model/

One conversion (one checkpoint, one quant type) writes `--out` itself; a batch writes
`{checkpoint}-{quant}.gguf` (or `{checkpoint}-hf-{quant}/`) inside the `--out` folder. Every
request is checked (checkpoints, tokenizers, quant names, row lengths, attention layouts)
before the first weight is loaded, and every output is written atomically. Ends with a table
of sizes against F32 and time taken.
"""

from __future__ import annotations

import dataclasses
import glob
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from data_pipelines.cli import ArgumentParser, fail
from shakti_jax.config import ConfigError, ModelConfig
from shakti_jax.export.canonical import CanonicalModel, ExportError, canonicalize
from shakti_jax.export.gguf_export import check_quantizable, gguf_tensor_count, quant_type, write_gguf
from shakti_jax.export.hf_export import HF_DTYPES, hf_tensor_count, write_hf


@dataclasses.dataclass(frozen=True)
class Job:
    checkpoint: Path
    quant: str
    out: Path


@dataclasses.dataclass(frozen=True)
class Result:
    job: Job
    bytes: int
    f32_bytes: int
    seconds: float


def expand_checkpoints(patterns: Sequence[str]) -> list[Path]:
    """Checkpoint workdirs from paths and globs, in order, without repeats."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--checkpoint {pattern!r} matches nothing")
        found += [Path(m) for m in matches if Path(m) not in found]
    return found


def plan(checkpoints: Sequence[Path], fmt: str, quants: Sequence[str], out: Path) -> list[Job]:
    """Output paths: `out` itself for a single conversion, else one file or folder per job in it."""
    if len({c.name for c in checkpoints}) < len(checkpoints):
        raise ExportError("two --checkpoint folders share a name; their outputs would collide")
    single = len(checkpoints) * len(quants) == 1
    jobs = []
    for checkpoint in checkpoints:
        for quant in quants:
            name = f"{checkpoint.name}-{quant}.gguf" if fmt == "gguf" else f"{checkpoint.name}-hf-{quant}"
            jobs.append(Job(checkpoint, quant, out if single and not out.is_dir() else out / name))
    return jobs


def check_quant(fmt: str, quant: str) -> None:
    if fmt == "hf" and quant not in HF_DTYPES:
        raise ExportError(f"--format hf writes {', '.join(HF_DTYPES)} weights, not {quant!r}")
    if fmt == "gguf":
        quant_type(quant)


def describe(checkpoint: Path, tokenizer: str | None, fmt: str, allow_attention_change: bool
             ) -> tuple[ModelConfig, Path, CanonicalModel, list[str]]:
    """Config, tokenizer and weight-free canonical form of a checkpoint (validates everything)."""
    from shakti_jax.train.checkpoint import read_meta

    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint} is not a folder")
    meta = read_meta(checkpoint)
    cfg = ModelConfig.from_dict(meta["model"])
    tokenizer_path = tokenizer or meta.get("tokenizer")
    if not tokenizer_path:
        raise ExportError(f"{checkpoint}: the checkpoint names no tokenizer; pass --tokenizer")
    if not Path(tokenizer_path).exists():
        raise ExportError(f"{checkpoint}: tokenizer {tokenizer_path} does not exist; pass --tokenizer")
    canon, warnings = canonicalize(cfg, None, tokenizer_path, allow_attention_change=allow_attention_change,
                                   rope_pairing="interleaved" if fmt == "gguf" else "halves")
    return cfg, Path(tokenizer_path), canon, [f"{checkpoint}: {w}" for w in warnings]


def convert(jobs: Sequence[Job], fmt: str, tokenizer: str | None = None,
            allow_attention_change: bool = False, progress: bool = True) -> list[Result]:
    """Run `jobs`, loading each checkpoint once. Everything is validated before any weight loads."""
    by_checkpoint: dict[Path, list[Job]] = {}
    for job in jobs:
        check_quant(fmt, job.quant)
        by_checkpoint.setdefault(job.checkpoint, []).append(job)
    described = {}
    for checkpoint, its_jobs in by_checkpoint.items():
        described[checkpoint] = describe(checkpoint, tokenizer, fmt, allow_attention_change)
        for job in its_jobs:
            if fmt == "gguf":
                check_quantizable(described[checkpoint][2], quant_type(job.quant))
    for *_, warnings in described.values():
        for warning in warnings:
            print(warning, file=sys.stderr)

    from shakti_jax.train.checkpoint import load_params

    count = gguf_tensor_count if fmt == "gguf" else hf_tensor_count
    per_job = {ckpt: count(canon) for ckpt, (_, _, canon, _) in described.items()}
    bar = tqdm(total=sum(per_job[j.checkpoint] for j in jobs), unit="tensor", disable=not progress)
    results = []
    for checkpoint, its_jobs in by_checkpoint.items():
        _, tokenizer_path, _, _ = described[checkpoint]
        loaded = load_params(checkpoint)
        canon, _ = canonicalize(loaded.config, loaded.params, tokenizer_path,
                                allow_attention_change=allow_attention_change,
                                rope_pairing="interleaved" if fmt == "gguf" else "halves")
        f32_bytes = sum(4 * t.numel for t in canon.tensors)
        for job in its_jobs:
            bar.set_description(f"{checkpoint.name} {job.quant}")
            start = time.perf_counter()
            if fmt == "gguf":
                write_gguf(canon, job.out, job.quant, on_tensor=lambda _: bar.update())
            else:
                write_hf(canon, job.out, job.quant, on_tensor=lambda _: bar.update())
            results.append(Result(job, _size(job.out), f32_bytes, time.perf_counter() - start))
        del loaded, canon
    bar.close()
    return results


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*"))


def table(results: Sequence[Result]) -> str:
    rows = [("checkpoint", "quant", "size MB", "vs F32", "seconds", "output")]
    for r in results:
        rows.append((r.job.checkpoint.name, r.job.quant, f"{r.bytes / 1e6:.1f}",
                     f"{r.bytes / r.f32_bytes:.3f}", f"{r.seconds:.1f}", str(r.job.out)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="shakti_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="training workdirs (paths or quoted globs); the newest step of each")
    parser.add_argument("--format", choices=("gguf", "hf"), required=True)
    parser.add_argument("--quant", default=None,
                        help="comma-separated: f32,f16,bf16,q8_0,q5_0,q4_0,q4_k_m,q5_k_m,q6_k for "
                             "gguf (default q4_0); f32,bf16,f16 for hf (default f32)")
    parser.add_argument("--out", required=True, help="file or folder (a folder for batches)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model, if not the checkpoint's")
    parser.add_argument("--allow-attention-change", action="store_true",
                        help="export block-sparse layers as full causal attention (changes outputs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    default_quant = "q4_0" if args.format == "gguf" else "f32"
    quants = [q.strip().lower() for q in (args.quant or default_quant).split(",")]
    try:
        jobs = plan(expand_checkpoints(args.checkpoint), args.format, quants, Path(args.out))
        results = convert(jobs, args.format, args.tokenizer, args.allow_attention_change,
                          progress=not args.no_progress)
    except (ExportError, ConfigError, FileNotFoundError) as err:
        fail(str(err))
    print(table(results))


if __name__ == "__main__":
    main()
