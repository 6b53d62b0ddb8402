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

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax.config import ShiraConfig
from shira_jax.model import (
    adapter_configs,
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
    """Save one adapter with orbax straight from its (sharded) arrays; any process count.

    Same directory format as `shira_jax.save_adapter` (readable by `sj.load_adapter` too),
    but nothing is gathered to one host and stacked layers (`[L, nnz]`) are kept whole. Every
    process calls it; process 0 writes the metadata. The checkpoint is assembled beside the
    target and renamed into place, so a crash never leaves one that loads half.
    """
    import orbax.checkpoint as ocp
    from etils import epath
    from jax.experimental import multihost_utils


    check_adapter_name(adapter_name)
    layers = {p: layer for p, layer in shira_layers(model) if adapter_name in layer.adapter_names}
    if not layers:
        raise KeyError(f"The model has no adapter {adapter_name!r}.")
    modules = {}
    for path, node in named_modules(model):
        if isinstance(node, ModulesToSave) and adapter_name in node.modules_to_save:
            state = nnx.state(node.modules_to_save[adapter_name])
            modules[path] = {
                ".".join(str(k) for k in key): v.get_value() for key, v in nnx.to_flat_state(state)
            }
    config = adapter_configs(model).get(adapter_name)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict() if config is not None else None,
        "layers": {
            p: {"kernel_shape": list(m.base_layer.kernel.shape), "r": m.r[adapter_name]}
            for p, m in layers.items()
        },
        "modules_to_save": {p: sorted(v) for p, v in modules.items()},
    }
    tree = {
        "layers": {
            _slot(i): {
                "values": m.shira_weight[adapter_name].get_value(),
                "indices": m.shira_indices[adapter_name].get_value(),
            }
            for i, m in enumerate(layers.values())
        },
        "modules": {
            _slot(i): {_slot(j): modules[p][k] for j, k in enumerate(sorted(modules[p]))}
            for i, p in enumerate(meta["modules_to_save"])
        },
    }
    remote = "://" in str(directory)
    target = epath.Path(directory if remote else os.path.abspath(directory))
    lead = jax.process_index() == 0
    if remote:  # object stores have no atomic rename: the metadata file, written last, commits
        if lead:
            if target.exists():
                target.rmtree()
            target.mkdir(parents=True)
        multihost_utils.sync_global_devices("shira_save_adapter:start")
        ocp.PyTreeCheckpointer().save(target / ARRAYS_DIR, tree)
        if lead:
            (target / META_FILE).write_text(json.dumps(meta, indent=2))
        multihost_utils.sync_global_devices("shira_save_adapter:done")
        return
    tmp = target.parent / f".{target.name}.tmp-shira"  # same name on every process
    if lead:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            tmp.rmtree()
        tmp.mkdir()
    multihost_utils.sync_global_devices("shira_save_adapter:start")
    try:
        ocp.PyTreeCheckpointer().save(tmp / ARRAYS_DIR, tree)
        if lead:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    except BaseException:  # a killed save leaves nothing behind, and the old checkpoint intact
        if lead and tmp.exists():
            tmp.rmtree()
        raise
    if lead:
        if target.exists():
            old = target.parent / f".{target.name}.old-shira"
            if old.exists():
                old.rmtree()
            target.rename(old)
            tmp.rename(target)
            old.rmtree()
        else:
            tmp.rename(target)
    multihost_utils.sync_global_devices("shira_save_adapter:done")


def load_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> None:
    """Load a `save_adapter` checkpoint into `model`, reading each array onto its target sharding.

    Works whatever mesh (or device count) the checkpoint was saved from: the target of every
    layer's values and indices is derived from this model's kernel (on `mesh`, or the mesh its
    kernel already lives on; else one device). Stacked layers are restored whole. Everything
    is read and checked before the model changes.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    from shira_jax.stacked import apply_shira_stacked

    source = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    meta_path = source / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{source} is not a shira-jax adapter checkpoint (no {META_FILE})."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}.")
    name = check_adapter_name(adapter_name or meta["adapter_name"])
    modules = dict(named_modules(model))
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(source / ARRAYS_DIR)
    saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)

    def target(meta_leaf: Any, kernel: Any, stacked_axes: int) -> Any:
        value = kernel.get_value()
        kmesh = mesh
        if kmesh is None and isinstance(getattr(value, "sharding", None), NamedSharding):
            kmesh = value.sharding.mesh
        if kmesh is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        spec = [None] * len(meta_leaf.shape)
        current = getattr(value, "sharding", None)
        if stacked_axes and isinstance(current, NamedSharding) and current.mesh == kmesh:
            spec[:stacked_axes] = tuple(current.spec)[:stacked_axes]
        return ocp.ArrayRestoreArgs(
            sharding=NamedSharding(kmesh, PartitionSpec(*spec)),
            global_shape=tuple(meta_leaf.shape),
            dtype=meta_leaf.dtype,
        )

    args: dict[str, Any] = {"layers": {}, "modules": {}}
    kernels = {}
    for i, (path, info) in enumerate(meta["layers"].items()):
        if path not in modules:
            raise ValueError(f"Checkpoint layer {path} does not exist in this model.")
        kernel = getattr(modules[path], "base_layer", modules[path]).kernel
        if list(kernel.shape) != list(info["kernel_shape"]):
            raise ValueError(
                f"Layer {path}: checkpoint made for kernel {info['kernel_shape']}, "
                f"this model has {list(kernel.shape)}."
            )
        kernels[path] = kernel
        slot = saved["layers"][_slot(i)]
        lead = len(info["kernel_shape"]) - 2
        args["layers"][_slot(i)] = {
            k: target(slot[k], kernel, lead) for k in ("values", "indices")
        }
    for i, var_paths in enumerate(meta.get("modules_to_save", {}).values()):
        args["modules"][_slot(i)] = {
            _slot(j): ocp.RestoreArgs(restore_type=np.ndarray) for j in range(len(var_paths))
        }
    tree = checkpointer.restore(source / ARRAYS_DIR, restore_args=args)

    indices, values = {}, {}
    for i, path in enumerate(meta["layers"]):
        arrays = tree["layers"][_slot(i)]
        kernel_shape = tuple(kernels[path].shape)
        idx, vals = arrays["indices"], arrays["values"]
        if tuple(idx.shape[:-2]) != kernel_shape[:-2] or tuple(vals.shape) != (
            *kernel_shape[:-2],
            idx.shape[-1],
        ):
            raise ValueError(
                f"Layer {path}: indices {tuple(idx.shape)} / values {tuple(vals.shape)} do not "
                f"fit kernel {kernel_shape}."
            )
        indices[path], values[path] = idx, vals
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
    module_values = _check_module_arrays(model, meta, tree)
    apply_shira_stacked(model, config, name, indices=indices, values=values)
    for path, params in module_values.items():
        copy = get_submodule(model, path).modules_to_save[name]
        for var_path, array in params.items():
            _variable(copy, var_path)[...] = array


def _restore_numpy(path: Path) -> Any:
    """Read an orbax tree as host numpy arrays, whatever devices or mesh saved it.

    Arrays written from a mesh (`sharding.save_adapter`) would otherwise be restored onto
    their saved sharding, which fails when the device count differs.
    """
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path)
    saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    return checkpointer.restore(path, restore_args=args)


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
