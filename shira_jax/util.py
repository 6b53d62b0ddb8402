"""Small helpers on names and NNX module trees, shared by every layer of shira_jax.

Example:
    >>> from flax import nnx
    >>> from shira_jax import util
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.blocks = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
    >>> net = Net()
    >>> util.get_submodule(net, "blocks.0").kernel.shape
    (2, 2)
    >>> util.as_tuple("a"), util.as_tuple(["a", "b"])
    (('a',), ('a', 'b'))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

__all__ = ["as_tuple", "check_adapter_name", "dotted", "get_submodule", "set_submodule"]

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
#: Longest adapter name: it becomes a folder name, and file systems allow 255 bytes.
MAX_ADAPTER_NAME = 100


def as_tuple(names: str | Sequence[str]) -> tuple[str, ...]:
    """One name or a sequence of names as a tuple."""
    return (names,) if isinstance(names, str) else tuple(names)


def dotted(path: Sequence[Any]) -> str:
    """An NNX graph path as a dotted module name: `("layers", 0, "q_proj")` -> "layers.0.q_proj"."""
    return ".".join(str(p) for p in path)


def check_adapter_name(name: str) -> str:
    """Adapter names become folder names in saved files: letters, digits, '_' and '-' only,
    at most `MAX_ADAPTER_NAME` characters (the whole name must match: no trailing newline).

    >>> check_adapter_name("my-adapter_2")
    'my-adapter_2'
    >>> check_adapter_name("bad\\n")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: Bad adapter name 'bad\\n': use letters, digits, '_' and '-' ...
    """
    if (
        not isinstance(name, str)
        or len(name) > MAX_ADAPTER_NAME
        or not _ADAPTER_NAME.fullmatch(name)
    ):
        shown = name if not isinstance(name, str) or len(name) <= 120 else name[:120] + "..."
        raise ValueError(
            f"Bad adapter name {shown!r}: use letters, digits, '_' and '-' "
            f"(no path separators, dots or '..'), at most {MAX_ADAPTER_NAME} characters."
        )
    return name


def get_submodule(model: nnx.Module, path: str) -> Any:
    """The node at dotted `path` (attributes, `nnx.List` positions, `nnx.Dict` keys)."""
    node: Any = model
    for key in path.split("."):
        if isinstance(node, nnx.List):
            node = node[int(key)]
        elif isinstance(node, nnx.Dict):
            node = node[key]
        else:
            node = getattr(node, key)
    return node


def set_submodule(model: nnx.Module, path: str, module: Any) -> None:
    """Replace the node at dotted `path` by `module`, in place."""
    parent_path, _, key = path.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    if isinstance(parent, nnx.List):
        parent[int(key)] = module
    elif isinstance(parent, nnx.Dict):
        parent[key] = module
    else:
        setattr(parent, key, module)
