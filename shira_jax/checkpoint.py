"""Adapter-only checkpoints with orbax: values, indices and config, nothing of the base model.

A checkpoint directory holds `shira_adapter.json` (config, layer paths, kernel shapes) and an
orbax tree in `arrays/`. It is written beside the target and renamed into place, so a killed
save never leaves a half checkpoint that loads.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.proj = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    >>> net = Net()
    >>> _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"], random_seed=0,
    ...                                        init_weights=False))
    >>> ckpt = tempfile.mkdtemp() + "/adapter"
    >>> sj.save_adapter(net, ckpt)
    >>> fresh = Net()
    >>> sj.load_adapter(fresh, ckpt)
    >>> bool(jnp.array_equal(fresh.proj.shira_weight["default"][...],
    ...                      net.proj.shira_weight["default"][...]))
    True
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from shira_jax import masks
from shira_jax.config import ShiraConfig
from shira_jax.model import (
    adapter_configs,
    apply_shira,
    check_adapter_name,
    get_submodule,
    named_modules,
    shira_layers,
)
from shira_jax.modules_to_save import ModulesToSave

FORMAT = "shira-jax-adapter"
VERSION = 1
META_FILE = "shira_adapter.json"
ARRAYS_DIR = "arrays"


def adapter_arrays(model: nnx.Module, adapter_name: str) -> dict[str, dict[str, np.ndarray]]:
    """`{layer path: {"values", "indices"}}` of one adapter, kernel layout, as numpy."""
    out = {}
    for path, layer in shira_layers(model):
        if adapter_name in layer.adapter_names:
            out[path] = {
                "values": np.asarray(layer.shira_weight[adapter_name][...]),
                "indices": np.asarray(layer.shira_indices[adapter_name][...], np.int32),
            }
    if not out:
        raise KeyError(f"The model has no adapter {adapter_name!r}.")
    return out


def saved_module_arrays(model: nnx.Module, adapter_name: str) -> dict[str, dict[str, np.ndarray]]:
    """`{module path: {param path: array}}` of the adapter's `modules_to_save` copies."""
    out = {}
    for path, node in named_modules(model):
        if isinstance(node, ModulesToSave) and adapter_name in node.modules_to_save:
            state = nnx.state(node.modules_to_save[adapter_name])
            out[path] = {
                ".".join(str(k) for k in key): np.asarray(v[...])
                for key, v in nnx.to_flat_state(state)
            }
    return out


def save_adapter(
    model: nnx.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Save one adapter (values, indices, config, modules_to_save) with orbax, atomically."""
    import orbax.checkpoint as ocp

    check_adapter_name(adapter_name)
    layers = adapter_arrays(model, adapter_name)
    modules = saved_module_arrays(model, adapter_name)
    config = adapter_configs(model).get(adapter_name)
    shapes = {p: list(m.base_layer.kernel.shape) for p, m in shira_layers(model) if p in layers}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict() if config is not None else None,
        "layers": {
            p: {"kernel_shape": shapes[p], "r": _layer_r(model, p, adapter_name)} for p in layers
        },
        "modules_to_save": {p: sorted(v) for p, v in modules.items()},
    }
    tree = {
        "layers": {_slot(i): layers[p] for i, p in enumerate(meta["layers"])},
        "modules": {
            _slot(i): {_slot(j): modules[p][k] for j, k in enumerate(meta["modules_to_save"][p])}
            for i, p in enumerate(meta["modules_to_save"])
        },
    }
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        ocp.PyTreeCheckpointer().save(tmp / ARRAYS_DIR, tree)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
) -> None:
    """Load an adapter saved by `save_adapter` into `model` (wrapped or not), in place.

    Everything is read and checked first; a bad checkpoint leaves the model unchanged.
    """
    import orbax.checkpoint as ocp

    source = Path(directory).absolute()
    meta_path = source / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{source} is not a shira-jax adapter checkpoint (no {META_FILE}); "
            "for a PEFT directory use bridge.load_peft_adapter."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}.")
    name = check_adapter_name(adapter_name or meta["adapter_name"])
    tree = ocp.PyTreeCheckpointer().restore(source / ARRAYS_DIR)
    config = (
        ShiraConfig.from_dict(meta["config"])
        if meta.get("config")
        else ShiraConfig(
            r=max(v["r"] for v in meta["layers"].values()),
            mask_type="custom",
            mask_fn=_no_mask_fn,
            target_modules=tuple(meta["layers"]),
        )
    )
    modules = dict(named_modules(model))
    indices, values = {}, {}
    for i, (path, info) in enumerate(meta["layers"].items()):
        arrays = tree["layers"][_slot(i)]
        if path not in modules:
            raise ValueError(f"Checkpoint layer {path} does not exist in this model.")
        layer = modules[path]
        kernel = getattr(layer, "base_layer", layer).kernel
        if list(kernel.shape) != list(info["kernel_shape"]):
            raise ValueError(
                f"Layer {path}: checkpoint made for kernel {info['kernel_shape']}, "
                f"this model has {list(kernel.shape)}."
            )
        idx = masks.validate_indices(np.asarray(arrays["indices"]), *kernel.shape, layer_name=path)
        vals = np.asarray(arrays["values"])
        if vals.shape != (idx.shape[1],):
            raise ValueError(
                f"Layer {path}: {idx.shape[1]} indices but values of shape {vals.shape}."
            )
        indices[path], values[path] = idx, vals
    module_values = _check_module_arrays(model, meta, tree)
    apply_shira(model, config, name, indices=indices, values=values)
    for path, params in module_values.items():
        copy = get_submodule(model, path).modules_to_save[name]
        for var_path, array in params.items():
            _variable(copy, var_path)[...] = array


def _check_module_arrays(model: nnx.Module, meta: dict[str, Any], tree: dict[str, Any]) -> dict:
    out = {}
    for i, (path, var_paths) in enumerate(meta.get("modules_to_save", {}).items()):
        try:
            module = get_submodule(model, path)
        except (AttributeError, KeyError, IndexError, ValueError) as err:
            raise ValueError(f"modules_to_save {path} does not exist in this model.") from err
        if isinstance(module, ModulesToSave):
            module = module.original_module
        arrays = tree["modules"][_slot(i)]
        params = {}
        for j, var_path in enumerate(var_paths):
            expected = tuple(_variable(module, var_path).shape)
            got = np.asarray(arrays[_slot(j)])
            if got.shape != expected:
                raise ValueError(f"{path}.{var_path}: saved shape {got.shape}, model {expected}.")
            params[var_path] = got
        out[path] = params
    return out


def _variable(module: nnx.Module, var_path: str) -> nnx.Variable:
    owner, _, leaf = var_path.rpartition(".")
    node = get_submodule(module, owner) if owner else module
    return node[leaf] if isinstance(node, nnx.Dict) else getattr(node, leaf)


def _layer_r(model: nnx.Module, path: str, adapter_name: str) -> int:
    return dict(shira_layers(model))[path].r[adapter_name]


def _slot(i: int) -> str:
    return f"{i:05d}"


def _no_mask_fn(*_: Any, **__: Any) -> Any:
    raise ValueError("This adapter's indices come from its checkpoint; it has no mask_fn.")


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing any old checkpoint only once the new one is whole."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
