"""What every notebook shares: its settings (small on CPU, or `SHAKTI_NOTEBOOK_FULL=1` for a
GPU), where figures and runs go, the embedded tokenizer, a tiny pretrained model, and the
summary JSON each notebook leaves for the tests and the docs.

    SHAKTI_FIGURES   folder for the figures and `<notebook>.json` (default docs/figures/notebooks)
    SHAKTI_WORK      folder for training runs and exports (default notebook_runs/)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipelines.atomic import write_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
FULL = os.environ.get("SHAKTI_NOTEBOOK_FULL", "0") == "1"
FIGURES = Path(os.environ.get("SHAKTI_FIGURES", REPO / "docs" / "figures" / "notebooks"))
WORK = Path(os.environ.get("SHAKTI_WORK", REPO / "notebook_runs"))
FIGURES.mkdir(parents=True, exist_ok=True)
WORK.mkdir(parents=True, exist_ok=True)


def tokenizer() -> Path:
    """The 512-piece tokenizer of the tests, trained once on the embedded corpus into WORK."""
    from data_pipelines.tokenizer import small_default_tokenizer

    return small_default_tokenizer(WORK)


def pretrain_config(steps: int, size: str = "tiny", **model):
    """experiments/pretrain.py's config at `size` on the embedded corpus, quiet, evaluated every
    `steps // 4` steps; `model` overrides model keys."""
    from experiments.pretrain import get_config

    c = get_config(size)
    c.data.tokenizer = str(tokenizer())
    c.model.update(model)
    c.train.update(steps=steps, log_every=max(1, steps // 8), eval_every=max(1, steps // 4),
                   eval_batches=8 if FULL else 4, checkpoint_every=steps, progress_bar=False,
                   async_checkpoints=False)
    return c


def pretrained(name: str, steps: int):
    """WORK/name: the tiny model pretrained `steps` steps (trained once, then shared by the
    notebooks that start from it)."""
    from shakti_jax.train.trainer import Trainer

    workdir = WORK / name
    if not list(workdir.glob("checkpoints/*")):
        Trainer(pretrain_config(steps), workdir).run()
    return workdir


def record(notebook: str, numbers: dict) -> Path:
    """Write the notebook's numbers as FIGURES/<notebook>.json (the tests read them)."""
    path = FIGURES / f"{notebook}.json"
    write_atomic(path, (json.dumps(numbers, indent=1, default=float) + "\n").encode())
    return path
