"""Whole-model SHiRA: wrap target layers, manage adapters, merge and unmerge.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.up = nnx.Linear(16, 32, rngs=rngs)
    ...         self.down = nnx.Linear(32, 16, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.down(nnx.relu(self.up(x)))
    >>> model = MLP(nnx.Rngs(0))
    >>> _ = sj.apply_shira(model, sj.ShiraConfig(r=2, target_modules=["up"], random_seed=0))
    >>> [path for path, _ in sj.shira_layers(model)]
    ['up']
    >>> model.up.shira_weight["default"].shape
    (96,)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import masks
from shira_jax.config import ShiraConfig, resolve_targets
from shira_jax.kernels import KernelView, kernel_view, sparse_refusal
from shira_jax.layer import (
    ShiraDense,
    attach_adapter,
    merge_layers,
    mixed_batch,
    remerge_layers,
    switch_layers,
    unmerge_layers,
    unwrap,
)
from shira_jax.modules_to_save import (
    ModulesToSave,
    check_one_copy,
    select_modules_to_save,
    wrap_modules_to_save,
)
from shira_jax.util import as_tuple, check_adapter_name, dotted, get_submodule, set_submodule

__all__ = [
    "active_adapters",
    "adapter_configs",
    "adapter_names",
    "apply_shira",
    "calibration_gradients",
    "check_adapter_name",
    "delete_adapter",
    "disable_adapter",
    "get_submodule",
    "merge",
    "merge_and_unload",
    "named_modules",
    "require_adapters",
    "set_adapter",
    "set_scale",
    "set_submodule",
    "shira_layers",
    "switch_adapter",
    "unmerge",
]


# ----------------------------------------------------------------------------- traversal


def named_modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted path, module) pairs, without the insides of SHiRA wrappers."""
    modules = [
        (dotted(path), node)
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Module)
    ]
    wrappers = [name for name, node in modules if isinstance(node, (ShiraDense, ModulesToSave))]
    for name, node in modules:
        if not any(name.startswith(w + ".") for w in wrappers):
            yield name, node


def shira_layers(model: nnx.Module) -> list[tuple[str, ShiraDense]]:
    """All SHiRA-wrapped layers of `model` as (dotted path, ShiraDense) pairs."""
    return [(p, m) for p, m in named_modules(model) if isinstance(m, ShiraDense)]


def adapter_configs(model: nnx.Module) -> dict[str, ShiraConfig]:
    """The `ShiraConfig` of each adapter added to `model`, by name."""
    return dict(getattr(model, "shira_configs", None) or {})


def active_adapters(model: nnx.Module) -> tuple[str, ...]:
    """The names of the active adapters (those of the first SHiRA layer)."""
    layers = shira_layers(model)
    return layers[0][1].active_adapters if layers else ()


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """Every adapter of `model`, in the order they were added."""
    names: dict[str, None] = dict.fromkeys(adapter_configs(model))
    for _, layer in shira_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return tuple(names)


def require_adapters(model: nnx.Module, names: Sequence[str]) -> None:
    """Raise a KeyError naming the adapters of `names` that `model` does not have."""
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"No adapter named {missing} in this model; it has {list(known)}.")


# ----------------------------------------------------------------------------- apply


def apply_shira(
    model: nnx.Module,
    config: ShiraConfig,
    adapter_name: str = "default",
    *,
    loss_fn: Callable[[nnx.Module, Any], jax.Array] | None = None,
    calibration_data: Iterable[Any] | None = None,
    indices: Mapping[str, np.ndarray | jax.Array] | None = None,
    values: Mapping[str, np.ndarray | jax.Array] | None = None,
    key: jax.Array | None = None,
    model_type: str | None = None,
) -> nnx.Module:
    """Add a SHiRA adapter to every layer that `config.target_modules` selects, in place.

    Every layer is seen through its kernel view (`shira_jax.kernels`): a plain kernel
    `[in, out]` gets values `[nnz]` and indices `[2, nnz]`; a scan-stacked one `[L, in, out]`
    (built under `nnx.vmap`) gets `[L, nnz]` and `[L, 2, nnz]`, one mask per layer. The first
    adapter of a model becomes active; later ones stay inactive (and untrained) until
    `set_adapter`, as in PEFT. Everything is validated and every mask computed before the
    model is touched, so a failure leaves the model as it was.

    Args:
        model: any NNX module tree with `nnx.Linear` layers.
        config: the adapter's `ShiraConfig`.
        adapter_name: name of the new adapter.
        loss_fn: `loss_fn(model, batch) -> scalar`, for the "gradient" and "snip" masks.
        calibration_data: batches for `loss_fn`; gradients w.r.t. the targeted kernels are
            accumulated over them (`config.grad_reduction`).
        indices: dotted path -> `[*stack, 2, nnz]` kernel-layout indices to use instead of
            making masks (loaders use this; the paths are the targets).
        values: dotted path -> `[*stack, nnz]` starting values (with `indices`).
        key: PRNG key for `init_weights=False` draws (default: from `config.random_seed`).
        model_type: picks default targets when `target_modules` is None (else read from
            `model.config.model_type` when present).

    Returns:
        The same model, wrapped.
    """
    check_adapter_name(adapter_name)
    if not isinstance(config, ShiraConfig):
        raise TypeError(f"config must be a ShiraConfig, got {type(config).__name__}.")
    modules = dict(named_modules(model))
    targets = _targets(model, modules, config, indices, model_type)
    views = {t: _checked_target(t, modules[t], adapter_name) for t in targets}
    quantized = [t for t, v in views.items() if v.quantized]
    if quantized and config.mask_fn is None and config.mask_type not in ("random", "struct"):
        raise ValueError(
            f"{quantized[:3]} have quantized kernels; mask_type={config.mask_type!r} reads the "
            "float kernel or its gradient. Use 'random' or 'struct' there (or make the mask on "
            "the float model and pass indices=)."
        )
    if config.delta_mode == "sparse":
        refused = {t: why for t, v in views.items() if (why := sparse_refusal(v))}
        if refused:
            first = next(iter(refused))
            raise ValueError(
                f"delta_mode='sparse' cannot run on {list(refused)[:3]} ({first}: "
                f"{refused[first]}). Use delta_mode='auto' (patched there) or narrow "
                "target_modules."
            )
    save_paths = (
        select_modules_to_save(modules, config.modules_to_save, targets)
        if config.modules_to_save
        else []
    )
    if indices is not None:
        new_indices = {t: _given_indices(t, views[t], indices[t]) for t in targets}
    else:
        new_indices = _make_masks(model, modules, views, config, loss_fn, calibration_data)
    new_values = _start_values(config, views, new_indices, values, key)

    # ---- nothing above changed the model; from here on, commit.
    had_active = active_adapters(model)
    active = had_active or (adapter_name,)
    for path in targets:
        node = modules[path]
        layer = attach_adapter(
            node, adapter_name, new_indices[path], new_values[path],
            r=config.r, active=active, path=path, delta_mode=config.delta_mode,
        )
        if layer is not node:
            set_submodule(model, path, layer)
    wrap_modules_to_save(model, save_paths, adapter_name, active)
    if not had_active:  # e.g. every adapter was deleted: active model-wide, as on a new model
        for _, layer in shira_layers(model):
            if layer.active_adapters != active:
                layer.set_adapter(active)
    model.shira_configs = {**adapter_configs(model), adapter_name: config}
    return model


def _targets(
    model: nnx.Module,
    modules: Mapping[str, nnx.Module],
    config: ShiraConfig,
    indices: Mapping[str, Any] | None,
    model_type: str | None,
) -> list[str]:
    if indices is not None:
        unknown = [t for t in indices if t not in modules]
        if unknown:
            raise ValueError(f"No module at {unknown}; modules here: {list(modules)[:20]} ...")
        return list(indices)
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
    candidates, others = [], {}
    for path, module in modules.items():
        if kernel_view(unwrap(module)) is not None:
            candidates.append(path)
        else:
            others[path] = type(module).__name__
    return resolve_targets(config, candidates, model_type=model_type, unsupported=others)


def _checked_target(path: str, module: nnx.Module, adapter_name: str) -> KernelView:
    base = unwrap(module)
    view = kernel_view(base)
    if view is None or view.unsupported:
        why = view.unsupported if view is not None else "it has no weight SHiRA knows"
        kernel = getattr(base, "kernel", None)
        if view is None and isinstance(base, nnx.Linear) and kernel is not None:
            why = f"its kernel is {kernel.ndim}-D; nnx.Linear needs [in, out] or [L, in, out]"
        raise TypeError(
            f"Target module {path} is a {type(base).__name__} that SHiRA cannot adapt: {why}. "
            "SHiRA adapts nnx.Linear, nnx.LinearGeneral, nnx.Einsum, einsum modules with a "
            "`w`/`kernel` weight, and kinds taught by sj.register_kernel; narrow target_modules."
        )
    if isinstance(module, ShiraDense) and adapter_name in module.adapter_names:
        raise ValueError(
            f"Adapter {adapter_name!r} already exists on {path}; pick another name or "
            "delete_adapter first."
        )
    return view


def _given_indices(path: str, view: KernelView, given: Any) -> np.ndarray:
    """Validated `[*stack, 2, nnz]` indices for `view` (one `[2, nnz]` check per slice)."""
    idx = np.asarray(given)
    if not view.stacked:
        return _unique(masks.validate_indices(idx, view.n_in, view.n_out, layer_name=path), path)
    if idx.ndim != len(view.stack_shape) + 2 or idx.shape[:-2] != view.stack_shape:
        raise ValueError(
            f"Stacked layer {path}: indices of shape {idx.shape}; expected "
            f"[{', '.join(map(str, view.stack_shape))}, 2, nnz] (or one [2, nnz] per "
            "layers.N path)."
        )
    flat = idx.reshape(view.num_slices, *idx.shape[-2:])
    out = [
        _unique(masks.validate_indices(flat[i], view.n_in, view.n_out, layer_name=f"{path}[{i}]"),
                f"{path}[{i}]")
        for i in range(view.num_slices)
    ]
    return np.stack(out).reshape(idx.shape)


def _unique(idx: np.ndarray, path: str) -> np.ndarray:
    """`idx` if no (in, out) position repeats: the forward writes each entry once, so a
    repeated one would disagree with `get_delta_weight`'s sum."""
    flat = idx[0].astype(np.int64) * (int(idx[1].max(initial=0)) + 1) + idx[1]
    repeats = flat.size - np.unique(flat).size
    if repeats:
        raise ValueError(
            f"Layer {path}: indices repeat {repeats} (in, out) position(s); each entry may "
            "appear once. sj.masks.canonicalize(indices, values, shape) sums repeated ones."
        )
    return idx


def _make_masks(
    model: nnx.Module,
    modules: Mapping[str, nnx.Module],
    views: Mapping[str, KernelView],
    config: ShiraConfig,
    loss_fn: Callable[[nnx.Module, Any], jax.Array] | None,
    calibration_data: Iterable[Any] | None,
) -> dict[str, np.ndarray]:
    for path, view in views.items():
        masks.shira_budget(view.n_in, view.n_out, config.r, layer_name=path)
    grads: dict[str, np.ndarray] = {}
    if config.needs_calibration:
        if loss_fn is None or calibration_data is None:
            raise ValueError(
                f'mask_type="{config.mask_type}" needs calibration: pass '
                "loss_fn=lambda model, batch: ... and calibration_data=[batch, ...]."
            )
        grads = calibration_gradients(
            model, list(views), loss_fn, calibration_data, reduction=config.grad_reduction
        )
    return {
        path: _view_masks(path, view, modules[path], config, grads.get(path))
        for path, view in views.items()
    }


def _view_masks(
    path: str, view: KernelView, node: nnx.Module, config: ShiraConfig, grad: Any
) -> np.ndarray:
    """`[*stack, 2, nnz]` masks for one kernel view: `masks.make_mask` per slice."""
    excluded = _excluded(node, config.exclude_adapters, path)
    needs_kernel = config.mask_fn is None and config.mask_type in ("weight_magnitude", "snip")
    kernel = np.asarray(view.array()) if needs_kernel else None
    n = view.num_slices
    if config.mask_fn is None and config.mask_type in ("random", "struct") and not excluded:
        one = masks.make_mask(config, view.n_in, view.n_out, layer_name=path)  # same per slice
        return np.broadcast_to(one, (*view.stack_shape, *one.shape)).copy()

    def part(a: Any, i: int) -> Any:
        return None if a is None else np.asarray(a).reshape(n, view.n_in, view.n_out)[i]

    out = []
    for i in range(n):
        name = f"{path}[{i}]" if view.stacked else path
        out.append(
            masks.make_mask(
                config, view.n_in, view.n_out, layer_name=name,
                kernel=part(kernel, i), grad=part(grad, i),
                exclude=[np.asarray(e).reshape(n, 2, -1)[i] for e in excluded],
                custom=lambda i=i: config.mask_fn(view.slice_module(i), config.r),
            )
        )
    return np.stack(out).reshape(*view.stack_shape, 2, -1)


def _excluded(node: nnx.Module, names: Sequence[str], path: str) -> list[np.ndarray]:
    if not names:
        return []
    if not isinstance(node, ShiraDense):
        raise ValueError(
            f"exclude_adapters={list(names)}: layer {path} has no adapters yet to exclude."
        )
    missing = [n for n in names if n not in node.adapter_names]
    if missing:
        raise ValueError(f"exclude_adapters: layer {path} has no adapter {missing}.")
    return [np.asarray(node.shira_indices[n][...]) for n in names]


def _start_values(
    config: ShiraConfig,
    views: Mapping[str, KernelView],
    indices: Mapping[str, np.ndarray],
    given: Mapping[str, Any] | None,
    key: jax.Array | None,
) -> dict[str, jax.Array]:
    """`[*stack, nnz]` starting values per target: given, zeros, or normals (tests)."""
    out = {}
    for i, (path, idx) in enumerate(indices.items()):
        shape = (*views[path].stack_shape, idx.shape[-1])
        if given is not None:
            got = np.shape(given[path]) if path in given else None
            if got != shape:
                raise ValueError(
                    f"Layer {path}: {idx.shape[-1]} indices but values of shape {got}; "
                    f"values must be {list(shape)}."
                )
            out[path] = jnp.asarray(given[path])
        elif config.init_weights:
            out[path] = jnp.zeros(shape, jnp.float32)
        else:
            key = _seed_key(config.random_seed) if key is None else key
            out[path] = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return out


def _seed_key(seed: int | None) -> jax.Array:
    """A PRNG key from a config seed; torch accepts seeds up to 2**64 - 1, jax up to 2**63."""
    seed = 0 if seed is None else int(seed)
    return jax.random.key(seed - 2**64 if seed >= 2**63 else seed)


def calibration_gradients(
    model: nnx.Module,
    paths: Sequence[str],
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batches: Iterable[Any],
    *,
    reduction: str = "sum_abs",
) -> dict[str, np.ndarray]:
    """Accumulated gradients of `loss_fn` w.r.t. the kernels at `paths` over `batches`.

    `reduction="sum_abs"` sums |g| per batch (default); `"abs_sum"` takes |sum of g|.
    """
    modules = dict(named_modules(model))
    views = {p: kernel_view(unwrap(modules[p])) for p in paths if p in modules}
    wanted = {tuple(p.split(".")): v.attr for p, v in views.items() if v is not None}

    def is_target(path: tuple[Any, ...], _: Any) -> bool:
        names = tuple(str(k) for k in path)
        owner = names[:-2] if len(names) > 2 and names[-2] == "base_layer" else names[:-1]
        return wanted.get(owner) == names[-1]

    target_filter = nnx.All(nnx.Param, is_target)

    @nnx.jit
    def grad_step(model: nnx.Module, batch: Any) -> nnx.State:
        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, target_filter))(model, batch)

    total: dict[str, jax.Array] = {}
    count = 0
    for batch in batches:
        flat = nnx.to_flat_state(grad_step(model, batch))
        for key_path, variable in flat:
            names = [str(k) for k in key_path]
            owner = names[:-2] if names[-2] == "base_layer" else names[:-1]
            g = variable[...] if hasattr(variable, "__getitem__") else variable
            g = jnp.abs(g) if reduction == "sum_abs" else g
            name = ".".join(owner)
            total[name] = total[name] + g if name in total else g
        count += 1
    if count == 0:
        raise ValueError("calibration_data is empty: give at least one batch.")
    missing = [p for p in paths if p not in total]
    if missing:
        raise ValueError(f"loss_fn does not depend on the kernels of {missing}.")
    out = {}
    for p in paths:
        g = jnp.abs(total[p]) if reduction == "abs_sum" else total[p]
        layout = views[p].layout
        out[p] = np.asarray(g if layout is None else layout.to_matrix(g))  # [*stack, in, out]
    return out


# ----------------------------------------------------------------------------- management


def set_adapter(model: nnx.Module, adapter_names: str | Sequence[str]) -> None:
    """Activate one adapter or a list (their deltas sum); only active adapters train.

    On a merged model the merged adapters are replaced by `names` in place (one pass per
    group of same-shaped kernels, as `switch_adapter`): the model stays merged. (PEFT unmerges
    instead; call `unmerge` first for that.)
    """
    names = as_tuple(adapter_names)
    layers, wrappers = _wrappers_fast(model)
    _require_fast(model, layers, names)
    check_one_copy(wrappers, names)  # PEFT's ValueError, before anything changes
    for layer in layers:
        layer.set_adapter(names)
    for wrapper in wrappers:
        wrapper.set_adapter(names)
    if any(layer.merged_adapters for layer in layers):  # merged mode: swap in place
        remerge_layers(layers, names)


def set_scale(model: nnx.Module, adapter_name: str, scale: float) -> None:
    """Scale an adapter's delta at inference (not saved). Merged layers keep their merge."""
    require_adapters(model, [adapter_name])
    for _, layer in shira_layers(model):
        layer.set_scale(adapter_name, scale)


@contextlib.contextmanager
def disable_adapter(model: nnx.Module) -> Iterator[nnx.Module]:
    """Run the base model only; merged adapters are unmerged and merged back on exit."""
    layers, wrappers = _wrappers_fast(model)
    remerge = [layer.merged_adapters for layer in layers]
    unmerge_layers(layers)  # in place, one pass per group of same-shaped kernels
    for layer in layers:
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        if any(remerge):
            remerge_layers(layers, remerge)
        for wrapper in wrappers:
            wrapper.disabled = False


def adapter_index(model: nnx.Module, names: Sequence[str | None]) -> jax.Array:
    """int32 id per example for `mixed_adapters`: the adapter's position among the model's
    adapters (`adapter_names`), -1 for None (the base model).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import shira_jax as sj
        >>> class Net(nnx.Module):
        ...     def __init__(self):
        ...         self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        ...     def __call__(self, x):
        ...         return self.proj(x)
        >>> net = Net()
        >>> for i, name in enumerate(["a", "b"]):
        ...     _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"],
        ...                        random_seed=i, init_weights=False), adapter_name=name)
        >>> ids = sj.adapter_index(net, ["b", None, "a"])
        >>> ids.tolist()
        [1, -1, 0]
        >>> x = jnp.ones((3, 4))
        >>> with sj.mixed_adapters(net, ids):
        ...     y = net(x)
        >>> sj.set_adapter(net, "b")
        >>> bool(jnp.allclose(y[0], net(x[:1])[0], atol=1e-6))
        True
    """
    known = adapter_names(model)
    missing = [n for n in names if n is not None and n not in known]
    if missing:
        raise KeyError(f"No adapter named {missing} in this model; it has {list(known)}.")
    return jnp.asarray([-1 if n is None else known.index(n) for n in names], jnp.int32)


@contextlib.contextmanager
def mixed_adapters(model: nnx.Module, ids: Any) -> Iterator[nnx.Module]:
    """Run example `b` of every call with adapter `ids[b]` (from `adapter_index`; -1 = base).

    Only this model's SHiRA layers mix; other models run as usual. The ids are the layers'
    state while the block runs (`MixedAdapterIds`): `nnx.jit` takes them as data, so one
    compilation serves every mix, whether the block is entered inside the jitted function or
    around its call, and a trace made inside the block is never reused outside it. Scales
    apply per adapter; `set_adapter` does not matter here. Merged adapters are refused
    (unmerge first), as are models with `modules_to_save` copies (one copy per example is not
    supported).

    Raises:
        ValueError: merged adapters or `modules_to_save`; `ids` not a 1-D integer array; a
            concrete id outside [-1, number of adapters).

    Example: see `adapter_index`.
    """
    layers, wrappers = _wrappers_fast(model)
    merged = sorted({a for layer in layers for a in layer.merged_adapters})
    if merged:
        raise ValueError(
            f"Adapters {merged} are merged into the kernels; sj.unmerge(model) before running "
            "a mixed-adapter batch."
        )
    if any(len(w.modules_to_save) for w in wrappers):
        raise ValueError(
            "Mixed-adapter batches do not support modules_to_save (one module copy per "
            "example); run such adapters one at a time."
        )
    names = adapter_names(model)
    ids = _checked_ids(ids, names)
    with mixed_batch(layers, names, ids):
        yield model


def _checked_ids(ids: Any, names: Sequence[str]) -> jax.Array:
    """`ids` as an int32 array, refused unless 1-D integer (and, when concrete, in range)."""
    if isinstance(ids, list | tuple) and any(isinstance(i, str) or i is None for i in ids):
        raise TypeError("ids are integers: turn adapter names into ids with sj.adapter_index.")
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"ids must be a 1-D integer array (one adapter id per example, from "
            f"sj.adapter_index); got shape {ids.shape}, dtype {ids.dtype}."
        )
    if not isinstance(ids, jax.core.Tracer):
        host = np.asarray(ids)
        bad = [(b, int(i)) for b, i in enumerate(host) if not -1 <= i < len(names)]
        if bad:
            raise ValueError(
                f"Adapter ids out of range at (example, id) {bad[:5]}: this model has "
                f"{len(names)} adapters {list(names)}, so ids run from -1 (the base) to "
                f"{len(names) - 1}. Make them with sj.adapter_index."
            )
    return ids.astype(jnp.int32)


def merge(
    model: nnx.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
) -> None:
    """Fold adapters (default: the active ones) into the kernels, keeping what they overwrite.

    Kernels are updated in place, touching only the adapters' entries: one compiled, donated
    call per group of same-shaped kernels (plain or scan-stacked), kernels split over a mesh
    shard by shard. With `safe_merge` a non-finite result anywhere refuses the whole merge
    and leaves the model unchanged. Unmerge restores the kernels bit for bit.
    """
    layers, _ = _wrappers_fast(model)
    if adapter_names is not None:
        adapter_names = as_tuple(adapter_names)
        _require_fast(model, layers, adapter_names)
    merge_layers(layers, adapter_names, safe_merge=safe_merge)


def unmerge(model: nnx.Module) -> None:
    """Undo every merge, restoring the original kernel entries bit for bit (in place)."""
    unmerge_layers(_wrappers_fast(model)[0])


def _require_fast(model: nnx.Module, layers: Sequence[ShiraDense], names: Sequence[Any]) -> None:
    """`require_adapters` from already-found layers (no graph walk)."""
    known = dict.fromkeys(adapter_configs(model))
    for layer in layers:
        known.update(dict.fromkeys(layer.adapter_names))
    missing = [n for n in names if n is not None and n not in known]
    if missing:
        raise KeyError(f"No adapter named {missing} in this model; it has {list(known)}.")


def merge_and_unload(model: nnx.Module, safe_merge: bool = False) -> nnx.Module:
    """Merge the active adapters and replace every wrapper by its plain layer, in place."""
    merge(model, safe_merge=safe_merge)
    for path, layer in shira_layers(model):
        set_submodule(model, path, layer.base_layer)
    for path, wrapper in _save_wrappers(model):
        set_submodule(model, path, wrapper.active_module())
    if hasattr(model, "shira_configs"):
        model.shira_configs = {}
    return model


def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere (unmerge it first if it is merged).

    As in PEFT, deleting an active adapter keeps the other active ones; when none is left, the
    first remaining adapter (in sorted order) becomes active, with PEFT's warning, so the model
    never silently falls back to the base model while it still has adapters.

    Example:
        >>> import warnings
        >>> from flax import nnx
        >>> import shira_jax as sj
        >>> class Net(nnx.Module):
        ...     def __init__(self):
        ...         self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        >>> net = Net()
        >>> for name in ("b", "a"):
        ...     _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"]), name)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     sj.delete_adapter(net, "b")
        >>> sj.active_adapters(net), str(caught[0].message)
        (('a',), 'Adapter b was active which is now deleted. Setting active adapter to a.')
    """
    require_adapters(model, [adapter_name])
    layers = shira_layers(model)
    merged_in = [p for p, layer in layers if adapter_name in layer.merged_adapters]
    if merged_in:
        raise ValueError(
            f"Adapter {adapter_name!r} is merged in {merged_in[:3]}...; call unmerge first."
        )
    was_active = active_adapters(model)
    for _, layer in layers:
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
        elif adapter_name in layer.active_adapters:  # active model-wide, absent here
            layer.set_adapter(tuple(a for a in layer.active_adapters if a != adapter_name))
    for _, wrapper in _save_wrappers(model):
        wrapper.delete_adapter(adapter_name)
    model.shira_configs = {k: v for k, v in adapter_configs(model).items() if k != adapter_name}
    if adapter_name in was_active:
        _activate_remaining(model, adapter_name, was_active)


def _activate_remaining(model: nnx.Module, deleted: str, was_active: Sequence[str]) -> None:
    """After deleting the active `deleted`: keep the other active adapters, else activate the
    first remaining one with PEFT's warning (`BaseTunerLayer.delete_adapter`)."""
    remaining = tuple(a for a in was_active if a != deleted)
    if not remaining:
        left = sorted(adapter_names(model))
        if not left:
            return
        remaining = (left[0],)
        warnings.warn(
            f"Adapter {deleted} was active which is now deleted. Setting active adapter to "
            f"{left[0]}.",
            UserWarning,
            stacklevel=3,
        )
    set_adapter(model, remaining)


def _save_wrappers(model: nnx.Module) -> list[tuple[str, ModulesToSave]]:
    return [(p, m) for p, m in named_modules(model) if isinstance(m, ModulesToSave)]


def switch_adapter(
    model: nnx.Module, old: str | None, new: str | None, *, safe_merge: bool = False
) -> None:
    """In merged mode, replace merged adapter `old` by `new` in every layer, in one pass each.

    In every layer `old`'s saved entries are written back and `new` is merged in the same
    compiled pass (only the `2 * nnz` entries are touched; kernels are updated in place,
    donated, when nothing else holds them). `new` takes `old`'s place among the active
    adapters. `old=None` merges `new`; `new=None` unmerges `old`. `unmerge` still restores the
    base bit for bit.
    With `safe_merge`, non-finite merged entries refuse the switch and leave the model as it
    was.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import shira_jax as sj
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.up = nnx.Linear(16, 32, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.up(x)
        >>> model = MLP(nnx.Rngs(0))
        >>> for i, name in enumerate(["a", "b"]):
        ...     _ = sj.apply_shira(model, sj.ShiraConfig(r=2, target_modules=["up"],
        ...                        random_seed=i, init_weights=False), name)
        >>> sj.merge(model)
        >>> sj.switch_adapter(model, "a", "b")
        >>> model.up.merged_adapters, sj.active_adapters(model)
        (('b',), ('b',))
    """
    layers, wrappers = _wrappers_fast(model)
    _require_fast(model, layers, (old, new))
    previous = layers[0].active_adapters if layers else ()
    if old is not None and new is not None and old in previous:
        check_one_copy(wrappers, [new if a == old else a for a in previous])
    switch_layers(layers, old, new, safe_merge=safe_merge)
    if old is not None and new is not None and old in previous:
        active = tuple(dict.fromkeys(new if a == old else a for a in previous))
        for wrapper in wrappers:
            wrapper.set_adapter(active)


def _wrappers_fast(model: nnx.Module) -> tuple[list[ShiraDense], list[ModulesToSave]]:
    """Every ShiraDense and ModulesToSave of `model`, by a direct walk over module attributes.

    `shira_layers` walks every Variable of the graph (and matches paths pairwise), which takes
    ~0.4 s on a 30-layer model; switching needs only the wrappers themselves.
    """
    layers: list[ShiraDense] = []
    wrappers: list[ModulesToSave] = []
    seen: set[int] = set()
    stack: list[Any] = [model]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ShiraDense):
            layers.append(node)
            continue
        if isinstance(node, ModulesToSave):
            wrappers.append(node)
            continue
        if isinstance(node, nnx.Module):
            children = [v for k, v in vars(node).items() if not k.startswith("_pytree__")]
        elif isinstance(node, (list, tuple)):
            children = list(node)
        elif isinstance(node, dict):
            children = list(node.values())
        else:
            continue
        stack.extend(
            c for c in reversed(children) if isinstance(c, (nnx.Module, list, tuple, dict))
        )
    return layers, wrappers
