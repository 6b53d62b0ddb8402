"""Command-line flags generated from dataclass fields, so no option is written twice.

A field made with `option(default, help=...)` becomes `--field-name` with the field's default
(its type taken from the default); `from_namespace` builds the dataclass back from the parsed
flags. Booleans are switches that flip the default (`option(True, flag="--no-peft")`); a
tuple default is shown and parsed as a comma-separated string; fields made with a plain
`dataclasses.field` (no metadata) get no flag.

Example:
    >>> import argparse, dataclasses
    >>> from shira_jax.app.flags import add_flags, from_namespace, option
    >>> @dataclasses.dataclass(frozen=True)
    ... class Opts:
    ...     steps: int = option(10, help="optimizer steps")
    ...     dtype: str = option("float32", help="compute dtype", choices=("float32", "bfloat16"))
    ...     export: bool = option(True, help="skip the export", flag="--no-export")
    ...     hidden: float = 0.5
    >>> parser = argparse.ArgumentParser()
    >>> add_flags(parser, Opts)
    >>> from_namespace(Opts, parser.parse_args(["--steps", "3", "--no-export"]))
    Opts(steps=3, dtype='float32', export=False, hidden=0.5)
"""

from __future__ import annotations

import argparse
import dataclasses
from argparse import SUPPRESS
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")
_KEY = "flag"  # metadata key that marks a field as a flag


def option(
    default: Any,
    help: str | None = None,
    *,
    flag: str | None = None,
    choices: Iterable[str] | None = None,
    metavar: str | None = None,
    type: Any = None,
    nargs: str | None = None,
    positional: bool = False,
    repeat: bool = False,
) -> Any:
    """A dataclass field with default `default` that is also a command-line flag.

    `default=dataclasses.MISSING` makes it required (a positional argument, usually).
    `flag` overrides the name (default `--field-name`); `type` the type (default: the
    default's type, `str` for None); `positional=True` makes an argument without dashes;
    `repeat=True` lets the flag be given several times (a tuple of values, default `()`).
    """
    spec = {
        "help": help,
        "flag": flag,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "type": type,
        "nargs": nargs,
        "positional": positional,
        "repeat": repeat,
    }
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def _flagged(cls: type) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def _argument(field: dataclasses.Field, spec: dict[str, Any]) -> tuple[list[str], dict]:
    """The `add_argument(*names, **kw)` call for one field."""
    default = field.default
    if spec["positional"]:
        names, kw = [field.name], {}
    else:
        names = [spec["flag"] or "--" + field.name.replace("_", "-")]
        kw = {"dest": field.name}
    kw["help"] = spec["help"]
    if isinstance(default, bool):  # a switch: giving it flips the default
        return names, {**kw, "action": "store_const", "const": not default, "default": SUPPRESS}
    for key in ("choices", "metavar", "nargs"):
        if spec[key] is not None:
            kw[key] = spec[key]
    if spec.get("repeat"):
        return names, {**kw, "action": "append", "default": None, "type": spec["type"] or str}
    if default is dataclasses.MISSING:
        if not spec["positional"]:
            kw["required"] = True
    elif isinstance(default, tuple) and spec["nargs"] is None:  # "a,b" on the command line
        kw["default"] = ",".join(default)
    else:
        kw["default"] = default
    plain = default is None or default is dataclasses.MISSING or isinstance(default, tuple)
    kw["type"] = spec["type"] or (str if plain else type(default))
    return names, kw


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag to `parser` for each `option` field of the dataclass `cls`."""
    for field, spec in _flagged(cls):
        names, kw = _argument(field, spec)
        parser.add_argument(*names, **kw)


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """`cls(...)` from parsed flags: every `option` field that was parsed, else its default."""
    values = {}
    for field, _ in _flagged(cls):
        if hasattr(namespace, field.name):
            value = getattr(namespace, field.name)
            if value is None and isinstance(field.default, tuple):  # a repeatable flag, unused
                value = field.default
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
