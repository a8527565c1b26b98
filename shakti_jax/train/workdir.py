"""A run's workdir before training starts: one run at a time, the same config as before, and
its own copy of the tokenizer.

- `WorkdirLock`: `WORKDIR/.lock` holds the owner's pid and host; a second run stops with one
  line; a lock whose process is gone (same host) is stale and taken over.
- `check_config_change`: a rerun whose config differs from the one the newest checkpoint
  was trained with is a one-line ConfigError naming the keys, unless each is listed in
  `train.allow_changes` (comma-separated keys, e.g. "train.steps" for a longer schedule); keys that change the saved arrays' shapes
  or the task can never change in a workdir.
- `prepare_tokenizer`: the configured tokenizer, the init_from checkpoint's, or one trained
  on the training sources, always copied into the workdir (`WORKDIR/tokenizer.model`, or a
  byte-level BPE's `WORKDIR/tokenizer.json` + `tokenizer_config.json`) so the workdir stays
  usable from any directory and after the original moves.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from ml_collections import ConfigDict

from data_pipelines.pipeline import open_sources
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from shakti_jax.config import ConfigError

TOKENIZER = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER, "tokenizer.json")  # sentencepiece, byte-level BPE
# Settings that change how a run is watched or saved, never what it computes.
ALWAYS_CHANGEABLE = ("train.progress_bar", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.eval_tasks", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.async_checkpoints", "train.allow_changes", "train.profile_steps",
                     "train.init_from", "train.init_from_step", "train.resume_step",
                     "data.num_threads")
# Settings the saved arrays' shapes or structure depend on.
NEVER_CHANGEABLE = ("stage", "model.vocab_size", "model.num_layers", "model.d_model",
                    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.ffn_dim",
                    "model.mlp", "model.norm", "model.tie_embeddings", "model.attention_pattern",
                    "model.param_dtype", "dpo.reference", "lora")


class WorkdirBusy(ConfigError):
    """Another run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self._held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise WorkdirBusy(
                        f"workdir {self.path.parent} is in use by pid {owner['pid']} on "
                        f"{owner['host']} (remove {self.path} if that run is gone)") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise WorkdirBusy(f"could not take {self.path}: another run keeps creating it")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if {"pid", "host"} <= set(owner) else None
        except (OSError, ValueError):
            return None  # half-written or unreadable: treat as stale

    @staticmethod
    def _stale(owner: Mapping[str, Any]) -> bool:
        if owner["host"] != socket.gethostname():
            return False  # cannot tell from here; the message says how to clear it
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def check_config_change(config: ConfigDict, saved: Mapping[str, Any] | None, workdir: Path) -> None:
    """ConfigError naming every key whose value differs from the saved run's config."""
    if not saved:
        return
    now, before = _flatten(config.to_dict()), _flatten(saved)
    allowed = tuple(k.strip() for k in config.train.get("allow_changes", "").split(",") if k.strip())
    changed = sorted(k for k in set(now) | set(before)
                     if json.dumps(now.get(k), default=str) != json.dumps(before.get(k), default=str)
                     and not _covered(k, ALWAYS_CHANGEABLE))
    fixed = [k for k in changed if _covered(k, NEVER_CHANGEABLE)]
    if fixed:
        raise ConfigError(f"workdir {workdir} was trained with {_describe(fixed, before, now)}; "
                          f"{'it' if len(fixed) == 1 else 'these'} cannot change in a workdir "
                          f"(use a new workdir, with train.init_from={workdir} to start from it)")
    refused = [k for k in changed if not _covered(k, allowed)]
    if refused:
        raise ConfigError(f"workdir {workdir} was trained with {_describe(refused, before, now)}; "
                          f"to continue it with the new values pass "
                          f"--config.train.allow_changes={','.join(refused)} (or use a new workdir)")


def _describe(keys, before, now) -> str:
    return ", ".join(f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in keys)


def prepare_tokenizer(config: ConfigDict, workdir: Path, init_from_tokenizer: Path | None,
                      vocab_size: int) -> Tokenizer:
    """The run's tokenizer, copied into the workdir. Precedence: the workdir's own copy (a
    resumed run), `data.tokenizer`, the init_from checkpoint's, else (pretraining) one
    trained on the training sources. Every process does the same (atomic writes), so hosts
    with or without a shared workdir agree."""
    own = workdir_tokenizer(workdir)
    source = own or (Path(config.data.tokenizer) if config.data.tokenizer else init_from_tokenizer)
    if source is None and config.get("stage", "pretrain") != "pretrain":
        raise ConfigError("data.tokenizer is empty and train.init_from names no checkpoint "
                          "with a tokenizer; set one of them")
    if source is None:
        _train_into(config, workdir, vocab_size)
        target = workdir / TOKENIZER
    else:
        target = own or Tokenizer.load(source).save(workdir)
    tokenizer = Tokenizer.load(target)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} pieces ({source or target})")
    return tokenizer


def workdir_tokenizer(workdir: Path) -> Path | None:
    """The workdir's own tokenizer file (`TOKENIZER_FILES`), or None before it has one."""
    return next((workdir / name for name in TOKENIZER_FILES if (workdir / name).exists()), None)


def _train_into(config: ConfigDict, workdir: Path, vocab_size: int) -> None:
    corpus = workdir / f"tokenizer_corpus.{os.getpid()}.txt"
    write_corpus_sample(open_sources(list(config.data.sources)), corpus)
    try:
        train_tokenizer([corpus], vocab_size, workdir / "tokenizer")
    finally:
        corpus.unlink(missing_ok=True)


def write_corpus_sample(sources, path: Path, max_chars: int = 5_000_000) -> None:
    """The first documents of each source (in file order), up to `max_chars` in total."""
    path.parent.mkdir(parents=True, exist_ok=True)
    budget = max_chars // len(sources)
    with path.open("w", encoding="utf-8") as f:
        for _, docs in sources:
            used = 0
            for i in range(len(docs)):
                doc = docs[i]
                if doc.text is not None:
                    f.write(doc.text.replace("\r", "") + "\n")
                    used += len(doc.text)
                if used >= budget:
                    break

