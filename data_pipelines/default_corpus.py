"""An embedded default corpus that exists on every machine without a download.

Docstrings of the installed Python standard library, read from its `.py` sources with `ast`
(nothing is imported), in sorted file order, so the text is deterministic for a given Python.
"""

from __future__ import annotations

import ast
import inspect
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipelines.atomic import write_atomic

_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "__pycache__"}
_MIN_CHARS = 40


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                doc = inspect.cleandoc(doc)
                if len(doc) >= _MIN_CHARS:
                    yield doc


def _stdlib_sources() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def default_corpus_text(max_chars: int = 2_000_000) -> str:
    """Up to `max_chars` characters of standard-library docstrings, blank-line separated."""
    docs, size = [], 0
    for path in _stdlib_sources():
        for doc in _docstrings(path):
            docs.append(doc)
            size += len(doc) + 2
            if size >= max_chars:
                return "\n\n".join(docs)[:max_chars]
    return "\n\n".join(docs)


def write_default_corpus(path: str | Path, max_chars: int = 2_000_000) -> Path:
    """Write the default corpus as UTF-8, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, default_corpus_text(max_chars).encode("utf-8"))


def default_instructions(max_items: int = 4000) -> list[dict[str, str]]:
    """Embedded instruction data: "What does module.function do?" -> its docstring summary.

    Public functions of the standard library with a one-line summary, in sorted file order.
    """
    items, seen = [], set()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
            name = f"{module}.{node.name}"
            if 20 <= len(summary) <= 200 and name not in seen:
                seen.add(name)
                items.append({"prompt": f"What does {name} do?", "completion": summary})
                if len(items) >= max_items:
                    return items
    return items


def default_preference_pairs(max_items: int = 4000, seed: int = 0) -> list[dict[str, str]]:
    """Embedded preference pairs: a function's summary (chosen) against the same words in a
    shuffled order (rejected), so a held-out pair's two replies share their vocabulary and
    only fluency tells them apart."""
    rng = np.random.default_rng(seed)
    pairs = []
    for item in default_instructions(max_items):
        words = item["completion"].split()
        shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
        if shuffled != " ".join(words):
            pairs.append({"prompt": item["prompt"], "chosen": item["completion"],
                          "rejected": shuffled})
    return pairs
