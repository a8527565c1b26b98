"""Conversion time and peak memory per quant type, next to llama.cpp's own route.

    python -m benchmarks.convert [--model shakti_500m] [--quants q4_0 q8_0 ...]
                                 [--llama_cpp_src vendor/llama.cpp]

Our route: `python -m shakti_jax.convert` on a random-init checkpoint, one process per quant
type, measured whole (start-up, checkpoint load, conversion, write). A process that only loads
the checkpoint is measured too, so the conversion's own share is the difference.
llama.cpp's route (with `--llama_cpp_src`, a llama.cpp source tree): the same weights as a HF
folder -> `convert_hf_to_gguf.py` (F32/F16/BF16/Q8_0 directly, F32 otherwise) -> llama.cpp's
quantizer (`llama_model_quantize`, what `llama-quantize` runs). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from benchmarks.edge_models import machine, run_measured, tokenizer

DIRECT = {"f32", "f16", "bf16", "q8_0"}  # outtypes convert_hf_to_gguf.py writes itself
PY = sys.executable


SAVE = ("import sys; from flax import nnx; from benchmarks.edge_models import model_config; "
        "from shakti_jax.model import Transformer; from shakti_jax.train.checkpoint import save_model; "
        "cfg = model_config(sys.argv[1]).replace(dropout_rate=0.0); "
        "save_model(sys.argv[2], Transformer(cfg, nnx.Rngs(0)), tokenizer_path=sys.argv[3])")


def checkpoint(name: str, workdir: Path) -> Path:
    """A random-init checkpoint, written by a child process: this process must stay small, since
    Linux carries a process's peak RSS across fork + exec into every child it measures."""
    ckpt = workdir / f"{name}-ckpt"
    if not ckpt.exists():
        run_measured([PY, "-c", SAVE, name, str(ckpt), str(tokenizer(workdir))])
    return ckpt


def ours(ckpt: Path, quant: str, workdir: Path) -> tuple[float, float, int]:
    out = workdir / f"ours-{quant}.gguf"
    seconds, rss = run_measured([PY, "-m", "shakti_jax.convert", "--checkpoint", str(ckpt), "--format",
                                 "gguf", "--quant", quant, "--out", str(out), "--no_progress"])
    return seconds, rss, out.stat().st_size


def llama_route(hf_dir: Path, quant: str, src: Path, workdir: Path) -> tuple[float, float]:
    env = {"PYTHONPATH": str(src / "gguf-py")}
    first = quant if quant in DIRECT else "f32"
    out = workdir / f"llama-{first}.gguf"
    seconds, rss = run_measured([PY, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", first,
                                 "--outfile", str(out)], env)
    if quant in DIRECT:
        return seconds, rss
    quantize = ("import llama_cpp, gguf, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = int(gguf.LlamaFileType.MOSTLY_{quant.upper()}); "
                f"sys.exit(llama_cpp.llama_model_quantize(b'{out}', b'{workdir}/llama-{quant}.gguf', p))")
    more, rss2 = run_measured([PY, "-c", quantize])
    return seconds + more, max(rss, rss2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakti_500m")
    parser.add_argument("--quants", nargs="+",
                        default=["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m"])
    parser.add_argument("--llama_cpp_src", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shakti_bench_convert"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.model, args.workdir)
    load_only = "from shakti_jax.train.checkpoint import load_params; import sys; load_params(sys.argv[1])"
    base_s, base_rss = run_measured([PY, "-c", load_only, str(ckpt)])
    hf_dir = args.workdir / "hf"
    if args.llama_cpp_src and not hf_dir.exists():
        run_measured([PY, "-m", "shakti_jax.convert", "--checkpoint", str(ckpt), "--format", "hf",
                      "--out", str(hf_dir), "--no_progress"])
    print(f"{args.model}, random init; {machine()}; {time.strftime('%Y-%m-%d')}")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"load-only process: {base_s:.1f} s, peak RSS {base_rss:.2f} GiB "
          f"(no child reads below this process's {floor:.2f} GiB)\n")
    print("| quant | size MB | ours: s | ours: s beyond load | ours: peak GiB | llama.cpp route: s | "
          "llama.cpp route: peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for quant in args.quants:
        seconds, rss, size = ours(ckpt, quant, args.workdir)
        theirs = "n/a | n/a"
        if args.llama_cpp_src:
            try:
                s, r = llama_route(hf_dir, quant, args.llama_cpp_src, args.workdir)
                theirs = f"{s:.1f} | {r:.2f}"
            except RuntimeError as err:
                theirs = f"failed: {str(err).splitlines()[-1][:60]} | -"
        print(f"| {quant} | {size / 1e6:,.0f} | {seconds:.1f} | {seconds - base_s:.1f} | {rss:.2f} | {theirs} |",
              flush=True)


if __name__ == "__main__":
    main()
