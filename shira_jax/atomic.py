"""Atomic file and directory writes: a kill at any moment leaves the old or the new version.

Every writer in shira_jax and bridge goes through these three functions: a file is written
to a hidden temporary name in its own folder and renamed over the target (`os.replace` is
atomic on POSIX); a directory is assembled in a hidden sibling and swapped in by
`replace_dir`.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from shira_jax import atomic
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic.write_json(folder / "a.json", {"x": 1})
    >>> json.loads((folder / "a.json").read_text())
    {'x': 1}
    >>> with atomic.staging_dir(folder / "ckpt") as tmp:
    ...     _ = (tmp / "data.txt").write_text("hello")
    >>> (folder / "ckpt" / "data.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["replace_dir", "staging_dir", "write_bytes", "write_json", "write_with"]


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def write_with(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> None:
    """Call `write(tmp_path)` on a hidden temporary file beside `path`, then rename it over
    `path`. On any error the temporary file is removed and `path` is left as it was.

    `suffix` is appended to the temporary name (some writers pick the format by extension).
    """
    path = Path(path)
    tmp = _sibling(path, "tmp")
    tmp = tmp.with_name(tmp.name + suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `write_with`)."""
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically (see `write_with`)."""
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory `new` to `target`, replacing an old `target` only once the
    new one is whole (the old one is moved aside first, then deleted)."""
    new, target = Path(new), Path(target)
    if target.exists() or target.is_symlink():
        old = _sibling(target, "old")
        os.replace(target, old)
        os.replace(new, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike, *, name: str | None = None) -> Iterator[Path]:
    """Yield an empty hidden directory beside `target`; on normal exit it replaces `target`
    (`replace_dir`), on an error it is deleted and `target` is left as it was.

    `name` fixes the staging folder's name (several processes writing one checkpoint must
    agree on it); by default it is unique.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / name if name else _sibling(target, "tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
