"""Atomic writes: a reader (another process, a resumed run, a crash after the fact) sees the old file or
directory or the new one, never half of either. Everything is written beside its destination under a
temporary name (`.tmp-<name>-<random>`) and renamed into place with `os.replace`, which is atomic within
one filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _temp_name(dst: Path, kind: str = "tmp") -> Path:
    return dst.parent / f".{kind}-{dst.name}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temp file beside it; creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj, ensure_ascii: bool = True) -> Path:
    """`obj` as indented JSON with a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the directory `src` to `dst` in one rename. An existing `dst` is first renamed aside
    (`.old-<name>-<random>`, so it is never seen half-deleted) and then removed."""
    old = None
    if dst.exists():
        old = _temp_name(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, create: bool = True) -> Iterator[Path]:
    """Yields a temp directory beside `out` to fill; on a normal exit it replaces `out` (see
    `replace_dir`), on an exception it is removed and `out` is left as it was. `create=False` yields the
    path without making it, for writers that create their own directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    if create:
        tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
