"""Fault injection: kill a tiny training run and a conversion at random moments, then check.

    python -m benchmarks.faults [--trials 10] [--seed 0]

Training: a reference run goes uninterrupted; each trial starts the same run in a fresh
workdir, SIGKILLs it at a random moment (every other trial: while a checkpoint is being
written, i.e. while an orbax temporary folder exists), reruns the same command, and checks
that the metrics (all but the wall-clock figures) equal the reference's bit for bit, that no temporary folder is left and
that every finished step reads back. Conversion: the reference checkpoint is converted to
Q8_0 GGUF once; each trial kills a conversion at a random moment and checks that the target
is either absent or the complete file, reruns it, and checks the bytes equal the reference
and no temporary is left. Prints one table; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config=experiments/pretrain.py:tiny", "--config.data.seq_len=32",
         "--config.train.batch_size=8", "--config.train.steps=12", "--config.train.log_every=1",
         "--config.train.checkpoint_every=3", "--config.train.eval_every=6",
         "--config.train.eval_batches=1", "--config.train.progress_bar=False",
         "--config.optim.warmup_steps=2"]


def _train(workdir: Path, tokenizer: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shakti_jax.train", *TRAIN,
                             f"--config.data.tokenizer={tokenizer}", f"--workdir={workdir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _convert(checkpoint: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shakti_jax.convert", "--checkpoint",
                             str(checkpoint), "--format", "gguf", "--quant", "q8_0", "--out",
                             str(out), "--no_progress"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {err[-2000:]}")


def _kill_at(proc: subprocess.Popen, seconds: float, until=None) -> str:
    """SIGKILL after `seconds` (or as soon as `until()` holds, if given); what was hit."""
    deadline = time.time() + seconds
    while proc.poll() is None:
        if (until is not None and until()) or (until is None and time.time() >= deadline):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.005)
    return "finished first"


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "orbax-checkpoint-tmp" in p.name or ".tmp-" in p.name]


TIMING = ("tokens_per_sec", "step_time", "mfu")  # wall-clock figures differ between any two runs


def _metrics(workdir: Path) -> list[dict]:
    """Every metrics row without its timing figures (losses, norms, counts: exact)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def training_trials(root: Path, tokenizer: Path, trials: int, rng: random.Random) -> list[dict]:
    reference = root / "reference"
    start = time.perf_counter()
    _finish(_train(reference, tokenizer))
    duration = time.perf_counter() - start
    want = _metrics(reference)
    results = []
    for i in range(trials):
        workdir = root / f"train{i}"
        proc = _train(workdir, tokenizer)
        if i % 2:  # during the save of step 3, 6 or 9 (orbax's temporary folder exists)
            ckpt, target = workdir / "checkpoints", 3 * rng.randint(1, 3)
            saving = lambda: any(p.name.startswith(f"{target}.orbax-checkpoint-tmp")  # noqa: E731
                                 for p in ckpt.glob(f"{target}.*"))
            moment, outcome = f"during the save of step {target}", _kill_at(proc, 0, until=saving)
        else:
            at = rng.uniform(0.2, 1.0) * duration
            moment, outcome = f"at {at:.1f} s", _kill_at(proc, at)
        _finish(_train(workdir, tokenizer))
        from shakti_jax.train.checkpoint import load_params

        results.append({"what": "training", "moment": moment, "outcome": outcome,
                        "identical": _metrics(workdir) == want,
                        "leftovers": len(_temporaries(workdir)),
                        "readable": load_params(workdir).step == 12})
    return results


def conversion_trials(root: Path, trials: int, rng: random.Random) -> list[dict]:
    reference = root / "reference.gguf"
    start = time.perf_counter()
    _finish(_convert(root / "reference", reference))
    duration = time.perf_counter() - start
    results = []
    for i in range(trials):
        out = root / f"convert{i}" / "model.gguf"
        out.parent.mkdir()
        at = rng.uniform(0.3, 1.0) * duration
        outcome = _kill_at(_convert(root / "reference", out), at)
        partial = out.exists() and not filecmp.cmp(out, reference, shallow=False)
        _finish(_convert(root / "reference", out))
        results.append({"what": "conversion", "moment": f"at {at:.1f} s", "outcome": outcome,
                        "identical": filecmp.cmp(out, reference, shallow=False) and not partial,
                        "leftovers": len(_temporaries(out.parent)), "readable": True})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--training_only", action="store_true", help="skip the conversion trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from data_pipelines.default_corpus import write_default_corpus
    from data_pipelines.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_tokenizer([write_default_corpus(root / "corpus.txt", max_chars=300_000)],
                                    512, root / "tok")
        results = training_trials(root, tokenizer, args.trials, rng)
        if not args.training_only:
            results += conversion_trials(root, args.trials, rng)
    print(f"{time.strftime('%Y-%m-%d')}, {args.trials} trials each, seed {args.seed}\n")
    print("| run | kill moment | outcome | result identical | temporaries left | readable |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['moment']} | {r['outcome']} | {r['identical']} | "
              f"{r['leftovers']} | {r['readable']} |")
    for what in ("training", "conversion"):
        rows = [r for r in results if r["what"] == what]
        if not rows:
            continue
        good = sum(r["identical"] and not r["leftovers"] and r["readable"] for r in rows)
        killed = sum(r["outcome"] == "killed" for r in rows)
        print(f"\n{what}: {good}/{len(rows)} identical after the rerun, nothing left over "
              f"({killed} of them killed mid-run)")
    return 0 if all(r["identical"] and not r["leftovers"] and r["readable"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
