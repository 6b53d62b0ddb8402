"""The shape of the code, checked as tests: short functions, no private names crossing module
borders, and a core that imports none of the app's or the torch side's packages.

The import direction between modules (the layers of ../shared/DESIGN.md) is checked by
import-linter (`make lint`, contracts in pyproject.toml); these tests check what it cannot.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shira_jax", "bridge")
MAX_FUNCTION_LINES = 80

# Private names that may cross a module border: {(importing file, "module.name")}, each with the
# reason on its line. Keep it empty; at most a handful, within one small documented family.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {}


def _files(*roots: str) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        path = ROOT / root
        out += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [p for p in out if "__pycache__" not in p.parts]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- function length


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first.end_lineno - first.lineno + 1
    return 0


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function and method in `source`.

    Length = the lines from `def` (decorators not counted) to the function's last line, minus
    its docstring's lines; comments and blank lines inside count. A nested function's lines
    count in the function that holds it too.
    """
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                out.append((name, child.lineno, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_function_length_counts_code_not_docstrings():
    source = (
        "class C:\n"
        "    @staticmethod\n"
        "    def f():\n"
        '        """Doc\n\n        more doc.\n        """\n'
        "        def g():\n"
        "            return 1\n"
        "\n"
        "        return g()\n"
    )
    # f: def, def g, return 1, blank, return g() (decorator and 4 docstring lines not counted)
    assert function_lengths(source) == [("C.f", 3, 5), ("C.f.g", 8, 2)]


def test_no_function_longer_than_80_lines():
    long = [
        f"{_rel(path)}:{line} {name}: {length} lines"
        for path in _files(*PACKAGES)
        for name, line, length in function_lengths(path.read_text(encoding="utf-8"))
        if length > MAX_FUNCTION_LINES
    ]
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines (docstrings not counted); split them:\n"
        + "\n".join(long)
    )


# --------------------------------------------------------------------------- private names

SCANNED = (*PACKAGES, "benchmarks", "notebooks/_common.py")
PROJECT = {"shira_jax", "bridge", "benchmarks", "_common"}  # _common: the notebooks' helper


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "notebooks":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _is_project_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] not in PROJECT:
        return False
    if parts[0] == "_common":
        return len(parts) == 1
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_uses(source: str, here: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, "module.name") for each private name of another project module that the module
    `here` (its `source`) uses: `from m import _x`, and `m._x` / `pkg.m._x` where `m` was
    imported as a module. A module's own names, and private attributes of objects, are not
    counted."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> the project module it is bound to
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_project_module(a.name):
                    top = a.name.split(".")[0]
                    aliases[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node.module, node.level, here, is_package)
            if not _is_project_module(source_module) or source_module == here:
                continue
            for a in node.names:
                full = f"{source_module}.{a.name}"
                if _is_private(a.name):
                    found.append((node.lineno, full))
                elif _is_project_module(full):
                    aliases[a.asname or a.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if owner != here:
                    found.append((node.lineno, f"{owner}.{node.attr}"))
    return sorted(set(found))


def test_private_use_finder_sees_both_forms():
    source = (
        "from shira_jax.ops import _hidden, visible\n"
        "from . import masks\n"
        "from .models import llama\n"
        "import shira_jax as sj\n"
        "import numpy as np\n"
        "a = masks._strategy\n"
        "b = sj.ops._other\n"
        "c = visible._attribute_of_a_function\n"
        "d = np._private_but_not_ours\n"
        "e = llama._inv_freq\n"
        "f = self._own\n"
    )
    assert private_uses(source, "shira_jax.fusion") == [
        (1, "shira_jax.ops._hidden"),
        (6, "shira_jax.masks._strategy"),
        (7, "shira_jax.ops._other"),
        (10, "shira_jax.models.llama._inv_freq"),
    ]


def test_no_private_name_crosses_a_module_border():
    used = {
        (_rel(path), name): line
        for path in _files(*SCANNED)
        for line, name in private_uses(
            path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
        )
    }
    bad = [
        f"{file}:{line} uses {name}"
        for (file, name), line in sorted(used.items())
        if (file, name) not in PRIVATE_ALLOWED
    ]
    assert not bad, (
        "private names used from another module (make them public, or move the code to the "
        "module that owns them):\n" + "\n".join(bad)
    )
    stale = sorted(set(PRIVATE_ALLOWED) - set(used))
    assert not stale, f"allow-list entries no longer used, remove them: {stale}"


# --------------------------------------------------------------------------- import weight

APP_OR_TORCH_SIDE = (
    "torch", "bridge", "tqdm", "matplotlib", "tokenizers", "transformers", "peft", "safetensors",
    "shira_jax.app",
)


@pytest.mark.parametrize("module", ["shira_jax", "shira_jax.models"])
def test_importing_the_core_loads_no_app_or_torch_package(module):
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert module in loaded
    heavy = sorted(
        m for m in loaded for name in APP_OR_TORCH_SIDE if m == name or m.startswith(name + ".")
    )
    assert not heavy, f"`import {module}` loaded {heavy}"
