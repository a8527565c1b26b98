"""Metrics sinks (TensorBoard + metrics.jsonl) and the peak-FLOP/s figure behind MFU."""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                   "TPU v5p": 459e12, "TPU v6": 918e12}


@functools.cache
def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one local device, where the figure comes from).

    Known accelerators use the vendor's dense bf16 peak (x1/2 for f32 on GPUs via TF32 is not
    assumed: f32 runs are compared with the same bf16 peak, so their MFU reads honestly low).
    Anything else (CPUs) uses a matmul rate measured here, in `dtype`.
    """
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"{name} dense bf16 peak"
    return _measured_matmul_flops(dtype), f"measured {dtype} matmul rate on {kind}"


def _measured_matmul_flops(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class MetricsLogger:
    """One JSON object per logged step in `metrics.jsonl` plus TensorBoard scalars.

    On resume the rows after the restored step are dropped, and a run that starts from step 0
    (no readable checkpoint) drops them all, so the file always reads as one uninterrupted
    run. Only process 0 writes.
    """

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self._enabled = enabled
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step if resume_step > 0 else -1)
        from tensorboard.summary import Writer

        self._writer = Writer(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value):
    if isinstance(value, (dict, list, str)) or value is None:
        return value
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(workdir: str | Path) -> list[dict]:
    """All rows of a run's metrics.jsonl."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
