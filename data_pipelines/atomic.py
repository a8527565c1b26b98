"""Atomic outputs: a temporary beside the target, fsynced, then renamed onto it.

Readers see the old file or folder or the whole new one, never a part. Temporaries are named
`.NAME.tmp-<pid>-<hex>` (plus `.<suffix>` for helper files beside one, such as an F32 stage),
and a folder being replaced is set aside as `.NAME.old-<pid>-<hex>`. An exception, Ctrl-C, or
SIGTERM inside `sigterm_unwinds()` removes the temporary; after a kill that cannot be caught
(SIGKILL, power loss) the next write of the same target removes the temporaries of processes
that are gone, and puts back a set-aside folder whose replacement never landed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator

_TEMP = re.compile(r"(tmp|old)-(\d+)-[0-9a-f]+(\.\w+)?")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary file beside `path`; on success it is fsynced and renamed onto it."""
    path = Path(path)
    created = _make_parents(path.parent)
    remove_stale(path)
    tmp = _temp(path, "tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like `atomic_file` for a folder: fill the yielded temporary folder; it replaces `path`
    (the old one is renamed aside, the new one renamed in, then the old one deleted)."""
    path = Path(path)
    created = _make_parents(path.parent)
    remove_stale(path)
    tmp, old = _temp(path, "tmp"), None
    try:
        tmp.mkdir(0o755)
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = _temp(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
        _remove(tmp)
        _remove_empty(created)
        raise
    finally:
        if old is not None and path.exists():  # else it is the only copy: kept for remove_stale
            _remove(old)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def remove_stale(path: str | Path) -> None:
    """Remove the temporaries of `path` whose process is gone; a set-aside old folder is put
    back instead when `path` itself is missing (the kill came between the two renames)."""
    path = Path(path)
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for entry in sorted(path.parent.iterdir()):
        match = _TEMP.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or _alive(int(match[2])):
            continue
        if match[1] == "old" and not match[3] and not (path.exists() or path.is_symlink()):
            os.rename(entry, path)
        else:
            _remove(entry)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM raises SystemExit(143) in the main thread, so temporaries are removed
    as on Ctrl-C. The previous handler is restored on exit."""
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _temp(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)
