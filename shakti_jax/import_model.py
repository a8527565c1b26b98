"""Import a pretrained model (GGUF file or Hugging Face folder) as an ordinary workdir.

    python -m shakti_jax.import_model --source gguf:model.gguf --workdir runs/smollm2
    python -m shakti_jax.import_model --source hf:path/to/folder --workdir runs/qwen --dtype bfloat16

The workdir holds a step-0 checkpoint, its description (config, where it came from) and the
model's tokenizer, so `train.init_from`, `generate --checkpoint`, `convert` and evaluation take
it unchanged. Everything is checked before any weight is read (architecture, features,
tensor names, shapes and types, tokenizer); the workdir appears whole or not at all.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from data_pipelines.atomic import atomic_dir, sigterm_unwinds
from data_pipelines.cli import ArgumentParser, run_main
from shakti_jax.imports.params import NUMPY_DTYPES, build_params
from shakti_jax.imports.source import ImportSource, ModelImportError

FORMATS = ("gguf", "hf")


def read_source(source: str) -> ImportSource:
    """`gguf:PATH` or `hf:DIR` read and validated (no weights loaded yet)."""
    fmt, _, path = source.partition(":")
    if fmt not in FORMATS or not path:
        raise ModelImportError(f"--source {source!r}: expected gguf:PATH or hf:DIR")
    if fmt == "gguf":
        from shakti_jax.imports.gguf_reader import read_gguf

        return read_gguf(path)
    from shakti_jax.imports.hf_reader import read_hf

    return read_hf(path)


def import_model(source: str | ImportSource, workdir: str | Path, *, dtype: str = "float32",
                 progress: bool = True) -> Path:
    """Write `source` as a workdir (refusing one that already holds anything). Returns it."""
    if dtype not in NUMPY_DTYPES:
        raise ModelImportError(f"--dtype {dtype!r}: choose from {', '.join(NUMPY_DTYPES)}")
    src = read_source(source) if isinstance(source, str) else source
    workdir = Path(workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ModelImportError(f"--workdir {workdir} already exists and is not empty; "
                               f"import into a new folder")
    cfg = src.config.replace(dtype=dtype, param_dtype=dtype)
    from shakti_jax.train.checkpoint import save_params

    count = sum(1 for _ in _names(cfg))
    with tqdm(total=count, unit="tensor", disable=not progress, desc="import") as bar:
        params = build_params(cfg, _finite(src), on_tensor=lambda _: bar.update())
    # On the host device this aliases the arrays; orbax would copy numpy arrays while saving.
    params = jax.tree.map(jax.device_put, params)
    with atomic_dir(workdir) as tmp:
        tokenizer_path = src.tokenizer.save(tmp)
        save_params(tmp, cfg, params, step=0, tokenizer_path=tokenizer_path,
                    meta={"imported_from": src.description})
    return workdir


def _names(cfg):
    from shakti_jax.export.canonical import canonical_tensors

    return (t.name for t in canonical_tensors(cfg, None, "halves"))


def _finite(src: ImportSource):
    def read(name: str) -> np.ndarray:
        w = src.read(name)
        if not np.isfinite(w).all():
            raise ModelImportError(f"{src.description['path']}: tensor {name} has "
                                   f"{w.size - int(np.isfinite(w).sum())} NaN/Inf values")
        return w
    return read


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m shakti_jax.import_model", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="gguf:PATH or hf:DIR")
    parser.add_argument("--workdir", required=True, help="a new folder for the imported model")
    parser.add_argument("--dtype", default="float32", choices=tuple(NUMPY_DTYPES))
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    def body() -> None:
        start = time.perf_counter()
        src = read_source(args.source)
        import_model(src, args.workdir, dtype=args.dtype, progress=not args.no_progress)
        cfg, tok = src.config, src.tokenizer
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{args.workdir}: {src.description['architecture']} {cfg.name}, {cfg.num_layers} layers "
              f"x {cfg.d_model}, {cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, "
              f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings; {tok.kind} tokenizer"
              f"{' with its chat template' if tok.chat_template else ''}; "
              f"{time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GiB")

    with sigterm_unwinds():
        run_main(body)


if __name__ == "__main__":
    main()
