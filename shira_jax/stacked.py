"""Scan-stacked SHiRA layers: adapters for `nnx.vmap`-created, `nnx.scan`-applied layer stacks.

MaxText-style models create their blocks once under `nnx.vmap`, so every kernel carries a
leading layer axis (`[L, in, out]`), and run them with `nnx.scan`. Here such an `nnx.Linear`
becomes a *stacked* `ShiraDense`: the same module, built under `nnx.vmap`, so its values are
`[L, nnz]` and its indices `[L, 2, nnz]` (one mask per layer). Inside `nnx.scan` each step sees
an ordinary 2-D `ShiraDense`; training, adapter switching and `set_scale` need nothing more.
Per-layer operations (merge, unmerge, the dense delta) run the layer's own method under
`nnx.vmap`. PEFT files name layers one by one (`layers.N.`): `unstack_adapter` and
`restack_adapter` convert.

`apply_shira_stacked` accepts any model: 2-D targets are handed to `shira_jax.apply_shira`.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> from shira_jax import stacked
    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(8, 8, rngs=rngs)
    ...     def __call__(self, x):
    ...         return x + self.q_proj(x)
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         make = nnx.split_rngs(splits=3)(nnx.vmap(lambda r: Block(r), in_axes=0, out_axes=0))
    ...         self.layers = make(rngs)
    ...     def __call__(self, x):
    ...         scan = nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    ...         return scan(lambda x, block: block(x))(x, self.layers)
    >>> net = Net(nnx.Rngs(0))
    >>> _ = stacked.apply_shira_stacked(net, sj.ShiraConfig(r=1, target_modules=["q_proj"]))
    >>> net.layers.q_proj.shira_weight["default"].shape, net(jnp.ones((2, 8))).shape
    ((3, 16), (2, 8))
    >>> sorted(stacked.unstack_adapter(net, "default"))[:2]
    ['layers.0.q_proj', 'layers.1.q_proj']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import masks, sharding
from shira_jax.config import ShiraConfig, resolve_targets
from shira_jax.layer import ShiraDense, _tuple
from shira_jax.model import (
    active_adapters,
    adapter_configs,
    apply_shira,
    calibration_gradients,
    check_adapter_name,
    named_modules,
    set_submodule,
    shira_layers,
)
from shira_jax.modules_to_save import select_modules_to_save, wrap_modules_to_save

__all__ = [
    "apply_shira_stacked",
    "delta_weight",
    "is_stacked",
    "merge",
    "num_layers",
    "restack_adapter",
    "stacked_path",
    "unmerge",
    "unstack_adapter",
    "unstacked_path",
]

Arrays = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- basics


def _linear(module: Any) -> Any:
    return module.base_layer if isinstance(module, ShiraDense) else module


def is_stacked(layer: Any) -> bool:
    """True for a `ShiraDense` / `nnx.Linear` whose kernel has a leading layer axis."""
    kernel = getattr(_linear(layer), "kernel", None)
    return kernel is not None and kernel.ndim == 3


def num_layers(layer: Any) -> int:
    """Size of the leading layer axis of a stacked layer."""
    return int(_linear(layer).kernel.shape[0])


def _stack_axis_name(layer: Any) -> Any:
    """The name the layer axis carries in the kernel's `out_sharding` (None if unannotated)."""
    kernel = _linear(layer).kernel
    spec = kernel.get_metadata().get("out_sharding")
    return spec[0] if spec and len(spec) == kernel.ndim else None


def _vmap(
    fn: Callable[..., Any], layer: Any, *, in_axes: Any = 0, out_axes: Any = 0
) -> Callable[..., Any]:
    """`nnx.vmap` over the layer axis of `layer`, keeping its sharding name in the metadata."""
    return nnx.vmap(
        fn,
        in_axes=in_axes,
        out_axes=out_axes,
        transform_metadata={nnx.PARTITION_NAME: _stack_axis_name(layer)},
    )


def _keep_kernel_sharding(layer: ShiraDense, before: Any) -> None:
    """Eager `nnx.vmap` outputs may land anywhere: put the kernel back on its sharding."""
    sharding_ = getattr(before, "sharding", None)
    after = layer.base_layer.kernel.get_value()
    if sharding_ is not None and getattr(after, "sharding", None) != sharding_:
        layer.base_layer.kernel.set_value(jax.device_put(after, sharding_))


def _place_adapters(layer: ShiraDense) -> None:
    kernel = layer.base_layer.kernel.get_value()
    for group in (layer.shira_weight, layer.shira_indices):
        for name in list(group.keys()):
            var = group[name]
            var.set_value(sharding.place_like_kernel(var.get_value(), kernel))


# ----------------------------------------------------------------------------- paths


def unstacked_path(path: str, layer: int, stack_name: str = "layers") -> str:
    """`"model.layers.self_attn.q_proj"`, 3 -> `"model.layers.3.self_attn.q_proj"`."""
    parts = path.split(".")
    if stack_name not in parts:
        raise ValueError(
            f"Stacked layer {path} has no {stack_name!r} component to put a layer number after; "
            "pass stack_name= (the attribute holding the nnx.vmap-created blocks)."
        )
    at = parts.index(stack_name) + 1
    return ".".join([*parts[:at], str(layer), *parts[at:]])


def stacked_path(path: str, stack_name: str = "layers") -> tuple[str, int] | None:
    """`"model.layers.3.self_attn.q_proj"` -> `("model.layers.self_attn.q_proj", 3)`, else None."""
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == stack_name and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1] + parts[i + 2 :]), int(parts[i + 1])
    return None


def unstack_adapter(
    model: nnx.Module, adapter_name: str = "default", *, stack_name: str = "layers"
) -> dict[str, Arrays]:
    """`{per-layer path: (indices [2, nnz] int32, values [nnz])}` of one adapter, as numpy.

    Stacked layers are split into `stack_name.N` paths (PEFT / HF naming); other layers keep
    their path. Indices are in kernel layout, as everywhere in shira_jax.
    """
    out: dict[str, Arrays] = {}
    for path, layer in shira_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        idx = np.asarray(layer.shira_indices[adapter_name][...], np.int32)
        vals = np.asarray(layer.shira_weight[adapter_name][...])
        if is_stacked(layer):
            for i in range(idx.shape[0]):
                out[unstacked_path(path, i, stack_name)] = (idx[i], vals[i])
        else:
            out[path] = (idx, vals)
    if not out:
        raise KeyError(f"The model has no adapter {adapter_name!r}.")
    return out


def restack_adapter(
    arrays: Mapping[str, Arrays],
    model: nnx.Module | Iterable[str],
    *,
    stack_name: str = "layers",
) -> dict[str, Arrays]:
    """Inverse of `unstack_adapter`: group `stack_name.N` paths of the stacked layers of `model`.

    `model` is the target model (or the set of its stacked layer paths): only paths whose
    stacked form names a stacked layer there are grouped, so list-based models (`layers.0`, a
    real submodule) pass through unchanged. Every layer 0..L-1 must be present, with the same
    number of entries.
    """
    stacked_paths = (
        {p for p, m in named_modules(model) if is_stacked(m)}
        if isinstance(model, nnx.Module)
        else set(model)
    )
    groups: dict[str, dict[int, Arrays]] = {}
    out: dict[str, Arrays] = {}
    for path, (idx, vals) in arrays.items():
        hit = stacked_path(path, stack_name)
        if hit is not None and hit[0] in stacked_paths:
            groups.setdefault(hit[0], {})[hit[1]] = (np.asarray(idx), np.asarray(vals))
        else:
            out[path] = (np.asarray(idx), np.asarray(vals))
    for path, layers in groups.items():
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        if missing:
            raise ValueError(f"Stacked layer {path}: no arrays for layers {missing}.")
        sizes = {layers[i][0].shape[-1] for i in layers}
        if len(sizes) != 1:
            raise ValueError(
                f"Stacked layer {path}: layers have different numbers of entries {sorted(sizes)}; "
                "a stacked adapter needs the same nnz in every layer."
            )
        order = range(len(layers))
        out[path] = (
            np.stack([layers[i][0] for i in order]),
            np.stack([layers[i][1] for i in order]),
        )
    return out


# ----------------------------------------------------------------------------- apply


def apply_shira_stacked(
    model: nnx.Module,
    config: ShiraConfig,
    adapter_name: str = "default",
    *,
    indices: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    loss_fn: Callable[[nnx.Module, Any], jax.Array] | None = None,
    calibration_data: Iterable[Any] | None = None,
    model_type: str | None = None,
    stack_name: str = "layers",
) -> nnx.Module:
    """`shira_jax.apply_shira` for models with scan-stacked layers (and plain ones).

    A stacked target (`nnx.Linear` with kernel `[L, in, out]`) gets values `[L, nnz]` and
    indices `[L, 2, nnz]`: every mask type is computed per layer (PEFT's "random" mask is the
    same in every layer of one shape, as in PEFT). `indices` / `values` may be keyed by stacked
    paths (`[L, 2, nnz]` / `[L, nnz]`) or per layer (`layers.N.` paths, as `unstack_adapter`
    gives and PEFT files hold). 2-D targets go to `apply_shira` unchanged. Everything is checked
    before the model changes.
    """
    check_adapter_name(adapter_name)
    modules = dict(named_modules(model))
    if indices is not None:
        given = restack_adapter(
            {p: (indices[p], None if values is None else values[p]) for p in indices},
            {p for p, m in modules.items() if is_stacked(m)},
            stack_name=stack_name,
        )
        targets = list(given)
        unknown = [t for t in targets if t not in modules]
        if unknown:
            raise ValueError(f"No module at {unknown}; modules here: {list(modules)[:20]} ...")
    else:
        model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
        linear_paths = [p for p, m in modules.items() if isinstance(m, (nnx.Linear, ShiraDense))]
        targets = resolve_targets(config, linear_paths, model_type=model_type)
        given = {}
    stacked_targets = [t for t in targets if is_stacked(modules[t])]
    flat_targets = [t for t in targets if t not in stacked_targets]
    # apply_shira wraps modules_to_save along with the flat targets; with none, do it here.
    save_paths = (
        select_modules_to_save(modules, config.modules_to_save, targets)
        if config.modules_to_save and not flat_targets
        else []
    )
    for t in stacked_targets:
        node = modules[t]
        if isinstance(node, ShiraDense) and adapter_name in node.adapter_names:
            raise ValueError(f"Adapter {adapter_name!r} already exists on {t}.")

    key = jax.random.key(config.random_seed or 0) if key is None else key
    plans: dict[str, tuple[np.ndarray, jax.Array]] = {}
    grads = {}
    if config.needs_calibration and indices is None and stacked_targets:
        if loss_fn is None or calibration_data is None:
            raise ValueError(
                f'mask_type="{config.mask_type}" needs calibration: pass loss_fn= and '
                "calibration_data=."
            )
        grads = calibration_gradients(
            model, stacked_targets, loss_fn, calibration_data, reduction=config.grad_reduction
        )
    for n, path in enumerate(stacked_targets):
        linear = _linear(modules[path])
        n_layers, n_in, n_out = (int(s) for s in linear.kernel.shape)
        if indices is not None:
            idx = np.asarray(given[path][0])
            if idx.ndim != 3 or idx.shape[:2] != (n_layers, 2):
                raise ValueError(
                    f"Stacked layer {path}: indices of shape {idx.shape}; expected "
                    f"[{n_layers}, 2, nnz] (or one [2, nnz] per {stack_name}.N path)."
                )
            idx = np.stack(
                [
                    masks.validate_indices(idx[i], n_in, n_out, layer_name=f"{path}[{i}]")
                    for i in range(n_layers)
                ]
            )
        else:
            idx = _stacked_masks(modules[path], path, config, grads.get(path))
        nnz = idx.shape[-1]
        vals = None
        if indices is not None and values is not None:
            vals = given[path][1]
            if vals is None or tuple(np.shape(vals)) != (n_layers, nnz):
                raise ValueError(
                    f"Stacked layer {path}: values of shape {np.shape(vals)}; expected "
                    f"[{n_layers}, {nnz}]."
                )
            vals = jnp.asarray(vals)
        elif not config.init_weights:
            vals = jax.random.normal(jax.random.fold_in(key, 1000 + n), (n_layers, nnz))
        else:
            vals = jnp.zeros((n_layers, nnz), jnp.float32)
        plans[path] = (idx, vals)

    # ---- checked; from here on, commit (flat targets first: apply_shira validates them).
    previous = active_adapters(model)
    if flat_targets:
        flat_config = config.replace(target_modules=flat_targets) if indices is None else config
        apply_shira(
            model,
            flat_config,
            adapter_name,
            indices=None if indices is None else {t: given[t][0] for t in flat_targets},
            values=None if values is None else {t: given[t][1] for t in flat_targets},
            key=key,
            loss_fn=loss_fn,
            calibration_data=calibration_data,
            model_type=model_type,
        )
    active = previous if previous else (adapter_name,)
    for path in stacked_targets:
        idx, vals = plans[path]
        _add_stacked(model, path, modules[path], adapter_name, config.r, idx, vals, active)
    wrap_modules_to_save(model, save_paths, adapter_name, active)
    model.shira_configs = {**adapter_configs(model), adapter_name: config}
    return model


def _layer_view(linear: nnx.Module, i: int) -> nnx.Module:
    graphdef, state = nnx.split(linear)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _stacked_masks(
    node: Any, path: str, config: ShiraConfig, grad: np.ndarray | None
) -> np.ndarray:
    linear = _linear(node)
    n_layers, n_in, n_out = (int(s) for s in linear.kernel.shape)
    masks.shira_budget(n_in, n_out, config.r, layer_name=path)
    exclude_names = tuple(config.exclude_adapters or ())
    if exclude_names:
        if not isinstance(node, ShiraDense) or any(
            n not in node.adapter_names for n in exclude_names
        ):
            raise ValueError(f"exclude_adapters={list(exclude_names)}: not all on {path}.")
    kind = config.mask_type
    if config.mask_fn is None and kind in ("random", "struct"):
        if exclude_names and kind == "random":
            raise ValueError(f'exclude_adapters needs a score-based mask, not "random" ({path}).')
        one = (
            masks.random_mask(n_in, n_out, config.r, seed=config.random_seed)
            if kind == "random"
            else masks.struct_mask(n_in, n_out, config.r, stride=config.struct_stride)
        )
        return np.broadcast_to(one, (n_layers, *one.shape)).copy()
    kernel = np.asarray(linear.kernel.get_value())
    out = []
    for i in range(n_layers):
        name = f"{path}[{i}]"
        exclude = [np.asarray(node.shira_indices[n][...])[i] for n in exclude_names]
        if config.mask_fn is not None:
            from shira_jax.model import _custom_mask

            idx = _custom_mask(config.mask_fn, _layer_view(linear, i), config.r, name, n_in, n_out)
        elif kind == "weight_magnitude":
            idx = masks.weight_magnitude_mask(kernel[i], config.r, exclude=exclude)
        elif kind == "gradient":
            idx = masks.gradient_mask(np.asarray(grad)[i], config.r, exclude=exclude)
        else:  # snip
            idx = masks.snip_mask(kernel[i], np.asarray(grad)[i], config.r, exclude=exclude)
        out.append(idx)
    return np.stack(out)


def _add_stacked(
    model: nnx.Module,
    path: str,
    node: Any,
    adapter_name: str,
    r: int,
    idx: np.ndarray,
    vals: jax.Array,
    active: Sequence[str],
) -> None:
    is_active = adapter_name in active
    idx_j = jnp.asarray(idx, jnp.int32)
    if isinstance(node, ShiraDense):
        kernel_before = node.base_layer.kernel.get_value()

        def add(layer: ShiraDense, i: jax.Array, v: jax.Array) -> None:
            layer.add_adapter(adapter_name, i, r=r, values=v, active=is_active)

        _vmap(add, node, in_axes=(0, 0, 0), out_axes=None)(node, idx_j, vals)
        _keep_kernel_sharding(node, kernel_before)
        _place_adapters(node)
        return
    kernel_before = node.kernel.get_value()
    graphdef, state = nnx.split(node)

    def build(state: nnx.State, i: jax.Array, v: jax.Array) -> ShiraDense:
        layer = ShiraDense(nnx.merge(graphdef, state), name=path)
        layer.add_adapter(adapter_name, i, r=r, values=v, active=is_active)
        layer.set_adapter(tuple(active))
        return layer

    layer = _vmap(build, node, in_axes=(0, 0, 0), out_axes=0)(state, idx_j, vals)
    _keep_kernel_sharding(layer, kernel_before)
    _place_adapters(layer)
    set_submodule(model, path, layer)


# ----------------------------------------------------------------------------- per-layer math


def delta_weight(layer: ShiraDense, adapter: str) -> jax.Array:
    """Dense delta `[L, in, out]` of a stacked layer (`[in, out]` for a plain one)."""
    if not is_stacked(layer):
        return layer.get_delta_weight(adapter)
    return _vmap(lambda m: m.get_delta_weight(adapter), layer)(layer)


def merge(
    model: nnx.Module,
    adapter_names: Sequence[str] | None = None,
    safe_merge: bool = False,
    *,
    layers: Sequence[tuple[str, ShiraDense]] | None = None,
) -> None:
    """`shira_jax.merge` that also merges stacked layers, each of their layers on its own.

    Every layer is planned first; with `safe_merge` a non-finite result anywhere refuses the
    whole merge and leaves the model unchanged. Unmerge restores the kernels bit for bit.
    """
    names = None if adapter_names is None else _tuple(adapter_names)
    plans = []
    for path, layer in shira_layers(model) if layers is None else layers:
        if is_stacked(layer):
            kernel, backups = _vmap(lambda m: m.plan_merge(names)[:2], layer)(layer)
            chosen = layer.active_adapters if names is None else names
            todo = tuple(
                a for a in chosen if a in layer.adapter_names and a not in layer.merged_adapters
            )
        else:
            kernel, backups, todo = layer.plan_merge(names)
        plans.append((path, layer, kernel, backups, todo))
    if safe_merge:
        for path, _, kernel, _, todo in plans:
            if todo and not bool(jnp.isfinite(kernel).all()):
                raise ValueError(
                    f"Merging {list(todo)} into {path} gives non-finite weights; the adapter "
                    "seems broken. Nothing was merged."
                )
    for _, layer, kernel, backups, todo in plans:
        if todo:
            before = layer.base_layer.kernel.get_value()
            layer.commit_merge(kernel, {a: backups[a] for a in todo}, todo)
            _keep_kernel_sharding(layer, before)


def unmerge(model: nnx.Module) -> None:
    """`shira_jax.unmerge` for models with stacked layers: original kernels, bit for bit."""
    for _, layer in shira_layers(model):
        if not layer.merged:
            continue
        if is_stacked(layer):
            before = layer.base_layer.kernel.get_value()
            _vmap(lambda m: m.unmerge(), layer, out_axes=None)(layer)
            _keep_kernel_sharding(layer, before)
        else:
            layer.unmerge()
