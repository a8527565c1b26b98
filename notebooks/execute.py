"""Run the notebooks headless and keep them as executed .ipynb files with their figures.

    python -m notebooks.execute [--full] [--figures DIR] [--work DIR] [NAME ...]

Each `notebooks/<NAME>.py` (jupytext percent format, the source kept in git) is converted to
a notebook and executed by nbclient in a fresh kernel started in the repository root; any
cell error stops with the cell's traceback. The executed notebook, the figures and
`<NAME>.json` (its numbers) go to `--figures` (default docs/figures/notebooks, the folder
the docs link); runs and exports to `--work` (reused by a second run).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("attention_ablation", "quantization", "domain_finetuning", "responsible_ai")


def execute(name: str, figures: Path, work: Path, *, full: bool = False, timeout: int = 1800) -> Path:
    """Execute notebooks/<name>.py; returns the executed .ipynb (written atomically in `figures`,
    also when a cell fails)."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    notebook = jupytext.read(REPO / "notebooks" / f"{name}.py")
    settings = {"SHAKTI_FIGURES": str(figures), "SHAKTI_WORK": str(work), "SHAKTI_NOTEBOOK_FULL": str(int(full)),
                "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # the kernel inherits this process's environment
    figures.mkdir(parents=True, exist_ok=True)
    out = figures / f"{name}.ipynb"
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    finally:  # a failed run is kept too: its last cell holds the traceback
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tmp = out.with_name(out.name + ".tmp")
        nbformat.write(notebook, str(tmp))
        tmp.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS), help=f"some of {NOTEBOOKS}")
    parser.add_argument("--full", action="store_true", help="the GPU settings (SHAKTI_NOTEBOOK_FULL=1)")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures" / "notebooks")
    parser.add_argument("--work", type=Path, default=REPO / "notebook_runs")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        parser.error(f"unknown notebook(s) {unknown}; choose from {NOTEBOOKS}")
    for name in args.names:
        start = time.perf_counter()
        out = execute(name, args.figures, args.work, full=args.full)
        print(f"{name}: {time.perf_counter() - start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
