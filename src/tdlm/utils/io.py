"""Atomic file and folder writes, and file hashes: the one implementation the package uses.

* :func:`atomic_write` (and ``_text``/``_bytes``/``_json``): the content goes to a temporary
  file next to the target, is fsynced and renamed over it (``os.replace``), so a reader sees
  the old file or the new one, never a partial one; the temporary file is removed on failure.
* :func:`atomic_folder`: a context manager yielding a temporary folder next to the target; on
  success its files are fsynced, it is renamed into place (an existing target, when allowed, is
  first moved aside and removed afterwards) and the parent directory is fsynced; on failure the
  temporary folder is removed and the target is untouched.
* :func:`write_json`: a JSON file written and fsynced in place (inside a temporary folder that
  :func:`atomic_folder` renames as a whole).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = False) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file next to ``path`` (opened
    ``"wb"`` when ``binary``, else UTF-8 text), which is fsynced and renamed onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2,
                      sort_keys: bool = True) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=indent, sort_keys=sort_keys))


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON written and fsynced in place (for files inside an :func:`atomic_folder`)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False,
                  prefix: str = ".tmp-") -> Iterator[Path]:
    """Build a folder atomically (module docstring). ``replace``: an existing ``target`` is
    replaced; otherwise an existing non-empty ``target`` raises FileExistsError before
    anything is written (an empty one is replaced)."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{target.name}-"))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        aside = None
        if target.exists():
            aside = parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, aside)
        os.replace(tmp, target)
        tmp = None
        fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
