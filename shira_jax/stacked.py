"""Scan-stacked SHiRA layers: adapters for `nnx.vmap`-created, `nnx.scan`-applied layer stacks.

MaxText-style models create their blocks once under `nnx.vmap`, so every kernel carries a
leading layer axis (`[L, in, out]`), and run them with `nnx.scan`. Here such an `nnx.Linear`
becomes a *stacked* `ShiraDense`: the same module, built under `nnx.vmap`, so its values are
`[L, nnz]` and its indices `[L, 2, nnz]` (one mask per layer). Inside `nnx.scan` each step sees
an ordinary 2-D `ShiraDense`; training, adapter switching and `set_scale` need nothing more.
Per-layer operations (merge, unmerge, the dense delta) run the layer's own method under
`nnx.vmap` (`shira_jax.layer.per_slice`); `sj.apply_shira`, `sj.merge` and `sj.unmerge`
handle stacked layers like any other kernel view. PEFT files name layers one by one
(`layers.N.`): `unstack_adapter` and `restack_adapter` convert, and `apply_shira_stacked`
is `sj.apply_shira` that also accepts such per-layer indices.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from shira_jax.config import ShiraConfig
from shira_jax.layer import delta_weight, is_stacked, unwrap
from shira_jax.model import apply_shira, merge, named_modules, shira_layers, unmerge

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


def num_layers(layer: Any) -> int:
    """Size of the leading layer axis of a stacked layer."""
    return int(unwrap(layer).kernel.shape[0])


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
        n = parts[i + 1]
        if parts[i] == stack_name and n.isascii() and n.isdigit() and str(int(n)) == n:
            return ".".join(parts[: i + 1] + parts[i + 2 :]), int(n)  # "00" is not layer 0
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
            groups.setdefault(hit[0], {})[hit[1]] = (np.asarray(idx), _array(vals))
        else:
            out[path] = (np.asarray(idx), _array(vals))
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
        vals = [layers[i][1] for i in order]
        out[path] = (
            np.stack([layers[i][0] for i in order]),
            None if any(v is None for v in vals) else np.stack(vals),
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
    """`shira_jax.apply_shira`, with `indices` / `values` also accepted per layer.

    A stacked target (`nnx.Linear` with kernel `[L, in, out]`) gets values `[L, nnz]` and
    indices `[L, 2, nnz]`. `indices` / `values` may be keyed by stacked paths (`[L, 2, nnz]` /
    `[L, nnz]`) or per layer (`layers.N.` paths, as `unstack_adapter` gives and PEFT files
    hold); they are restacked here and handed to `apply_shira`, which checks everything before
    the model changes.
    """
    if indices is not None:
        stacked = {p for p, m in named_modules(model) if is_stacked(m)}
        given = restack_adapter(
            {p: (indices[p], None if values is None else values[p]) for p in indices},
            stacked,
            stack_name=stack_name,
        )
        indices = {p: idx for p, (idx, _) in given.items()}
        values = None if values is None else {p: vals for p, (_, vals) in given.items()}
    return apply_shira(
        model,
        config,
        adapter_name,
        indices=indices,
        values=values,
        key=key,
        loss_fn=loss_fn,
        calibration_data=calibration_data,
        model_type=model_type,
    )


def _array(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values)
