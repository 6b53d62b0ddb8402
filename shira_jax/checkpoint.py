"""Adapter-only checkpoints with orbax: values, indices and config, nothing of the base model.

A checkpoint directory holds `shira_adapter.json` (config, layer paths, kernel shapes) and an
orbax tree in `arrays/`: a plain mapping of an `AdapterState` (`write_state` / `read_state`;
`save_adapter` / `load_adapter` add `state.extract` / `state.inject`). It is written beside
the target and renamed into place, so a killed save never leaves a half checkpoint that
loads.

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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax import atomic
from shira_jax.config import ShiraConfig
from shira_jax.kernels import kernel_view
from shira_jax.layer import unwrap
from shira_jax.model import named_modules
from shira_jax.state import AdapterState, LayerState, extract, inject
from shira_jax.util import check_adapter_name

__all__ = ["load_adapter", "read_meta", "read_state", "save_adapter", "write_state"]

FORMAT = "shira-jax-adapter"
VERSION = 1
META_FILE = "shira_adapter.json"
ARRAYS_DIR = "arrays"

#: `placement(layer path, "values" | "indices", shape)` -> a sharding to restore onto, or None
#: for host numpy.
Placement = Callable[[str, str, tuple[int, ...]], Any]


def _slot(i: int) -> str:
    return f"{i:05d}"


# ----------------------------------------------------------------------------- write


def save_adapter(
    model: nnx.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Save one adapter with orbax straight from its (sharded) arrays; any process count.

    Nothing is gathered to one host and stacked layers (`[L, nnz]`) are kept whole. Every
    process calls it; process 0 writes the metadata. The checkpoint is assembled beside the
    target and renamed into place, so a crash never leaves one that loads half.
    """
    check_adapter_name(adapter_name)
    write_state(directory, extract(model, adapter_name), adapter_name)


def _meta(state: AdapterState, adapter_name: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "adapter_name": adapter_name,
        "config": state.config.to_dict(),
        "layers": {
            p: {"kernel_shape": list(s.kernel_shape), "r": s.r} for p, s in state.layers.items()
        },
        "modules_to_save": {p: sorted(v) for p, v in state.modules_to_save.items()},
    }


def _tree(state: AdapterState) -> dict[str, Any]:
    return {
        "layers": {
            _slot(i): {"values": s.values, "indices": s.indices}
            for i, s in enumerate(state.layers.values())
        },
        "modules": {
            _slot(i): {_slot(j): params[k] for j, k in enumerate(sorted(params))}
            for i, params in enumerate(state.modules_to_save.values())
        },
    }


def write_state(
    directory: str | os.PathLike, state: AdapterState, adapter_name: str = "default"
) -> None:
    """Write `state` as an orbax adapter checkpoint (every process calls it; atomic)."""
    import orbax.checkpoint as ocp
    from etils import epath
    from jax.experimental import multihost_utils

    meta, tree = _meta(state, adapter_name), _tree(state)
    remote = "://" in str(directory)
    target = epath.Path(directory if remote else os.path.abspath(directory))
    lead = jax.process_index() == 0
    sync = multihost_utils.sync_global_devices
    if remote:  # object stores have no atomic rename: the metadata file, written last, commits
        if lead:
            if target.exists():
                target.rmtree()
            target.mkdir(parents=True)
        sync("shira_save_adapter:start")
        ocp.PyTreeCheckpointer().save(target / ARRAYS_DIR, tree)
        if lead:
            (target / META_FILE).write_text(json.dumps(meta, indent=2))
        sync("shira_save_adapter:done")
        return
    tmp = target.parent / f".{target.name}.tmp-shira"  # same name on every process
    if lead:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            tmp.rmtree()
        tmp.mkdir()
    sync("shira_save_adapter:start")
    try:
        ocp.PyTreeCheckpointer().save(tmp / ARRAYS_DIR, tree)
        if lead:
            atomic.write_json(tmp / META_FILE, meta)
    except BaseException:  # a killed save leaves nothing behind, and the old checkpoint intact
        if lead and tmp.exists():
            tmp.rmtree()
        raise
    if lead:
        atomic.replace_dir(tmp, target)
    sync("shira_save_adapter:done")


# ----------------------------------------------------------------------------- read


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked `shira_adapter.json` of a checkpoint directory."""
    from etils import epath

    source = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    meta_path = source / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{source} is not a shira-jax adapter checkpoint (no {META_FILE}); it should be "
            "the folder that shira_jax.save_adapter wrote."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}.")
    return meta


def read_state(
    directory: str | os.PathLike, placement: Placement | None = None
) -> tuple[str, AdapterState]:
    """`(stored adapter name, AdapterState)` of a checkpoint, whatever mesh saved it.

    Arrays come back as host numpy, or onto `placement(path, kind, shape)`'s sharding.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    meta = read_meta(directory)
    source = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(source / ARRAYS_DIR)
    saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)

    def restore_args(path: str, kind: str, leaf: Any) -> Any:
        sharding = None if placement is None else placement(path, kind, tuple(leaf.shape))
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(
            sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype
        )

    args: dict[str, Any] = {"layers": {}, "modules": {}}
    for i, path in enumerate(meta["layers"]):
        slot = saved["layers"][_slot(i)]
        args["layers"][_slot(i)] = {k: restore_args(path, k, slot[k]) for k in slot}
    for i, var_paths in enumerate(meta.get("modules_to_save", {}).values()):
        args["modules"][_slot(i)] = {
            _slot(j): ocp.RestoreArgs(restore_type=np.ndarray) for j in range(len(var_paths))
        }
    tree = checkpointer.restore(source / ARRAYS_DIR, restore_args=args)
    return meta["adapter_name"], _state(meta, tree)


def _state(meta: Mapping[str, Any], tree: Mapping[str, Any]) -> AdapterState:
    layers = {}
    for i, (path, info) in enumerate(meta["layers"].items()):
        arrays = tree["layers"][_slot(i)]
        layers[path] = LayerState(
            arrays["indices"], arrays["values"], tuple(info["kernel_shape"]), int(info["r"])
        )
    modules = {
        path: {var: tree["modules"][_slot(i)][_slot(j)] for j, var in enumerate(var_paths)}
        for i, (path, var_paths) in enumerate(meta.get("modules_to_save", {}).items())
    }
    config = (
        ShiraConfig.from_dict(meta["config"])
        if meta.get("config")
        else ShiraConfig.stored_indices(max(s.r for s in layers.values()), tuple(layers))
    )
    return AdapterState(config, layers, modules)


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
    meta = read_meta(directory)
    name = check_adapter_name(adapter_name or meta["adapter_name"])
    modules = dict(named_modules(model))
    for path, info in meta["layers"].items():
        view = kernel_view(unwrap(modules[path])) if path in modules else None
        if view is None:
            raise ValueError(f"Checkpoint layer {path} does not exist in this model.")
        if list(view.shape) != list(info["kernel_shape"]):
            raise ValueError(
                f"Layer {path}: checkpoint made for kernel {info['kernel_shape']}, "
                f"this model has {list(view.shape)}."
            )
    _, state = read_state(directory, _placement(modules, mesh))
    for path, layer in state.layers.items():
        idx, vals, shape = layer.indices, layer.values, layer.kernel_shape
        if tuple(idx.shape[:-2]) != shape[:-2] or tuple(vals.shape) != (*shape[:-2], idx.shape[-1]):
            raise ValueError(
                f"Layer {path}: indices {tuple(idx.shape)} / values {tuple(vals.shape)} do not "
                f"fit kernel {shape}."
            )
    inject(model, name, state, source=str(directory))


def _placement(modules: Mapping[str, nnx.Module], mesh: Any) -> Placement:
    """Restore each layer's arrays next to its kernel: replicated over the matrix axes, split
    like the kernel over its stacked axes (on `mesh`, or the mesh the kernel lives on)."""

    def place(path: str, kind: str, shape: tuple[int, ...]) -> Any:
        value = unwrap(modules[path]).kernel.get_value()
        current = getattr(value, "sharding", None)
        kmesh = mesh
        if kmesh is None and isinstance(current, NamedSharding):
            kmesh = current.mesh
        if kmesh is None:
            return None
        lead = value.ndim - 2
        spec = [None] * len(shape)
        if lead and isinstance(current, NamedSharding) and current.mesh == kmesh:
            spec[:lead] = tuple(current.spec)[:lead]
        return NamedSharding(kmesh, PartitionSpec(*spec))

    return place
