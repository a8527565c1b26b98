"""What every checkpoint reader returns, and the checks they share."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from data_pipelines.errors import UserError
from data_pipelines.tokenizer import Tokenizer
from shakti_jax.config import ModelConfig
from shakti_jax.export.canonical import canonical_tensors


class ModelImportError(UserError):
    """A checkpoint cannot be imported; the message is one line naming the file and why."""


@dataclasses.dataclass(frozen=True)
class ImportSource:
    config: ModelConfig
    read: Callable[[str], np.ndarray]  # canonical name -> float32 [out, in], rotate-halves rows
    tokenizer: Tokenizer
    description: dict  # format, path, architecture, tensor types: recorded in the checkpoint


def check_tensors(where: str, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]],
                  ignored: Callable[[str], bool] = lambda name: False) -> None:
    """Every tensor `cfg` needs is present with its shape, and nothing else is (an unknown
    tensor is a feature this model lacks). `shapes` maps canonical names to [out, in] shapes."""
    expected = {t.name: t.shape for t in canonical_tensors(cfg, None, "halves")}
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise ModelImportError(f"{where}: missing tensor {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ModelImportError(f"{where}: tensor {name} has shape {list(shapes[name])}, "
                               f"expected {list(shape)} from the model's hyperparameters")
    extra = sorted(n for n in shapes if n not in expected and not ignored(n))
    if extra:
        raise ModelImportError(f"{where}: tensor {extra[0]} belongs to a feature this model does not "
                           f"have" + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))


def periodic_pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest period that repeats into `kinds` (a partial last period allowed)."""
    for period in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            return tuple(kinds[:period])
    return tuple(kinds)
