"""`AdapterState`: the one in-memory form of an adapter, and `extract` / `inject` on models.

Every file format is a plain mapping to and from an `AdapterState`: orbax checkpoints
(`shira_jax.checkpoint`), PEFT folders (`bridge.peft`), and `bridge.convert` between them.
A state holds, per adapted layer, the kernel-layout indices `[*stack, 2, nnz]`, the values
`[*stack, nnz]`, the kernel shape `[*stack, in, out]` and `r`; the adapter's
`modules_to_save` copies as `{module path: {variable path: array}}` (Flax layout); and its
`ShiraConfig`. Scan-stacked layers are kept whole; `unstacked()` / `restacked()` give the
per-layer form that PEFT files use (`layers.N` paths).

`inject` checks everything against the model before it changes anything: on any error the
model is exactly as it was.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> from shira_jax import state
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.proj = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    >>> net = Net()
    >>> _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"], random_seed=0,
    ...                                        init_weights=False))
    >>> saved = state.extract(net, "default")
    >>> saved.layers["proj"].kernel_shape, saved.layers["proj"].values.shape
    ((8, 8), (16,))
    >>> fresh = Net()
    >>> state.inject(fresh, "default", saved)
    >>> bool(jnp.array_equal(fresh.proj.get_delta_weight("default"),
    ...                      net.proj.get_delta_weight("default")))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax.config import ShiraConfig
from shira_jax.errors import AdapterLoadError
from shira_jax.kernels import kernel_view
from shira_jax.layer import is_stacked, unwrap
from shira_jax.model import (
    adapter_configs,
    adapter_names,
    apply_shira,
    named_modules,
    shira_layers,
)
from shira_jax.modules_to_save import ModulesToSave, select_modules_to_save
from shira_jax.stacked import restack_adapter, stacked_path, unstacked_path
from shira_jax.util import check_adapter_name, get_submodule

__all__ = [
    "AdapterState",
    "LayerState",
    "check_entries",
    "extract",
    "inject",
    "module_variables",
]


@dataclasses.dataclass(frozen=True)
class LayerState:
    """One adapted layer: indices `[*stack, 2, nnz]` (kernel layout), values `[*stack, nnz]`,
    the kernel shape `[*stack, in, out]` and the budget rank `r`.

    `parts` > 1 marks a fused kernel that holds that many HF linears side by side in its
    output columns (Gemma's `kv_einsum`: 2); each part has its own budget
    `r * (in + out / parts)`, so the layer's is `r * (parts * in + out)`."""

    indices: Any
    values: Any
    kernel_shape: tuple[int, ...]
    r: int
    parts: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_shape", tuple(int(n) for n in self.kernel_shape))
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 1:
            raise ValueError(f"LayerState.parts must be a positive integer, got {self.parts!r}.")

    @property
    def budget(self) -> int:
        """The most entries the layer may hold: `r * (parts * in + out)`."""
        n_in, n_out = self.kernel_shape[-2:]
        return self.r * (self.parts * n_in + n_out)


@dataclasses.dataclass(frozen=True)
class AdapterState:
    """An adapter apart from any model: config, layers and `modules_to_save` arrays."""

    config: ShiraConfig
    layers: Mapping[str, LayerState]
    modules_to_save: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def ranks(self) -> set[int]:
        return {layer.r for layer in self.layers.values()}

    def unstacked(self, stack_name: str = "layers") -> AdapterState:
        """Scan-stacked layers split into per-layer `stack_name.N` paths (PEFT naming)."""
        layers: dict[str, LayerState] = {}
        for path, layer in self.layers.items():
            if len(layer.kernel_shape) == 2:
                layers[path] = layer
                continue
            for i in range(layer.kernel_shape[0]):
                layers[unstacked_path(path, i, stack_name)] = LayerState(
                    np.asarray(layer.indices)[i],
                    np.asarray(layer.values)[i],
                    layer.kernel_shape[1:],
                    layer.r,
                )
        return dataclasses.replace(self, layers=layers)

    def restacked(self, model: nnx.Module, stack_name: str = "layers") -> AdapterState:
        """The inverse of `unstacked` for the scan-stacked layers of `model`."""
        stacked = {p for p, m in named_modules(model) if is_stacked(m)}
        arrays = {p: (layer.indices, layer.values) for p, layer in self.layers.items()}
        merged = restack_adapter(arrays, stacked, stack_name=stack_name)
        layers = {}
        for path, (idx, vals) in merged.items():
            if path in self.layers:
                layers[path] = self.layers[path]
                continue
            first = self.layers[unstacked_path(path, 0, stack_name)]
            layers[path] = LayerState(idx, vals, (idx.shape[0], *first.kernel_shape), first.r)
        return dataclasses.replace(self, layers=layers)


# ----------------------------------------------------------------------------- extract


def module_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    """`{dotted variable path: Variable}` of a module (the keys `modules_to_save` uses)."""
    return {".".join(str(k) for k in key): v for key, v in nnx.to_flat_state(nnx.state(module))}


def extract(model: nnx.Module, adapter_name: str) -> AdapterState:
    """The adapter `adapter_name` of `model` as an `AdapterState` (arrays as they are: jax
    arrays, possibly sharded). Raises KeyError if the model has no such adapter."""
    layers = {}
    for path, layer in shira_layers(model):
        if adapter_name in layer.adapter_names:
            layers[path] = LayerState(
                layer.shira_indices[adapter_name].get_value(),
                layer.shira_weight[adapter_name].get_value(),
                kernel_view(layer.base_layer).shape,
                layer.r[adapter_name],
                layer.parts.get(adapter_name, 1),
            )
    if not layers:
        raise KeyError(f"The model has no adapter {adapter_name!r}.")
    modules = {
        path: _values(module_variables(node.modules_to_save[adapter_name]))
        for path, node in named_modules(model)
        if isinstance(node, ModulesToSave) and adapter_name in node.modules_to_save
    }
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        config = ShiraConfig.stored_indices(max(s.r for s in layers.values()), tuple(layers))
    return AdapterState(config, layers, modules)


def _values(variables: Mapping[str, nnx.Variable]) -> dict[str, Any]:
    return {k: v.get_value() for k, v in variables.items()}


# ----------------------------------------------------------------------------- inject


def inject(
    model: nnx.Module,
    adapter_name: str,
    state: AdapterState,
    *,
    dtype: Any = None,
    source: str = "adapter",
    allow_nonfinite: bool = False,
) -> None:
    """Add `state` to `model` as adapter `adapter_name`, after checking all of it.

    Checked before the model changes: the name is free, every layer exists with the state's
    kernel shape, the indices are in range and unique, the number of entries fits the budget
    `r * (in + out)` of the config's rank (for masks made by a budget; `mask_type="custom"`
    adapters such as fused ones may hold more), the values and `modules_to_save` arrays are
    finite (unless `allow_nonfinite=True`) in the dtype they get, and the `modules_to_save`
    arrays name existing modules, variables and shapes. A bad state raises
    `shira_jax.AdapterLoadError` (a ValueError) naming `source` (the file); a name clash with
    the model a KeyError. `dtype` casts the values (default: as stored).
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise KeyError(
            f"The model already has an adapter {adapter_name!r}; pick another adapter_name or "
            "sj.delete_adapter(model, name) first."
        )
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}.")
    modules = dict(named_modules(model))
    _check_layers(modules, state, source)
    check_entries(state, source, dtype=dtype, allow_nonfinite=allow_nonfinite)
    module_values = _checked_module_arrays(modules, state, adapter_name, source)
    if not allow_nonfinite:
        for path, params in module_values.items():
            for var_path, array in params.items():
                _require_finite(array, f"{source}: modules_to_save {path}.{var_path}")
    values = {p: s.values for p, s in state.layers.items()}
    indices = {p: s.indices for p, s in state.layers.items()}
    apply_shira(model, state.config, adapter_name, indices=indices, values=values)
    for path, layer in shira_layers(model):
        parts = state.layers[path].parts if path in state.layers else 1
        if parts != 1:
            layer.parts = {**layer.parts, adapter_name: parts}
    if dtype is not None:
        for path, layer in shira_layers(model):
            if path in values:
                variable = layer.shira_weight[adapter_name]
                variable.set_value(variable.get_value().astype(dtype))
    for path, params in module_values.items():
        copy = module_variables(get_submodule(model, path).modules_to_save[adapter_name])
        for var_path, array in params.items():
            copy[var_path].set_value(jnp.asarray(array, copy[var_path].get_value().dtype))


def _xp(array: Any) -> Any:
    """numpy for host arrays, jax.numpy for (possibly sharded) jax arrays."""
    return np if isinstance(array, np.ndarray | np.generic) else jnp


def _require_finite(array: Any, where: str) -> None:
    xp = _xp(array)
    if jnp.issubdtype(array.dtype, jnp.inexact) and not bool(xp.isfinite(array).all()):
        bad = int((~xp.isfinite(array)).sum())
        raise AdapterLoadError(
            f"{where}: {bad} NaN/inf value(s) (in {array.dtype}). Refusing them; pass "
            "allow_nonfinite=True to load them anyway."
        )


def check_entries(
    state: AdapterState, source: str, *, dtype: Any = None, allow_nonfinite: bool = False
) -> None:
    """Per layer: index and value shapes agree, nnz within the budget, indices inside the
    kernel and unique, values finite in the dtype they will have; else `AdapterLoadError`
    naming `source` and the layer. Needs no model (`inject` adds the model's checks)."""
    budget = state.config.mask_type != "custom"
    for path, layer in state.layers.items():
        idx, vals, shape = layer.indices, layer.values, layer.kernel_shape
        stack, (n_in, n_out) = shape[:-2], shape[-2:]
        idx_shape, val_shape = tuple(np.shape(idx)), tuple(np.shape(vals))
        if idx_shape[:-1] != (*stack, 2) or val_shape != (*stack, idx_shape[-1]):
            raise AdapterLoadError(
                f"{source}: layer {path}: indices {idx_shape} / values {val_shape} do not fit "
                f"kernel {shape} (need [*stack, 2, nnz] and [*stack, nnz])."
            )
        nnz, r, parts = idx_shape[-1], layer.r, layer.parts
        if budget and (r != state.config.r or nnz > layer.budget):
            fused = f" of {parts} fused parts: r * ({parts} * in + out)" if parts > 1 else ""
            raise AdapterLoadError(
                f"{source}: layer {path}: {nnz} entries with r={r}, but the config's r is "
                f"{state.config.r}: a budget{fused or ' of r * (in + out)'} = "
                f"{state.config.r} * ({parts * n_in} + {n_out}) = "
                f"{state.config.r * (parts * n_in + n_out)} per layer. The file's r and its "
                "arrays disagree (edited, or made for another model?)."
            )
        _check_in_range(idx, (n_in, n_out), f"{source}: layer {path}")
        _check_unique(idx, f"{source}: layer {path}")
        cast = dtype or (jnp.float32 if np.dtype(vals.dtype).itemsize >= 4 else vals.dtype)
        if not allow_nonfinite:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the point
                cast_vals = _xp(vals).asarray(vals).astype(cast)
            _require_finite(cast_vals, f"{source}: layer {path} values")


def _check_in_range(indices: Any, matrix: tuple[int, int], where: str) -> None:
    """Refuse an index outside the `[in, out]` matrix (checked in the stored integer type, so
    a value past int32 is not wrapped into range first)."""
    xp = _xp(indices)
    idx = xp.asarray(indices)
    if idx.shape[-1] == 0:
        return
    for axis, (name, size) in enumerate(zip(("row (in)", "column (out)"), matrix)):
        low, high = int(idx[..., axis, :].min()), int(idx[..., axis, :].max())
        if low < 0 or high >= size:
            raise AdapterLoadError(
                f"{where}: {name} indices run from {low} to {high}, outside [0, {size}) of the "
                f"kernel's [in, out] = {list(matrix)}. The file is damaged or made for another "
                "model."
            )


def _check_unique(indices: Any, where: str) -> None:
    """Refuse repeated (in, out) positions in `[*stack, 2, nnz]` indices: a merge would add
    their values while the unmerged forward and get_delta_weight disagree on them."""
    xp = _xp(indices)
    idx = xp.asarray(indices).reshape(-1, 2, np.shape(indices)[-1])
    if idx.shape[-1] < 2:
        return
    order = xp.lexsort((idx[:, 1], idx[:, 0]), axis=-1)
    rows = xp.take_along_axis(idx[:, 0], order, axis=-1)
    cols = xp.take_along_axis(idx[:, 1], order, axis=-1)
    same = (xp.diff(rows, axis=-1) == 0) & (xp.diff(cols, axis=-1) == 0)
    if bool(same.any()):
        raise AdapterLoadError(
            f"{where}: {int(same.sum())} repeated index position(s); each (in, out) entry may "
            "appear once. (PEFT files with duplicates are summed by bridge.peft's reader.)"
        )


def _check_layers(modules: Mapping[str, nnx.Module], state: AdapterState, source: str) -> None:
    if not state.layers:
        raise AdapterLoadError(f"{source}: the adapter has no layers.")
    for path, layer in state.layers.items():
        if path not in modules:
            hit = stacked_path(path)
            close = [p for p in modules if p.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]][:5]
            hint = " (a per-layer path of a scan-stacked layer: restack first)" if hit else ""
            raise AdapterLoadError(
                f"{source}: layer {path!r} does not exist in this model{hint} (similar: "
                f"{close or 'none'}). Was the adapter made for another architecture?"
            )
        view = kernel_view(unwrap(modules[path]))
        if view is None or view.unsupported:
            why = f": {view.unsupported}" if view is not None else ""
            raise AdapterLoadError(
                f"{source}: layer {path!r} is a {type(modules[path]).__name__}, which SHiRA "
                f"cannot adapt{why}."
            )
        if view.shape != layer.kernel_shape:
            raise AdapterLoadError(
                f"{source}: layer {path!r} was made for a kernel {list(layer.kernel_shape)}; "
                f"this model's is {list(view.shape)}. Was the adapter made for another model size?"
            )


def _checked_module_arrays(
    modules: Mapping[str, nnx.Module], state: AdapterState, adapter_name: str, source: str
) -> dict[str, dict[str, np.ndarray]]:
    """module path -> {variable path: array}, checked against the model's modules."""
    saved = state.modules_to_save
    patterns = state.config.modules_to_save
    if not patterns:
        if saved:
            raise AdapterLoadError(
                f"{source}: holds modules_to_save arrays for {sorted(saved)[:3]} but the config "
                "lists no modules_to_save."
            )
        return {}
    try:
        chosen = select_modules_to_save(dict(modules), patterns, list(state.layers))
    except ValueError as err:
        raise AdapterLoadError(f"{source}: {err} Was the adapter made for another model?") from err
    if sorted(chosen) != sorted(saved):
        raise AdapterLoadError(
            f"{source}: modules_to_save {list(patterns)} select {sorted(chosen)} in this model, "
            f"but the adapter holds arrays for {sorted(saved)}."
        )
    out = {}
    for path in chosen:
        module = modules[path]
        if isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                raise KeyError(
                    f"modules_to_save {path} already has a copy for adapter {adapter_name!r}."
                )
            module = module.original_module
        wanted = module_variables(module)
        if sorted(wanted) != sorted(saved[path]):
            raise AdapterLoadError(
                f"{source}: modules_to_save {path} has variables {sorted(wanted)}; the adapter "
                f"holds {sorted(saved[path])}."
            )
        params = {}
        for var_path, variable in wanted.items():
            got = np.asarray(saved[path][var_path])
            if got.shape != tuple(variable.shape):
                raise AdapterLoadError(
                    f"{source}: {path}.{var_path}: saved shape {got.shape}, model "
                    f"{tuple(variable.shape)}."
                )
            target = np.dtype(variable.get_value().dtype)
            if np.iscomplexobj(got) and not np.issubdtype(target, np.complexfloating):
                raise AdapterLoadError(
                    f"{source}: {path}.{var_path}: saved dtype {got.dtype} is complex; the "
                    f"model's is {target} (the imaginary part would be dropped)."
                )
            try:  # the dtype the model's copy gets (1e300 as float32 is inf: checked after)
                with np.errstate(over="ignore", invalid="ignore"):
                    params[var_path] = got.astype(variable.get_value().dtype)
            except (TypeError, ValueError) as err:
                raise AdapterLoadError(
                    f"{source}: {path}.{var_path}: saved dtype {got.dtype} does not convert to "
                    f"{variable.get_value().dtype} ({err})."
                ) from err
        out[path] = params
    return out

