"""Convert training checkpoints to edge formats, in batches.

    python -m shakti_jax.convert --checkpoint runs/pretrain --format gguf --quant q4_0 --out model.gguf
    python -m shakti_jax.convert --checkpoint 'runs/*' --format gguf --quant q4_0,q8_0,q4_k_m --out exports/
    python -m shakti_jax.convert --checkpoint runs/sft --step 2000 --format hf --out hf_model/
    python -m shakti_jax.convert --checkpoint runs/sft-lora --format lora --out adapter.gguf

A LoRA run (`lora.targets`) exports merged into its base with `gguf` / `hf`, or as the adapter
alone with `lora`: a llama.cpp adapter GGUF (F32) to load over the base's own GGUF export
(`llama-cli -m base-Q4_0.gguf --lora adapter.gguf`).

One conversion (one checkpoint, one quant type) writes `--out` itself (a GGUF file into it when
it is a folder; an HF folder replaces a previous export there); a batch writes
`{checkpoint}-{size}-{QUANT}.gguf` (gguf's naming convention, e.g. `sft-135M-Q4_0.gguf`), or
`{checkpoint}-hf-{quant}/`, inside the `--out` folder. Every
request is checked (checkpoints, steps, tokenizers, quant names, row lengths, attention
layouts, output paths) before the first weight is loaded; weights with NaN/Inf are refused
before anything is written, and every output is written atomically (see data_pipelines.atomic).
Ends with a table of sizes against F32 and time taken. Bad input, a damaged checkpoint step
or an OS error (permissions, full disk) is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, Sequence, TypeVar

from gguf.utility import naming_convention
from tqdm import tqdm

from data_pipelines.atomic import sigterm_unwinds
from data_pipelines.cli import ArgumentParser, one_line, run_main
from data_pipelines.errors import UserError
from shakti_jax.config import ModelConfig
from shakti_jax.export.canonical import CanonicalModel, ExportError, canonicalize
from shakti_jax.export.gguf_export import (check_quantizable, gguf_tensor_count, quant_type, size_label,
                                           write_gguf)
from shakti_jax.export.hf_export import HF_DTYPES, hf_tensor_count, is_hf_export, write_hf
from shakti_jax.export.lora_gguf import write_lora_gguf
from shakti_jax.lora import count_params

T = TypeVar("T")


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
    """Output paths: `out` itself for a single conversion (a GGUF file goes into `out` when it
    is a folder), else one file or folder per job in it. Refuses targets it cannot write."""
    if len({c.name for c in checkpoints}) < len(checkpoints):
        raise ExportError("two --checkpoint folders share a name; their outputs would collide")
    single = len(checkpoints) * len(quants) == 1
    jobs = []
    for checkpoint in checkpoints:
        label = _size_label(checkpoint) if fmt == "gguf" else None
        for quant in quants:
            name = {"gguf": lambda: naming_convention(None, checkpoint.name, None, None, label, quant) + ".gguf",
                    "hf": lambda: f"{checkpoint.name}-hf-{quant}",
                    "lora": lambda: f"{checkpoint.name}-lora.gguf"}[fmt]()
            inside = not single or (fmt != "hf" and out.is_dir())
            jobs.append(Job(checkpoint, quant, out / name if inside else out))
    for job in jobs:
        check_target(job.out, fmt)
    return jobs


def _size_label(checkpoint: Path) -> str | None:
    """gguf's size label ("135M") of a checkpoint's model; None when it has no readable meta
    (`describe` then says what is wrong)."""
    from shakti_jax.train.checkpoint import newest_meta

    try:
        meta = newest_meta(checkpoint)
        return size_label(ModelConfig.from_dict(meta["model"])) if meta else None
    except Exception:  # noqa: BLE001 - reported by describe, with the step
        return None


def check_target(path: Path, fmt: str) -> None:
    """Fail before loading anything when `path` cannot be written, or would replace something
    that is not an earlier export of the same format."""
    if fmt != "hf" and path.is_dir():
        raise ExportError(f"--out: {path} is a folder, not a GGUF file")
    if fmt == "hf" and path.exists() and not is_hf_export(path):
        raise ExportError(f"--out: {path} exists and is not an HF export; refusing to replace it")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise ExportError(f"--out: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"--out: folder {folder} is not writable")


def parse_quants(text: str | None, fmt: str) -> list[str]:
    """The `--quant` list (the format's default when None); an empty entry is an error."""
    if text is None:
        return ["q4_0" if fmt == "gguf" else "f32"]  # hf and lora: f32
    quants = [q.strip().lower() for q in text.split(",")]
    for i, quant in enumerate(quants, 1):
        if not quant:
            raise ExportError(f"--quant {text!r}: entry {i} is empty")
        check_quant(fmt, quant)
    return quants


def check_quant(fmt: str, quant: str) -> None:
    if fmt == "hf" and quant not in HF_DTYPES:
        raise ExportError(f"--format hf writes {', '.join(HF_DTYPES)} weights, not {quant!r}")
    if fmt == "gguf":
        quant_type(quant)
    if fmt == "lora" and quant != "f32":
        raise ExportError(f"--format lora writes F32 adapter tensors, not {quant!r} (quantize the "
                          f"base export instead)")


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint step, validated: its tokenizer and weight-free canonical form."""
    checkpoint: Path
    step: int
    tokenizer_path: Path
    canon: CanonicalModel
    warnings: list[str]


def checkpoint_steps(checkpoint: Path) -> list[int]:
    """The finished steps of a training workdir, oldest first."""
    from shakti_jax.train.checkpoint import steps

    return steps(checkpoint)


def pick_step(checkpoint: Path, step: int | None) -> int:
    """`step`, or the newest step when None; a missing step is an error listing those there."""
    steps = checkpoint_steps(checkpoint)
    if not steps:
        raise ExportError(f"--checkpoint {checkpoint}: no checkpoints in it")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"--checkpoint {checkpoint}: no step {step}; "
                          f"it has steps {', '.join(map(str, steps))}")
    return step


def read_step(read: Callable[[Path, int], T], checkpoint: Path, step: int) -> T:
    """`read(checkpoint, step)`; any failure means a damaged step: one line suggesting --step."""
    try:
        return read(checkpoint, step)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
        others = [s for s in checkpoint_steps(checkpoint) if s != step]
        hint = (f"export another step with --step ({', '.join(map(str, others))})" if others
                else "it has no other step")
        raise ExportError(f"{checkpoint}: checkpoint step {step} is damaged "
                          f"({type(err).__name__}: {one_line(err)[:300]}); {hint}") from err


def describe(checkpoint: Path, step: int | None, tokenizer: str | None, fmt: str,
             allow_attention_change: bool) -> Source:
    """A checkpoint step's config, tokenizer and weight-free canonical form (validates everything)."""
    from shakti_jax.train.checkpoint import read_meta, tokenizer_of

    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint} is not a folder")
    step = pick_step(checkpoint, step)
    meta = read_step(read_meta, checkpoint, step)
    cfg = export_config(meta)
    if fmt == "lora" and not meta.get("lora"):
        raise ExportError(f"--checkpoint {checkpoint}: step {step} is not a LoRA run (no lora.targets); "
                          f"export it with --format gguf or hf")
    tokenizer_path = Path(tokenizer) if tokenizer else tokenizer_of(checkpoint, meta)
    if not tokenizer_path:
        raise ExportError(f"{checkpoint}: the checkpoint names no tokenizer; pass --tokenizer")
    if not tokenizer_path.exists():
        raise ExportError(f"{checkpoint}: tokenizer {tokenizer_path} does not exist; pass --tokenizer")
    canon, warnings = canonicalize(cfg, None, tokenizer_path, allow_attention_change=allow_attention_change,
                                   rope_pairing=_pairing(fmt))
    return Source(checkpoint, step, tokenizer_path, canon, [f"{checkpoint}: {w}" for w in warnings])


def export_config(meta: dict) -> ModelConfig:
    """The model a checkpoint exports as: a reward model keeps its value head (an HF
    sequence classifier); any other stage's value head (PPO's critic) is dropped."""
    cfg = ModelConfig.from_dict(meta["model"])
    if cfg.value_head and (meta.get("experiment") or {}).get("stage") != "reward":
        return cfg.replace(value_head=False)
    return cfg


def _pairing(fmt: str) -> str:
    return "interleaved" if fmt == "gguf" else "halves"


def convert(jobs: Sequence[Job], fmt: str, tokenizer: str | None = None,
            allow_attention_change: bool = False, progress: bool = True,
            step: int | None = None) -> list[Result]:
    """Run `jobs`, loading each checkpoint once (its `step`, default the newest). Everything is
    validated before any weight loads; NaN/Inf weights are refused before anything is written."""
    by_checkpoint: dict[Path, list[Job]] = {}
    for job in jobs:
        check_quant(fmt, job.quant)
        by_checkpoint.setdefault(job.checkpoint, []).append(job)
    sources = {}
    for checkpoint, its_jobs in by_checkpoint.items():
        sources[checkpoint] = describe(checkpoint, step, tokenizer, fmt, allow_attention_change)
        for job in its_jobs:
            if fmt == "gguf":
                check_quantizable(sources[checkpoint].canon, quant_type(job.quant))
    for source in sources.values():
        for warning in source.warnings:
            print(warning, file=sys.stderr)

    from shakti_jax.train.checkpoint import load_params

    count = {"gguf": gguf_tensor_count, "hf": hf_tensor_count, "lora": lambda _: 1}[fmt]
    bar = tqdm(total=sum(count(sources[j.checkpoint].canon) for j in jobs), unit="tensor",
               disable=not progress)
    results = []
    for checkpoint, its_jobs in by_checkpoint.items():
        source = sources[checkpoint]
        loaded = read_step(load_params, checkpoint, source.step)
        if fmt == "lora":
            for job in its_jobs:
                start = time.perf_counter()
                write_lora_gguf(loaded.config, loaded.adapters, loaded.lora, job.out)
                bar.update()
                results.append(Result(job, _size(job.out), 4 * count_params(loaded.adapters),
                                      time.perf_counter() - start))
            continue
        cfg = loaded.config.replace(value_head=source.canon.config.value_head)  # see export_config
        canon, _ = canonicalize(cfg, loaded.params, source.tokenizer_path,
                                allow_attention_change=allow_attention_change, rope_pairing=_pairing(fmt))
        f32_bytes = sum(4 * t.numel for t in canon.tensors)
        for job in its_jobs:
            if loaded.qat is not None and (fmt != "gguf" or job.quant.upper() != loaded.qat.qtype):
                print(f"{checkpoint}: trained with QAT for {loaded.qat.qtype}; {fmt} {job.quant} writes its "
                      f"latent weights, not the blocks it trained", file=sys.stderr)
            bar.set_description(f"{checkpoint.name} {job.quant}")
            start = time.perf_counter()
            write = write_gguf if fmt == "gguf" else write_hf
            write(canon, job.out, job.quant, on_tensor=lambda _: bar.update())
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


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The command line: exits 0 after printing the size table, or 2 with one `error:` line."""
    parser = ArgumentParser(prog="shakti_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="training workdirs (paths or quoted globs); the newest step of each")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint step to export (default: the newest)")
    parser.add_argument("--format", choices=("gguf", "hf", "lora"), required=True,
                        help="lora: a LoRA run's adapter alone, as a llama.cpp adapter GGUF")
    parser.add_argument("--quant", default=None,
                        help="comma-separated: f32,f16,bf16,q8_0,q5_0,q4_0,q4_k_m,q5_k_m,q6_k for "
                             "gguf (default q4_0); f32,bf16,f16 for hf (default f32); f32 for lora")
    parser.add_argument("--out", required=True, help="file or folder (a folder for batches)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model or tokenizer.json, if not the checkpoint's")
    parser.add_argument("--allow_attention_change", action="store_true",
                        help="export block-sparse layers as full causal attention (changes outputs)")
    parser.add_argument("--report", default=None, metavar="TEXT_FILE",
                        help="gguf: score every export against its checkpoint in llama.cpp on this text "
                             "(perplexity ratio, KL divergence, top-1 agreement) and plot quality vs size")
    parser.add_argument("--report_chars", type=int, default=20_000, help="--report: the text's first N characters")
    parser.add_argument("--report_max_len", type=int, default=512, help="--report: tokens per scoring window")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.report is not None:
            if args.format != "gguf":
                raise UserError("--report: only for --format gguf (the files llama.cpp runs)")
            if not Path(args.report).is_file():
                raise UserError(f"--report {args.report}: no such text file")
        jobs = plan(expand_checkpoints(args.checkpoint), args.format,
                    parse_quants(args.quant, args.format), Path(args.out))
        results = convert(jobs, args.format, args.tokenizer, args.allow_attention_change,
                          progress=not args.no_progress, step=args.step)
        print(table(results))
        if args.report is not None:
            from shakti_jax.evaluation.quant_report import export_report

            text = Path(args.report).read_text(encoding="utf-8")[:args.report_chars]
            print(export_report(results, text, Path(args.out), max_len=args.report_max_len, step=args.step))

    with sigterm_unwinds():
        run_main(body)


if __name__ == "__main__":
    main()
