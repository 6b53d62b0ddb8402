"""HF PEFT SHiRA adapter directories <-> shira_jax adapters.

A PEFT SHiRA directory holds `adapter_config.json` and `adapter_model.safetensors` (metadata
`{"format": "pt"}`). Its keys carry no adapter name:

* `base_model.model.<module path>.shira_weight`: float32 `[nnz]`;
* `base_model.model.<module path>.shira_indices`: int32 `[2, nnz]` in TORCH order: row 0 is
  the output index, row 1 the input index of the torch weight `[out, in]`, sorted by
  `out_idx * in + in_idx`;
* `base_model.model.<module path>.<param>`: a `modules_to_save` module's own copy, with
  torch's parameter names (`weight` `[out, in]`, `bias`; `weight` of an embedding or norm).

shira_jax keeps indices in KERNEL layout (`[in, out]` kernel: row 0 input, row 1 output,
sorted by `in_idx * out + out_idx`), so rows swap and values are permuted both ways
(:func:`kernel_to_torch_order`, :func:`torch_to_kernel_order`). Module paths are the same
dotted names on both sides (`model.layers.0.self_attn.q_proj`).

Scan-stacked layers (`shira_jax.stacked`: one `ShiraDense` with values `[L, nnz]` for the
`nnx.vmap`-created blocks under `stack_name`, "layers" by default) are written one layer per
key, `<prefix>.layers.N.<rest>`, exactly as PEFT names the layers of the equivalent torch
`nn.ModuleList`; a load restacks them (every layer 0..L-1 must be present, with the same
number of entries, as a stacked adapter holds one `[L, nnz]` array).

Only safetensors is read (never pickle). A load reads and checks everything first; on any
error the model is left exactly as it was. Writes go to a temporary file in the target
folder, renamed into place.

Example (JAX -> PEFT -> JAX):
    >>> import tempfile, numpy as np
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> from bridge.peft import load_peft_adapter, save_peft_adapter
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.proj = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    >>> net = Net()
    >>> _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"], random_seed=0,
    ...                                        init_weights=False))
    >>> out = tempfile.mkdtemp()
    >>> save_peft_adapter(net, out)
    >>> fresh = Net()
    >>> load_peft_adapter(fresh, out)
    >>> bool(np.array_equal(fresh.proj.get_delta_weight("default"),
    ...                     net.proj.get_delta_weight("default")))
    True
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import masks, stacked
from shira_jax.checkpoint import adapter_arrays, saved_module_arrays
from shira_jax.config import _EXTRA_KEY, ShiraConfig, resolve_targets
from shira_jax.layer import ShiraDense, ShiraFrozenValues
from shira_jax.model import (
    adapter_configs,
    adapter_names,
    apply_shira,
    check_adapter_name,
    get_submodule,
    named_modules,
    shira_layers,
)
from shira_jax.modules_to_save import ModulesToSave, select_modules_to_save

__all__ = [
    "CONFIG_NAME",
    "AdapterFileNotFoundError",
    "check_peft_budget",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "kernel_to_torch_order",
    "load_peft_adapter",
    "peft_config_dict",
    "peft_output_folder",
    "peft_tensors",
    "read_peft_dir",
    "save_peft_adapter",
    "split_peft_keys",
    "torch_param_name",
    "torch_to_kernel_order",
    "write_peft_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
WEIGHT = "shira_weight"
INDICES = "shira_indices"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Flax variable name -> torch parameter name (nnx.Linear, nnx.Embed, nnx.LayerNorm/RMSNorm).
_TORCH_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


class AdapterFileNotFoundError(FileNotFoundError, ValueError):
    """A PEFT adapter folder or one of its files is missing (also a ValueError)."""


# ----------------------------------------------------------------------------- index order


def kernel_to_torch_order(
    indices: Any, values: Any, kernel_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel-layout indices/values -> PEFT's torch order.

    Args:
        indices: `[2, nnz]`, row 0 = input index, row 1 = output index (Flax kernel `[in, out]`).
        values: `[nnz]`, in the same order as `indices`.
        kernel_shape: `(in, out)`.

    Returns:
        `(int32 [2, nnz] with row 0 = output index, row 1 = input index, sorted by
        out_idx * in + in_idx, values permuted the same way)`.

    >>> idx, val = kernel_to_torch_order(np.array([[0, 1], [1, 0]]), np.array([1., 2.]), (2, 2))
    >>> idx.tolist(), val.tolist()
    ([[0, 1], [1, 0]], [2.0, 1.0])
    """
    n_in, _ = kernel_shape
    idx = np.asarray(indices).astype(np.int64)
    val = np.asarray(values)
    order = np.argsort(idx[1] * n_in + idx[0], kind="stable")
    return np.ascontiguousarray(idx[::-1][:, order], dtype=np.int32), val[order]


def torch_to_kernel_order(
    indices: Any, values: Any, kernel_shape: tuple[int, int], *, layer_name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT torch-order indices/values -> canonical kernel layout (sorted, unique).

    Integral float indices are accepted (PEFT on Windows writes float32); duplicate positions
    are merged by summing their values (PEFT scatter-adds). Out-of-range or non-integral
    indices raise a ValueError that names the torch row (output/input) and the layer.

    Args:
        indices: `[2, nnz]`, row 0 = output index, row 1 = input index (torch `[out, in]`).
        values: `[nnz]`.
        kernel_shape: `(in, out)` of the Flax kernel.

    >>> idx, val = torch_to_kernel_order(np.array([[0., 1., 0.], [1., 0., 1.]]),
    ...                                  np.array([1., 2., 3.]), (2, 2))
    >>> idx.tolist(), val.tolist()
    ([[0, 1], [1, 0]], [2.0, 4.0])
    """
    n_in, n_out = kernel_shape
    where = f"layer {layer_name!r}: " if layer_name else ""
    idx = np.asarray(indices)
    val = np.asarray(values)
    if idx.ndim != 2 or idx.shape[0] != 2:
        raise ValueError(f"{where}shira_indices must have shape [2, nnz], got {idx.shape}.")
    if val.ndim != 1:
        raise ValueError(f"{where}shira_weight must have shape [nnz], got {val.shape}.")
    if val.shape[0] != idx.shape[1]:
        raise ValueError(
            f"{where}shira_weight has {val.shape[0]} values but shira_indices has "
            f"{idx.shape[1]} positions; they must have the same length."
        )
    if not jnp.issubdtype(val.dtype, jnp.floating):
        raise ValueError(f"{where}shira_weight must be floating point, got {val.dtype}.")
    if idx.dtype.kind not in "iuf":
        raise ValueError(f"{where}shira_indices must be integers, got dtype {idx.dtype}.")
    if idx.size:
        for row, (name, limit) in enumerate((("output", n_out), ("input", n_in))):
            data = idx[row]
            bad = (data < 0) | (data >= limit)
            if bad.any():
                raise ValueError(
                    f"{where}{int(bad.sum())} {name} index(es) in shira_indices row {row} are "
                    f"out of range [0, {limit}) for a torch weight [out={n_out}, in={n_in}], "
                    f"e.g. {data[bad][0].item()!r}. The adapter was made for a layer of "
                    "another shape: check the base model."
                )
    kernel_idx = masks.validate_indices(idx[::-1], n_in, n_out, layer_name=layer_name)
    return masks.canonicalize(kernel_idx, val, (n_in, n_out))


# ----------------------------------------------------------------------------- param names


def torch_param_name(var_path: str, ndim: int) -> tuple[str, bool]:
    """Flax variable path of a module -> (torch parameter name, transpose?).

    `kernel` (2-D) -> `weight` transposed; `embedding` and `scale` -> `weight`; anything else
    keeps its name (`bias`, a Llama RMSNorm's `weight`). Nested paths keep their prefix.

    >>> torch_param_name("kernel", 2), torch_param_name("sub.embedding", 2)
    (('weight', True), ('sub.weight', False))
    """
    owner, _, leaf = var_path.rpartition(".")
    if leaf == "kernel" and ndim != 2:
        raise ValueError(
            f"{var_path}: a {ndim}-D kernel has no torch Linear equivalent; only 2-D kernels "
            "(nnx.Linear) are converted for modules_to_save."
        )
    name = _TORCH_NAMES.get(leaf, leaf)
    return (f"{owner}.{name}" if owner else name), leaf == "kernel"


def _module_params(module: nnx.Module, where: str) -> dict[str, tuple[str, bool, nnx.Variable]]:
    """torch name -> (flax var path, transpose?, variable) for a module's params."""
    state = nnx.state(module, (nnx.Param, ShiraFrozenValues))
    out: dict[str, tuple[str, bool, nnx.Variable]] = {}
    for key, _ in nnx.to_flat_state(state):
        var_path = ".".join(str(k) for k in key)
        variable = _variable(module, var_path)
        name, transpose = torch_param_name(var_path, variable[...].ndim)
        if name in out:
            raise ValueError(
                f"{where}: variables {out[name][0]} and {var_path} both map to torch name "
                f"{name!r}; this module type is not supported in modules_to_save."
            )
        out[name] = (var_path, transpose, variable)
    return out


def _variable(module: nnx.Module, var_path: str) -> nnx.Variable:
    owner, _, leaf = var_path.rpartition(".")
    node = get_submodule(module, owner) if owner else module
    if isinstance(node, (nnx.Dict, nnx.List)):
        return node[int(leaf) if isinstance(node, nnx.List) else leaf]
    return getattr(node, leaf)


# ----------------------------------------------------------------------------- reading


def read_peft_dir(
    directory: str | os.PathLike, adapter_name: str | None = None
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """Read a PEFT adapter folder: `(folder, adapter_config dict, {key: numpy array})`.

    For an `adapter_name` other than "default", the subfolder `directory/<adapter_name>` is
    read when it holds an adapter (PEFT's save_pretrained puts non-default adapters there),
    else `directory` itself. Only safetensors is
    read; a pickle file (`adapter_model.bin`) is refused. Nothing is checked against a model.
    """
    folder = Path(directory)
    if folder.is_file():
        raise ValueError(
            f"{folder} is a file; pass the adapter folder that holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}."
        )
    if not folder.is_dir():
        raise AdapterFileNotFoundError(f"PEFT adapter folder {folder} does not exist.")
    if (
        adapter_name
        and adapter_name != "default"
        and (folder / check_adapter_name(adapter_name) / CONFIG_NAME).is_file()
    ):
        folder = folder / adapter_name
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileNotFoundError(
            f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder (PEFT's save_pretrained "
            "writes adapter_config.json next to adapter_model.safetensors)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "SHIRA":
        raise ValueError(
            f"{config_path}: peft_type is {peft_type!r}, not 'SHIRA'. This is not a SHiRA "
            "adapter; load it with PEFT itself (PeftModel.from_pretrained)."
        )
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = [n for n in _PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise ValueError(
                f"{folder} holds {pickles[0]} (a pickle file), which is never loaded: it can run "
                "code. Re-save it as safetensors with PEFT: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(out, safe_serialization=True)."
            )
        raise AdapterFileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    return folder, config, _read_safetensors(weights_path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                try:
                    out[key] = handle.get_tensor(key)
                except TypeError:  # bfloat16 / fp8: numpy has no name for them
                    with safe_open(str(path), framework="flax") as flax_handle:
                        out[key] = np.asarray(flax_handle.get_tensor(key))
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "written by something else. Re-save the adapter with PEFT."
        ) from err
    return out


def split_peft_keys(
    tensors: Mapping[str, np.ndarray], *, source: str = "adapter file"
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], list[str]]:
    """Sort a PEFT SHiRA state dict into `(layers, other, stray)`.

    * `layers`: module path -> {"values": shira_weight, "indices": shira_indices (torch order)};
    * `other`: key without `base_model.model.` -> array (modules_to_save params);
    * `stray`: keys like `...shira_indices.<other adapter>` that old PEFT versions left.

    Raises a ValueError for a key without the `base_model.model.` prefix and for a layer with
    values but no indices (PEFT would silently regenerate a mask) or indices but no values.
    """
    weights: dict[str, np.ndarray] = {}
    indices: dict[str, np.ndarray] = {}
    other: dict[str, np.ndarray] = {}
    stray: list[str] = []
    for key, array in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise ValueError(
                f"{source}: key {key!r} does not start with {KEY_PREFIX!r}; this is not a state "
                "dict that PEFT's save_pretrained wrote."
            )
        rest = key[len(KEY_PREFIX) :]
        path, _, leaf = rest.rpartition(".")
        parent = path.rpartition(".")[2]
        if leaf == WEIGHT:
            weights[path] = array
        elif leaf == INDICES:
            indices[path] = array
        elif parent in (WEIGHT, INDICES):  # `<layer>.shira_indices.<adapter>`: not ours
            stray.append(key)
        else:
            other[rest] = array
    for path in sorted(set(weights) - set(indices)):
        raise ValueError(
            f"{source}: layer {path} has {KEY_PREFIX}{path}.{WEIGHT} but no "
            f"{KEY_PREFIX}{path}.{INDICES}. PEFT would silently regenerate a random mask from "
            "the config's seed and put the values in the wrong places; refusing. Save the "
            "adapter with a PEFT version that writes shira_indices (>= 0.17)."
        )
    for path in sorted(set(indices) - set(weights)):
        raise ValueError(
            f"{source}: layer {path} has {INDICES} but no {KEY_PREFIX}{path}.{WEIGHT}; the "
            "file is incomplete. Re-save the adapter."
        )
    layers = {p: {"values": weights[p], "indices": indices[p]} for p in sorted(weights)}
    return layers, other, stray


def _warn_stray(stray: Iterable[str], source: str) -> None:
    stray = list(stray)
    if stray:
        warnings.warn(
            f"{source}: ignoring {len(stray)} key(s) of other adapters that old PEFT versions "
            f"saved by mistake: {stray[:5]}{' ...' if len(stray) > 5 else ''}",
            UserWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- load


def load_peft_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    dtype: Any = None,
    stack_name: str = "layers",
) -> None:
    """Load a PEFT SHiRA adapter folder into an NNX model, in place (PEFT -> JAX).

    Module paths in the file (`base_model.model.<path>.shira_weight`) must exist in `model`
    under the same dotted names. Indices are converted from torch order to kernel layout;
    integral float indices are accepted and duplicate positions summed. `modules_to_save`
    params are copied into the adapter's own copy of those modules (transposed for Linear).
    Keys `<prefix>.<stack_name>.N.<rest>` of a scan-stacked layer `<prefix>.<stack_name>.<rest>`
    are restacked into its `[L, nnz]` adapter: the file must hold every layer, each with the
    same number of entries (after duplicate positions are summed).

    Everything is read and checked before the model changes: on any error the model is
    exactly as it was.

    Args:
        model: an NNX model whose module paths match the adapter's (wrapped or not).
        directory: the PEFT adapter folder. For `adapter_name` != "default", a subfolder
            `directory/<adapter_name>` holding an adapter is preferred (PEFT's layout).
        adapter_name: the name the adapter gets in `model`.
        dtype: dtype of the loaded SHiRA values (default float32, as PEFT stores them).
        stack_name: the attribute holding scan-stacked blocks (`layers.N` in the file).

    Raises:
        AdapterFileNotFoundError: (a FileNotFoundError and a ValueError) no folder,
            adapter_config.json or adapter_model.safetensors.
        ValueError: not SHiRA, pickle file, unreadable file, bad shapes or ranges, keys for
            modules that do not exist, missing keys.
        KeyError: a layer path or adapter name clash.
    """
    check_adapter_name(adapter_name)
    folder, raw_config, tensors = read_peft_dir(directory, adapter_name)
    source = str(folder / WEIGHTS_NAME)
    try:
        config = ShiraConfig.from_dict(raw_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: bad SHiRA config: {err}") from err
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}.")
    layers, other, stray = split_peft_keys(tensors, source=source)
    if not layers:
        raise ValueError(f"{source} has no {WEIGHT}/{INDICES} keys: no SHiRA layer to load.")

    if adapter_name in adapter_names(model):
        raise KeyError(
            f"The model already has an adapter {adapter_name!r}; pick another adapter_name or "
            "sj.delete_adapter(model, name) first."
        )
    modules = dict(named_modules(model))
    indices: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, str]] = {}  # stacked module path -> {layer: path in the file}
    for path, arrays in layers.items():
        shape, hit = _target_kernel_shape(modules, path, source, stack_name)
        indices[path], values[path] = torch_to_kernel_order(
            arrays["indices"], arrays["values"], shape, layer_name=f"{path} in {source}"
        )
        if hit is not None:
            stacks.setdefault(hit[0], {})[hit[1]] = path
    _check_stacks(modules, stacks, indices, source, stack_name)
    module_values = _check_modules_to_save(modules, config, other, adapter_name, source)
    _warn_stray(stray, source)

    # ---- everything is checked; apply_shira validates again before it touches the model.
    if stacks:
        stacked.apply_shira_stacked(
            model, config, adapter_name, indices=indices, values=values, stack_name=stack_name
        )
    else:
        apply_shira(model, config, adapter_name, indices=indices, values=values)
    if dtype is not None:
        targets = set(values) | set(stacks)
        for path, layer in shira_layers(model):
            if path in targets:
                variable = layer.shira_weight[adapter_name]
                variable.set_value(variable[...].astype(dtype))
    for path, params in module_values.items():
        copy = get_submodule(model, path).modules_to_save[adapter_name]
        for var_path, array in params.items():
            _variable(copy, var_path)[...] = array


def _target_kernel_shape(
    modules: dict[str, nnx.Module], path: str, source: str, stack_name: str
) -> tuple[tuple[int, int], tuple[str, int] | None]:
    """`(in, out)` of the layer a file path names, and `(stacked path, layer)` when that path
    is one layer (`stack_name.N`) of a scan-stacked layer of the model, else None."""
    hit = None if path in modules else stacked.stacked_path(path, stack_name)
    node = None if hit is None else modules.get(hit[0])
    base = node.base_layer if isinstance(node, ShiraDense) else node
    if not (isinstance(base, nnx.Linear) and stacked.is_stacked(base)):
        return _linear_kernel_shape(modules, path, source), None
    n_layers, n_in, n_out = (int(s) for s in base.kernel.shape)
    if hit[1] >= n_layers:
        raise KeyError(
            f"{source}: key {KEY_PREFIX}{path}.{WEIGHT} is for layer {hit[1]} of the scan-stacked "
            f"layer {hit[0]!r}, which has {n_layers} layers. Was the adapter made for a deeper "
            "model?"
        )
    return (n_in, n_out), hit


def _check_stacks(
    modules: dict[str, nnx.Module],
    stacks: Mapping[str, Mapping[int, str]],
    indices: Mapping[str, np.ndarray],
    source: str,
    stack_name: str,
) -> None:
    """A stacked layer holds one `[L, nnz]` adapter: every layer present, one nnz."""
    for path, found in stacks.items():
        n_layers = stacked.num_layers(modules[path])
        missing = sorted(set(range(n_layers)) - set(found))
        if missing:
            names = [stacked.unstacked_path(path, i, stack_name) for i in missing[:3]]
            raise ValueError(
                f"{source}: the scan-stacked layer {path!r} has {n_layers} layers, but the file "
                f"has no SHiRA keys for layers {missing} (e.g. {KEY_PREFIX}{names[0]}.{WEIGHT}). "
                "A stacked layer gets an adapter in every layer; load it into a model with "
                "per-layer modules instead."
            )
        sizes = {i: int(indices[found[i]].shape[1]) for i in sorted(found)}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"{source}: the layers of the scan-stacked layer {path!r} have different numbers "
                f"of SHiRA entries (layer: nnz {sizes}, counted after duplicate positions are "
                "summed); a stacked adapter holds one [L, nnz] array, so every layer needs the "
                "same nnz. Load it into a model with per-layer modules instead."
            )


def _linear_kernel_shape(modules: dict[str, nnx.Module], path: str, source: str) -> tuple[int, int]:
    if path not in modules:
        close = [p for p in modules if p.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]][:5]
        raise KeyError(
            f"{source}: key {KEY_PREFIX}{path}.{WEIGHT} is for module {path!r}, which does not "
            f"exist in this model (similar: {close or 'none'}). Was the adapter made for "
            "another architecture? Module paths must equal the HF module names."
        )
    module = modules[path]
    base = module.base_layer if isinstance(module, ShiraDense) else module
    kernel = getattr(base, "kernel", None)
    if isinstance(base, nnx.Linear) and stacked.is_stacked(base):
        raise ValueError(
            f"{source}: SHiRA keys for {path!r}, a scan-stacked layer; PEFT files name its layers "
            "one by one (`<prefix>.layers.N.<rest>`), never the stacked path."
        )
    if not isinstance(base, nnx.Linear) or kernel is None or kernel.ndim != 2:
        raise ValueError(
            f"{source}: SHiRA keys for {path!r}, but that module is a {type(module).__name__}, "
            "not an nnx.Linear; SHiRA adapts Linear layers only."
        )
    return int(kernel.shape[0]), int(kernel.shape[1])


def _check_modules_to_save(
    modules: dict[str, nnx.Module],
    config: ShiraConfig,
    other: dict[str, np.ndarray],
    adapter_name: str,
    source: str,
) -> dict[str, dict[str, np.ndarray]]:
    """module path -> {flax var path: array in the model's layout and dtype}; checks all."""
    if not config.modules_to_save:
        if other:
            keys = [KEY_PREFIX + k for k in sorted(other)][:5]
            raise ValueError(
                f"{source}: keys {keys} are neither SHiRA keys nor modules_to_save params (the "
                "config lists no modules_to_save). Refusing to guess; fix the config or file."
            )
        return {}
    try:
        paths = select_modules_to_save(modules, config.modules_to_save)
    except ValueError as err:
        raise ValueError(f"{source}: {err} Was the adapter made for another model?") from err
    left = dict(other)
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in paths:
        module = modules[path]
        if isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                raise KeyError(
                    f"modules_to_save {path} already has a copy for adapter {adapter_name!r}."
                )
            module = module.original_module
        params = {}
        for name, (var_path, transpose, variable) in _module_params(module, path).items():
            key = f"{path}.{name}"
            if key not in left:
                raise ValueError(
                    f"{source}: modules_to_save module {path} needs key {KEY_PREFIX}{key}, which "
                    "is missing (PEFT would keep the base values and only warn); refusing."
                )
            array = np.asarray(left.pop(key))
            want = tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)
            if array.shape != want:
                raise ValueError(
                    f"{source}: {KEY_PREFIX}{key} has shape {array.shape}; module {path} needs "
                    f"{want} (torch layout). The adapter was made for another model size."
                )
            array = array.T if transpose else array
            params[var_path] = np.asarray(array, dtype=variable[...].dtype)
        out[path] = params
    if left:
        keys = [KEY_PREFIX + k for k in sorted(left)][:5]
        raise ValueError(
            f"{source}: keys {keys} belong to no SHiRA layer or modules_to_save module of this "
            f"model (modules_to_save matched {paths}). Check the base model."
        )
    return out


# ----------------------------------------------------------------------------- save


def save_peft_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    stack_name: str = "layers",
) -> None:
    """Save one adapter as a PEFT SHiRA folder that `PeftModel.from_pretrained` loads (JAX -> PEFT).

    Writes PEFT's exact layout: `adapter_model.safetensors` (float32 `shira_weight [nnz]`, int32
    `shira_indices [2, nnz]` in torch order, modules_to_save params with torch names, metadata
    `{"format": "pt"}`) and `adapter_config.json`. As PEFT's `save_pretrained`, an adapter not
    named "default" goes to the subfolder `directory/<adapter_name>`. Each file is written to
    a temporary name in its folder and renamed into place. A scan-stacked layer
    (`<prefix>.<stack_name>.<rest>`, values `[L, nnz]`) is written as L per-layer keys
    `<prefix>.<stack_name>.N.<rest>`, as PEFT names the layers of the torch `nn.ModuleList`.

    Args:
        model: an NNX model with the adapter.
        directory: output folder (created).
        adapter_name: which adapter; also the subfolder name unless "default".
        base_model_name_or_path: written to the config (default: the adapter config's).
        stack_name: the attribute holding scan-stacked blocks (`layers.N` in the file).
    """
    check_adapter_name(adapter_name)
    arrays = adapter_arrays(model, adapter_name)
    found = {p: m for p, m in shira_layers(model) if p in arrays}
    layers, shapes = _per_layer_arrays(found, arrays, stack_name)
    modules = saved_module_arrays(model, adapter_name)
    _refuse_stacked_modules_to_save(found, modules, stack_name)
    config = adapter_configs(model).get(adapter_name)
    ranks = {p: m.r[adapter_name] for p, m in found.items()}
    if config is None:
        config = ShiraConfig(
            r=max(ranks.values()), mask_type="custom", mask_fn=_no_mask_fn, target_modules=()
        )
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"Adapter {adapter_name!r} has different r per layer ({ranks}); PEFT's config holds "
            "one r for all layers."
        )
    r = next(iter(ranks.values()))
    check_peft_budget(shapes, layers, r)
    tensors = peft_tensors(layers, shapes, modules)
    targets = _peft_targets(model, config, list(layers), stack_name)
    data = peft_config_dict(config, targets=targets, r=r)
    if base_model_name_or_path is not None:
        data["base_model_name_or_path"] = base_model_name_or_path
    write_peft_dir(peft_output_folder(directory, adapter_name), tensors, data)


def _per_layer_arrays(
    found: Mapping[str, ShiraDense],
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    stack_name: str,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, tuple[int, int]]]:
    """`(path -> {"values", "indices"}, path -> (in, out))` with PEFT's per-layer paths: each
    scan-stacked layer is split into `stack_name.N` paths; other layers keep theirs."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for path, layer in found.items():
        shape = tuple(layer.base_layer.kernel.shape)
        if not stacked.is_stacked(layer):
            layers[path], shapes[path] = dict(arrays[path]), shape
            continue
        for i in range(shape[0]):
            name = stacked.unstacked_path(path, i, stack_name)
            layers[name] = {k: v[i] for k, v in arrays[path].items()}
            shapes[name] = shape[1:]
    return layers, shapes


def _refuse_stacked_modules_to_save(
    found: Mapping[str, ShiraDense], modules: Mapping[str, Any], stack_name: str
) -> None:
    """A modules_to_save copy inside (or around) the scan-stacked blocks holds `[L, ...]`
    params, which no PEFT key names; refuse instead of writing a file PEFT cannot load."""
    roots = set()
    for path, layer in found.items():
        parts = path.split(".")
        if stacked.is_stacked(layer) and stack_name in parts:
            roots.add(".".join(parts[: parts.index(stack_name) + 1]))
    for path in modules:
        for root in roots:
            if path == root or path.startswith(root + ".") or root.startswith(path + "."):
                raise ValueError(
                    f"modules_to_save {path} overlaps the scan-stacked blocks at {root}; their "
                    "[L, ...] params have no per-layer PEFT keys. Only modules outside the stack "
                    "can be saved for PEFT."
                )


def peft_output_folder(directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT's save_pretrained puts `adapter_name`: `directory` for "default", else the
    subfolder `directory/<adapter_name>`. The name is checked (no separators, dots, "..") and
    an existing subfolder that is a symlink is refused, so a write never leaves `directory`."""
    check_adapter_name(adapter_name)
    root = Path(directory)
    if adapter_name == "default":
        return root
    folder = root / adapter_name
    if folder.is_symlink() or folder.resolve().parent != root.resolve():
        raise ValueError(
            f"Refusing to write adapter {adapter_name!r} to {folder}: it is a symlink."
        )
    return folder


def _no_mask_fn(*_: Any, **__: Any) -> Any:
    raise ValueError("This adapter's indices come from its file; it has no mask_fn.")


def check_peft_budget(
    kernel_shapes: Mapping[str, tuple[int, int]],
    layers: Mapping[str, Mapping[str, np.ndarray]],
    r: int,
) -> None:
    """PEFT sizes each `shira_weight` as exactly `r * (in + out)` and refuses other sizes on
    load; raise a clear error here instead of writing a file PEFT cannot read."""
    for path, arrays in layers.items():
        n_in, n_out = kernel_shapes[path]
        nnz = int(np.shape(arrays["values"])[0])
        if nnz != r * (n_in + n_out):
            raise ValueError(
                f"Layer {path}: {nnz} SHiRA entries, but PEFT needs exactly r * (in + out) = "
                f"{r} * ({n_in} + {n_out}) = {r * (n_in + n_out)} per layer (its shira_weight has "
                "that fixed size). Such an adapter (e.g. a file whose duplicate positions were "
                "summed, or a custom mask of another size) can only be saved with "
                "shira_jax.save_adapter."
            )


def peft_tensors(
    layers: Mapping[str, Mapping[str, np.ndarray]],
    kernel_shapes: Mapping[str, tuple[int, int]],
    modules: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """PEFT's state dict from kernel-layout arrays.

    Args:
        layers: path -> {"values": [nnz], "indices": kernel-layout [2, nnz]}.
        kernel_shapes: path -> `(in, out)`.
        modules: modules_to_save path -> {flax var path: array} (as
            `shira_jax.checkpoint.saved_module_arrays` gives).
    """
    out: dict[str, np.ndarray] = {}
    for path, arrays in layers.items():
        idx, val = kernel_to_torch_order(arrays["indices"], arrays["values"], kernel_shapes[path])
        out[f"{KEY_PREFIX}{path}.{WEIGHT}"] = np.ascontiguousarray(val, dtype=np.float32)
        out[f"{KEY_PREFIX}{path}.{INDICES}"] = idx
    for path, params in (modules or {}).items():
        for var_path, array in params.items():
            array = np.asarray(array)
            name, transpose = torch_param_name(var_path, array.ndim)
            key = f"{KEY_PREFIX}{path}.{name}"
            if key in out:
                raise ValueError(f"modules_to_save {path}: two variables map to {key}.")
            out[key] = np.ascontiguousarray(array.T if transpose else array)
    return out


def peft_config_dict(
    config: ShiraConfig, *, targets: Any = None, r: int | None = None
) -> dict[str, Any]:
    """PEFT's `adapter_config.json` fields for `config` (our extra options are left out, as
    PEFT warns about unknown keys). `inference_mode` is True, as PEFT's save_pretrained writes.
    """
    data = config.to_dict()
    data.pop(_EXTRA_KEY, None)
    data["inference_mode"] = True
    if targets is not None:
        data["target_modules"] = targets
    if r is not None:
        data["r"] = int(r)
    if isinstance(data.get("target_modules"), tuple):
        data["target_modules"] = sorted(data["target_modules"])
    return dict(sorted(data.items()))


def _peft_targets(
    model: nnx.Module, config: ShiraConfig, paths: list[str], stack_name: str = "layers"
) -> Any:
    """The config's target_modules if they select exactly the adapter's layers, else the list
    of layer paths (so that PEFT wraps exactly the layers that the file has keys for). Matching
    is done on the per-layer names PEFT sees (scan-stacked layers as `stack_name.N` paths)."""
    if config.target_modules != ():
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        try:
            linear = []
            for p, m in named_modules(model):
                if not isinstance(m, (nnx.Linear, ShiraDense)):
                    continue
                if stacked.is_stacked(m):
                    n = stacked.num_layers(m)
                    linear += [stacked.unstacked_path(p, i, stack_name) for i in range(n)]
                else:
                    linear.append(p)
            chosen = resolve_targets(config, linear, model_type=model_type)
        except ValueError:
            chosen = None
        if chosen is not None and sorted(chosen) == sorted(paths):
            return config.target_modules
    return sorted(paths)


def write_peft_dir(
    folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `folder`, atomically
    per file (temporary file in the folder, then `os.replace`)."""
    from safetensors.numpy import save

    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"Cannot write an adapter into {folder}: it is a file.")
    folder.mkdir(parents=True, exist_ok=True)
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, {"format": "pt"})
    _atomic_write(folder / WEIGHTS_NAME, blob)
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    _atomic_write(folder / CONFIG_NAME, text.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
