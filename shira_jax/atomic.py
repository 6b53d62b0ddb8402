"""Atomic file and directory writes: a kill at any moment leaves the old or the new version.

Every writer in shira_jax and bridge goes through these functions:

* one file: `write_with` / `write_bytes` / `write_json` write a hidden temporary file beside
  the target and rename it over the target (`os.replace` is atomic on POSIX);
* several files of one folder as one unit (a PEFT folder's config and weights):
  `write_files` writes each to a fixed hidden name `.<name>.new-shira`, then a journal
  `.shira-commit.json` (atomically), renames them all, and deletes the journal;
* a directory: `staging_dir` / `replace_dir` assemble it in the sibling `.<name>.tmp-shira`,
  write the journal `.<name>.swap-shira`, move the old target to `.<name>.old-shira`, move
  the new one in, delete the journal, then the old copy.

Temporary names are fixed per target (never random), so every process of one multi-host
save agrees on them. A kill leaves at most a journal and hidden siblings; `recover_dir` /
`recover_files` (called by the next save, and by loads) roll a complete journal forward,
else back to the old version, and (on a save) delete the leftovers. Swaps and recoveries of
one folder are serialized by an advisory lock on that folder (`fcntl.flock`), so a load that
recovers never races a save. A symlink planted at a temporary name is unlinked, never
followed. (This protects against killed processes; data is not fsynced, so a power loss may
still lose the latest save.)

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
    >>> atomic.write_files(folder / "pair", {"a.txt": b"1", "b.txt": b"2"})
    >>> sorted(p.name for p in (folder / "pair").iterdir())
    ['a.txt', 'b.txt']
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FILES_JOURNAL",
    "recover_dir",
    "recover_files",
    "replace_dir",
    "sibling",
    "staging_dir",
    "write_bytes",
    "write_files",
    "write_json",
    "write_with",
]

#: The journal of a `write_files` commit, in the folder it writes.
FILES_JOURNAL = ".shira-commit.json"
_TAG = "shira"
#: Temporary names of earlier versions (`.<name>.tmp-<8 hex>`, `.<name>.old-<8 hex>`).
_LEGACY = re.compile(r"\.(tmp|old)-[0-9a-f]{8}(\..*)?")


def sibling(target: str | os.PathLike, kind: str) -> Path:
    """The fixed hidden sibling `.<name>.<kind>-shira` of `target` (the same on every process).

    >>> sibling("/ckpt/step_5", "tmp").as_posix()
    '/ckpt/.step_5.tmp-shira'
    """
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{_TAG}"


def _remove(path: Path) -> None:
    """Delete `path` whatever it is; a symlink is unlinked, never followed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` (held while journals are read or written)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_with(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> None:
    """Call `write(tmp_path)` on a hidden temporary file beside `path`, then rename it over
    `path`. On any error the temporary file is removed and `path` is left as it was.

    `suffix` is appended to the temporary name (some writers pick the format by extension).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
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


def _write_journal(path: Path, obj: Any) -> None:
    """Write a journal atomically through the fixed temporary name `<journal>.tmp`."""
    tmp = path.with_name(path.name + ".tmp")
    _write_new(tmp, json.dumps(obj).encode())
    os.replace(tmp, path)


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` afresh (whatever was there is removed, a symlink never followed)."""
    _remove(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# ----------------------------------------------------------------------------- several files


def _new_name(name: str) -> str:
    return f".{name}.new-{_TAG}"


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def write_files(folder: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Write the files `{name: bytes}` into `folder` as one unit: after a kill at any moment,
    the next `recover_files` (every `write_files` and loader calls it) leaves all of them
    old or all of them new. Other files of `folder` are not touched."""
    folder = Path(folder)
    names = sorted(files)
    if not names or not all(_plain_name(n) for n in names):
        raise ValueError(f"write_files needs plain file names, got {names}.")
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder, names, clean=True)
    try:
        for name in names:
            _write_new(folder / _new_name(name), files[name])
    except BaseException:
        for name in names:
            _remove(folder / _new_name(name))
        raise
    with _locked(folder):
        _write_journal(folder / FILES_JOURNAL, {"files": names})  # the commit point
        _roll_files_forward(folder, names)


def _roll_files_forward(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # already renamed before a kill
            os.replace(folder / _new_name(name), folder / name)
    (folder / FILES_JOURNAL).unlink(missing_ok=True)


def _read_journal(journal: Path) -> dict[str, Any] | None:
    """A journal's JSON object when it is a small regular file of ours, else None."""
    try:
        if journal.is_symlink() or not journal.is_file() or journal.stat().st_size > 2**16:
            return None
        data = json.loads(journal.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _journal_names(journal: Path) -> list[str] | None:
    """The file names a `write_files` journal commits, or None if it is not one of ours."""
    data = _read_journal(journal)
    names = data.get("files") if data is not None else None
    if not isinstance(names, list) or not names or not all(_plain_name(n) for n in names):
        return None
    return names


def recover_files(
    folder: str | os.PathLike, names: Iterable[str] = (), *, clean: bool = False
) -> bool:
    """Finish or undo a `write_files` that a kill interrupted in `folder`.

    A complete journal is rolled forward (its new files renamed into place); temporary files
    without a journal are an unfinished write: with `clean` (a writer calls it) they and
    `write_with` leftovers of `names` are deleted, else (a loader) left alone, as another
    process may be writing them. Returns whether a journal was rolled forward.
    """
    folder = Path(folder)
    journal = folder / FILES_JOURNAL
    if not folder.is_dir() or (not clean and not os.path.lexists(journal)):
        return False
    rolled = False
    with _locked(folder):
        if os.path.lexists(journal):
            committed = _journal_names(journal)
            if committed is not None:
                _roll_files_forward(folder, committed)
                rolled = True
            _remove(journal)
        if clean:
            _remove(folder / (FILES_JOURNAL + ".tmp"))
            for name in [*names, FILES_JOURNAL]:
                _remove(folder / _new_name(name))
                for leftover in folder.glob(f".{glob_escape(name)}.tmp-*"):
                    if _LEGACY.fullmatch(leftover.name[len(name) + 1 :]):
                        _remove(leftover)
    return rolled


def glob_escape(name: str) -> str:
    """`name` with glob's special characters escaped.

    >>> glob_escape("a[1].json")
    'a[[]1].json'
    """
    return re.sub(r"([*?[])", r"[\1]", name)


# ----------------------------------------------------------------------------- directories


def _journal_new(journal: Path, target: Path) -> Path | None:
    """The staged directory a swap journal names (a sibling of `target`), or None."""
    data = _read_journal(journal)
    name = data.get("new") if data is not None else None
    if not isinstance(name, str) or "/" in name or not name.startswith(f".{target.name}."):
        return None
    if name in (sibling(target, "old").name, journal.name):
        return None
    return target.parent / name


def _swap(new: Path, target: Path) -> None:
    """Move `target` aside (to the fixed old name) and `new` in; the journal says `new` is
    whole, so a kill in between is rolled forward."""
    old = sibling(target, "old")
    if new.is_dir() and not new.is_symlink():
        if os.path.lexists(target):
            _remove(old)
            os.replace(target, old)
        os.replace(new, target)
    sibling(target, "swap").unlink(missing_ok=True)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory `new` (a sibling of `target`) to `target`, replacing an old
    `target` only once the new one is whole. A kill at any moment leaves either version for
    the next `recover_dir` (see the module docstring)."""
    new, target = Path(new), Path(target)
    if new.parent.resolve() != target.parent.resolve():
        raise ValueError(f"replace_dir: {new} must be in the folder of {target}.")
    with _locked(target.parent):
        _write_journal(sibling(target, "swap"), {"new": new.name})  # the commit point
        _swap(new, target)
    _remove(sibling(target, "old"))


def recover_dir(target: str | os.PathLike, *, clean: bool = False) -> None:
    """Finish or undo a directory swap that a kill interrupted (see the module docstring).

    A complete journal is rolled forward; without one, a missing `target` gets its old copy
    back. With `clean` (a writer calls it) the leftover siblings (staged, old, and earlier
    versions' `.tmp-<hex>` / `.old-<hex>` names) are deleted; a loader (`clean=False`) never
    deletes a staged copy, as another process may be writing it.
    """
    target = Path(target)
    parent = target.parent
    journal, old = sibling(target, "swap"), sibling(target, "old")
    if not parent.is_dir():
        return
    if not clean and not os.path.lexists(journal) and os.path.lexists(target):
        return  # the common case of a load: nothing to do, no lock taken
    with _locked(parent):
        if os.path.lexists(journal):
            new = _journal_new(journal, target)
            if new is not None:
                _swap(new, target)
            _remove(journal)
        elif not os.path.lexists(target) and old.is_dir() and not old.is_symlink():
            os.replace(old, target)  # roll back
        if clean:
            _remove(old)
            _remove(sibling(target, "tmp"))
            _remove(journal.with_name(journal.name + ".tmp"))
            for leftover in parent.glob(f".{glob_escape(target.name)}.*"):
                if _LEGACY.fullmatch(leftover.name[len(target.name) + 1 :]):
                    _remove(leftover)


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike, *, name: str | None = None) -> Iterator[Path]:
    """Yield an empty hidden directory beside `target`; on normal exit it replaces `target`
    (`replace_dir`), on an error it is deleted and `target` is left as it was.

    The staging folder is `.<target>.tmp-shira` unless `name` fixes another (several
    processes writing one checkpoint must agree on it). Leftovers of a killed earlier save are
    recovered or deleted first (`recover_dir`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target, clean=True)
    tmp = target.parent / name if name else sibling(target, "tmp")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
