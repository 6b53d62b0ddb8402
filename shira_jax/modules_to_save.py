"""`modules_to_save`: whole modules trained fully and saved with an adapter (PEFT's wrapper).

The original module stays untouched; each adapter gets its own copy whose params are
`ShiraModuleParam` (a `ShiraParam`, so `wrt=ShiraParam` trains them) while it is active.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from flax import nnx

from shira_jax.layer import ShiraFrozenValues, ShiraParam
from shira_jax.util import as_tuple, get_submodule, set_submodule


class ShiraModuleParam(ShiraParam):
    """A param of an adapter's own copy of a `modules_to_save` module."""


class ModulesToSave(nnx.Module):
    """Runs the active adapter's copy of a module, or the original one."""

    def __init__(self, original_module: nnx.Module, *, path: str = "") -> None:
        self.original_module = original_module
        self.modules_to_save = nnx.Dict()
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.path = path

    def owners(self, adapters: Sequence[str]) -> list[str]:
        """The adapters among `adapters` that have their own copy of this module."""
        return [a for a in adapters if a in self.modules_to_save]

    def add_adapter(self, adapter: str, active: bool) -> None:
        copy = nnx.clone(self.original_module)
        _retype_params(copy, ShiraModuleParam if active else ShiraFrozenValues)
        self.modules_to_save[adapter] = copy

    def set_adapter(self, adapters: str | Sequence[str]) -> None:
        self.active_adapters = as_tuple(adapters)
        for name in list(self.modules_to_save.keys()):
            kind = ShiraModuleParam if name in self.active_adapters else ShiraFrozenValues
            _retype_params(self.modules_to_save[name], kind)

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter)

    def active_module(self) -> nnx.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Parents that read attributes of the wrapped module (e.g. tied embeddings) still work.
        if name.startswith("_") or name in ("original_module", "modules_to_save"):
            raise AttributeError(name)
        return getattr(self.active_module(), name)


def check_one_copy(wrappers: Iterable[ModulesToSave], adapters: Sequence[str]) -> None:
    """PEFT's rule: of the adapters to activate together, at most one may have its own copy of
    a `modules_to_save` module (two trained copies cannot both run). Raises ValueError."""
    for wrapper in wrappers:
        owners = wrapper.owners(adapters)
        if len(owners) > 1:
            where = wrapper.path or type(wrapper.original_module).__name__
            raise ValueError(
                f"Adapters {owners} each have their own copy of the modules_to_save module "
                f"{where}; only one of them can be active at a time (PEFT raises the same "
                "ValueError). Activate them one at a time."
            )


def _variable_slots(module: nnx.Module) -> Iterator[tuple[Any, str, nnx.Variable]]:
    for _, node in nnx.iter_graph(module):
        if isinstance(node, (nnx.Module,)):
            items = node.items() if isinstance(node, nnx.Dict) else vars(node).items()
            for key, value in list(items):
                if isinstance(value, nnx.Variable):
                    yield node, key, value


def _retype_params(module: nnx.Module, kind: type[nnx.Variable]) -> None:
    for owner, key, variable in list(_variable_slots(module)):
        if isinstance(variable, (nnx.Param, ShiraFrozenValues)) and type(variable) is not kind:
            new = kind(variable[...], **variable.get_metadata())
            if isinstance(owner, nnx.Dict):
                owner[key] = new
            else:
                setattr(owner, key, new)


def select_modules_to_save(
    modules: dict[str, nnx.Module], patterns: Sequence[str], targets: Sequence[str] = ()
) -> list[str]:
    """Paths of the outermost modules whose path ends with one of `patterns`: PEFT's plain
    `key.endswith(name)` (so "norm" also picks "input_layernorm", as in PEFT).

    Errors if none matches, or if a chosen module is, holds or sits in a SHiRA target (a module
    cannot be both trained fully and adapted sparsely).
    """
    chosen = [p for p in modules if any(p.endswith(name) for name in patterns)]  # PEFT's rule
    chosen = [p for p in chosen if not any(p.startswith(c + ".") for c in chosen)]
    if not chosen:
        raise ValueError(f"modules_to_save {list(patterns)} matched no module of the model.")
    for path in chosen:
        clash = [
            t for t in targets if t == path or t.startswith(path + ".") or path.startswith(t + ".")
        ]
        if clash:
            raise ValueError(
                f"modules_to_save {path!r} overlaps the SHiRA target(s) {clash}; a module is "
                "either trained fully (modules_to_save) or adapted (target_modules), not both."
            )
    return chosen


def wrap_modules_to_save(
    model: nnx.Module, paths: Sequence[str], adapter: str, active: Sequence[str]
) -> None:
    """Give `adapter` a trainable copy of the module at each of `paths`."""
    for path in paths:
        module = get_submodule(model, path)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module, path=path)
        wrapper.add_adapter(adapter, active=adapter in active)
        if wrapper.active_adapters != tuple(active):  # a new wrapper, or one left with none
            wrapper.set_adapter(tuple(active))
        if wrapper is not module:
            set_submodule(model, path, wrapper)
