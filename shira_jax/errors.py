"""`AdapterLoadError` and careful file reading: the one way every adapter loader reads a file.

Every bad adapter file (orbax checkpoint or PEFT folder) is refused with an `AdapterLoadError`
(a `ValueError`) whose message names the file and the key or field. Files are read only when
they are regular files outside `/proc`, `/sys` and `/dev`: a FIFO, a device, a directory or
a symlink to `/proc/self/mem` is refused before any read, so a load never hangs.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from shira_jax import errors
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.json").write_text('{"x": [1, 2]}')
    >>> errors.read_json_object(folder / "a.json")
    {'x': [1, 2]}
    >>> try:
    ...     errors.read_json_object(folder)
    ... except errors.AdapterLoadError as err:
    ...     print("refused:", "not a regular file" in str(err))
    refused: True
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "AdapterFileNotFoundError",
    "AdapterKeyError",
    "AdapterLoadError",
    "AdapterTargetError",
    "check_dotted_path",
    "check_regular_file",
    "parse_json_object",
    "read_json_object",
    "read_regular_bytes",
]

#: Pseudo file systems whose "regular" files are not data (reads block, fail or never end).
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
#: JSON nesting deeper than this is refused before parsing (json recurses per level).
MAX_JSON_DEPTH = 64
#: Largest JSON file read (adapter metadata is a few kB; a config a few MB at most).
MAX_JSON_BYTES = 64 * 2**20


class AdapterLoadError(ValueError):
    """An adapter file (orbax checkpoint or PEFT folder) is missing, unreadable or does not fit
    the model; the message names the file and the key or field. The model is unchanged."""


class AdapterFileNotFoundError(AdapterLoadError, FileNotFoundError):
    """An adapter folder or one of its files is missing (also a FileNotFoundError)."""


class AdapterKeyError(AdapterLoadError, KeyError):
    """An `AdapterLoadError` for a key of the file that names no part of the model (also a
    KeyError, which such refusals raised before)."""


class AdapterTargetError(AdapterLoadError, TypeError):
    """An `AdapterLoadError` for a config whose `target_modules` select a module SHiRA cannot
    wrap (also a TypeError, as PEFT raises for modules other than Linear)."""


_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def check_dotted_path(path: Any, source: Any, field: str) -> str:
    """`path` if it is a dotted module or variable path (`model.layers.0.q_proj`): no empty
    parts, no `..`, `/` or dunder names such as `__class__`; else an `AdapterLoadError`.

    >>> check_dotted_path("layers.0.kernel", "f.json", "layers")
    'layers.0.kernel'
    """
    if (
        not isinstance(path, str)
        or len(path) > 1000
        or not _DOTTED.fullmatch(path)
        or any(part.startswith("__") for part in path.split("."))
    ):
        raise AdapterLoadError(
            f"{source}: {field}: {str(path)[:200]!r} is not a dotted module/variable path."
        )
    return path


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file that is safe to read, else an `AdapterLoadError`.

    Symlinks are followed, but the file they reach must be regular and outside `/proc`,
    `/sys` and `/dev` (where "regular" files such as `/proc/self/mem` are not data).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise AdapterFileNotFoundError(f"{path}: the {what} does not exist.") from err
    except OSError as err:
        raise AdapterLoadError(f"{path}: cannot stat the {what} ({err}).") from err
    if not stat.S_ISREG(mode):
        raise AdapterLoadError(
            f"{path}: the {what} is not a regular file ({_kind(mode)}); refusing to read it."
        )
    real = os.path.realpath(path)
    if any(real == root or real.startswith(root + "/") for root in _PSEUDO_ROOTS):
        raise AdapterLoadError(
            f"{path}: the {what} resolves to {real}, a pseudo file; refusing to read it."
        )
    return path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def read_regular_bytes(
    path: str | os.PathLike, what: str = "file", limit: int | None = None
) -> bytes:
    """The bytes of a regular file (see `check_regular_file`), at most `limit` of them.

    The file is opened non-blocking and checked again on its descriptor, so a file swapped
    for a FIFO between the check and the open cannot block the read.
    """
    path = check_regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise AdapterLoadError(f"{path}: cannot open the {what} ({err}).") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterLoadError(f"{path}: the {what} is not a regular file; refusing it.")
        if limit is not None and info.st_size > limit:
            raise AdapterLoadError(
                f"{path}: the {what} has {info.st_size} bytes, more than the {limit} allowed."
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read() if limit is None else handle.read(limit + 1)[:limit]
    except OSError as err:
        raise AdapterLoadError(f"{path}: cannot read the {what} ({err}).") from err
    finally:
        os.close(fd)


def _nesting(text: str) -> int:
    """Maximum bracket depth of JSON text, strings skipped (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object (dict) from a regular file; anything else is an `AdapterLoadError`."""
    return parse_json_object(read_regular_bytes(path, what, limit=MAX_JSON_BYTES), path, what)


def parse_json_object(data: bytes, source: Any, what: str = "JSON file") -> dict[str, Any]:
    """`data` parsed as a JSON object; bad UTF-8, bad JSON, nesting deeper than
    `MAX_JSON_DEPTH` or anything but an object is an `AdapterLoadError` naming `source`.

    >>> parse_json_object(b"[1]", "x.json")
    Traceback (most recent call last):
    shira_jax.errors.AdapterLoadError: x.json: the JSON file must hold a JSON object, got list.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterLoadError(f"{source}: the {what} is not UTF-8 text ({err}).") from err
    if _nesting(text) > MAX_JSON_DEPTH:
        raise AdapterLoadError(
            f"{source}: the {what} nests deeper than {MAX_JSON_DEPTH} levels; refusing it."
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise AdapterLoadError(f"{source}: the {what} is not valid JSON ({err}).") from err
    if not isinstance(obj, dict):
        raise AdapterLoadError(
            f"{source}: the {what} must hold a JSON object, got {type(obj).__name__}."
        )
    return obj
