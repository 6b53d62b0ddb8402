"""HF PEFT SHiRA adapter folders <-> `AdapterState` (and so <-> NNX models).

A PEFT SHiRA directory holds `adapter_config.json` and `adapter_model.safetensors` (metadata
`{"format": "pt"}`). Its keys carry no adapter name:

* `base_model.model.<module path>.shira_weight`: float32 `[nnz]`;
* `base_model.model.<module path>.shira_indices`: int32 `[2, nnz]` in TORCH order (row 0 the
  output index, row 1 the input index of the torch weight `[out, in]`);
* `base_model.model.<module path>.<param>`: a `modules_to_save` module's own copy, with
  torch's parameter names (`weight` `[out, in]`, `bias`; `weight` of an embedding or norm).

`bridge.conventions` holds every rule of that mapping (key names, index order, transposes).
`read_state` / `write_state` map a folder to and from a `shira_jax.state.AdapterState` with
PEFT's per-layer paths; `load_peft_adapter` / `save_peft_adapter` add `state.inject` /
`state.extract`. Module paths are the same dotted names on both sides
(`model.layers.0.self_attn.q_proj`), except on Tunix models (`bridge.tunix`): their layers
(`layers.0.attn.q_proj`, Gemma3's fused `kv_einsum`) are renamed to and from HF's paths, a
fused kernel's HF linears being column blocks of it.

Scan-stacked layers (one `ShiraDense` with values `[L, nnz]` for the `nnx.vmap`-created
blocks under `stack_name`, "layers" by default) are written one layer per key,
`<prefix>.layers.N.<rest>`, exactly as PEFT names the layers of the equivalent torch
`nn.ModuleList`; a load restacks them (every layer 0..L-1 must be present, with the same
number of entries, as a stacked adapter holds one `[L, nnz]` array).

Only safetensors is read (never pickle). A load reads and checks everything first; on any
error the model is left exactly as it was. Each file is written to a temporary name in the
target folder and renamed into place.

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
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from bridge import tunix
from bridge.conventions import (
    INDICES,
    KEY_PREFIX,
    WEIGHT,
    kernel_to_torch_order,
    to_torch,
    torch_names,
    torch_param_name,
    torch_to_kernel_order,
)
from shira_jax import atomic
from shira_jax.config import ALL_LINEAR, EXTRA_KEY, ShiraConfig, resolve_targets
from shira_jax.errors import (
    AdapterFileNotFoundError,
    AdapterKeyError,
    AdapterLoadError,
    AdapterTargetError,
    check_dotted_path,
    check_regular_file,
    read_json_object,
)
from shira_jax.kernels import kernel_view
from shira_jax.layer import unwrap
from shira_jax.model import named_modules
from shira_jax.modules_to_save import ModulesToSave, select_modules_to_save
from shira_jax.stacked import stacked_path, unstacked_path
from shira_jax.state import AdapterState, LayerState, extract, inject, module_variables
from shira_jax.util import check_adapter_name

__all__ = [
    "CONFIG_NAME",
    "AdapterFileNotFoundError",
    "AdapterLoadError",
    "AdapterTargetError",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "check_peft_budget",
    "check_targets",
    "kernel_to_torch_order",
    "load_peft_adapter",
    "peft_config_dict",
    "peft_output_folder",
    "peft_tensors",
    "read_peft_dir",
    "read_state",
    "read_tunix_state",
    "save_peft_adapter",
    "split_peft_keys",
    "torch_param_name",
    "torch_to_kernel_order",
    "write_peft_dir",
    "write_state",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


#: Element types numpy (or, for BF16, ml_dtypes) reads; others (F8_*, F4, ...) are refused.
_SAFETENSORS_DTYPES = frozenset(
    ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64")
)


# ----------------------------------------------------------------------------- files


def _recover(folder: Path) -> None:
    """Roll a complete interrupted save in `folder` forward (`atomic.recover_files`)."""
    try:
        atomic.recover_files(folder)
    except OSError as err:
        raise AdapterLoadError(f"{folder}: cannot finish an interrupted save ({err}).") from err


def read_peft_dir(
    directory: str | os.PathLike, adapter_name: str | None = None
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """Read a PEFT adapter folder: `(folder, adapter_config dict, {key: numpy array})`.

    For an `adapter_name` other than "default", the subfolder `directory/<adapter_name>` is
    read when it holds an adapter (PEFT's save_pretrained puts non-default adapters there),
    else `directory` itself. A `save_peft_adapter` that a kill interrupted is finished first
    (`shira_jax.atomic.recover_files`). Only regular files are read, and only safetensors (a
    pickle file, `adapter_model.bin`, is refused). Nothing is checked against a model. Any
    problem raises `AdapterLoadError` naming the file.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise AdapterLoadError(
            f"{folder} is a file; pass the adapter folder that holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}."
        )
    if not folder.is_dir():
        raise AdapterFileNotFoundError(f"PEFT adapter folder {folder} does not exist.")
    if adapter_name and adapter_name != "default":
        sub = folder / check_adapter_name(adapter_name)
        if sub.is_dir() and not sub.is_symlink():
            _recover(sub)  # a first save there may have been killed right after its commit
        if os.path.lexists(sub / CONFIG_NAME):
            folder = sub
    _recover(folder)
    config_path = folder / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise AdapterFileNotFoundError(
            f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder (PEFT's save_pretrained "
            "writes adapter_config.json next to adapter_model.safetensors)."
        )
    config = read_json_object(config_path, "PEFT adapter config")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "SHIRA":
        raise AdapterLoadError(
            f"{config_path}: peft_type is {str(peft_type)[:100]!r}, not 'SHIRA'. This is not a "
            "SHiRA adapter; load it with PEFT itself (PeftModel.from_pretrained)."
        )
    weights_path = folder / WEIGHTS_NAME
    if not os.path.lexists(weights_path):
        pickles = [n for n in _PICKLE_NAMES if os.path.lexists(folder / n)]
        if pickles:
            raise AdapterLoadError(
                f"{folder} holds {pickles[0]} (a pickle file), which is never loaded: it can run "
                "code. Re-save it as safetensors with PEFT: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(out, safe_serialization=True)."
            )
        raise AdapterFileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    return folder, config, _read_safetensors(weights_path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a regular safetensors file as numpy; unknown dtypes are refused."""
    from safetensors import SafetensorError, safe_open

    check_regular_file(path, "safetensors file")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise AdapterLoadError(
                        f"{path}: key {key!r} has dtype {dtype}, which is not read (allowed: "
                        f"{sorted(_SAFETENSORS_DTYPES)})."
                    )
                try:
                    out[key] = handle.get_tensor(key)
                except TypeError:  # bfloat16: numpy has no name for it
                    with safe_open(str(path), framework="flax") as flax_handle:
                        out[key] = np.asarray(flax_handle.get_tensor(key))
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(
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
            raise AdapterLoadError(
                f"{source}: key {key!r} does not start with {KEY_PREFIX!r}; this is not a state "
                "dict that PEFT's save_pretrained wrote."
            )
        rest = check_dotted_path(key[len(KEY_PREFIX) :], source, f"key {key[:200]!r}")
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
        raise AdapterLoadError(
            f"{source}: layer {path} has {KEY_PREFIX}{path}.{WEIGHT} but no "
            f"{KEY_PREFIX}{path}.{INDICES}. PEFT would silently regenerate a random mask from "
            "the config's seed and put the values in the wrong places; refusing. Save the "
            "adapter with a PEFT version that writes shira_indices (>= 0.17)."
        )
    for path in sorted(set(indices) - set(weights)):
        raise AdapterLoadError(
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


# ----------------------------------------------------------------------------- models


def load_peft_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    dtype: Any = None,
    stack_name: str = "layers",
    allow_nonfinite: bool = False,
) -> None:
    """Load a PEFT SHiRA adapter folder into an NNX model, in place (PEFT -> JAX).

    `read_state` (checked against `model`), `.restacked(model)`, then `state.inject`.
    Module paths in the file (`base_model.model.<path>.shira_weight`) must exist in `model`
    under the same dotted names. Indices are converted from torch order to kernel layout;
    integral float indices are accepted and duplicate positions summed. `modules_to_save`
    params are copied into the adapter's own copy of those modules (transposed for Linear).
    Keys `<prefix>.<stack_name>.N.<rest>` of a scan-stacked layer `<prefix>.<stack_name>.<rest>`
    are restacked into its `[L, nnz]` adapter: the file must hold every layer, each with the
    same number of entries (after duplicate positions are summed).

    On a Tunix model (`bridge.tunix.is_tunix_model`) the file's HF paths are mapped to its
    Tunix modules; the HF linears of a fused kernel (Gemma3 `kv_einsum`) become one adapter
    layer, each still checked at `r * (in + out)` of its own HF shape.

    Everything is read and checked before the model changes: on any error the model is
    exactly as it was.

    Args:
        model: an NNX model whose module paths match the adapter's (wrapped or not).
        directory: the PEFT adapter folder. For `adapter_name` != "default", a subfolder
            `directory/<adapter_name>` holding an adapter is preferred (PEFT's layout).
        adapter_name: the name the adapter gets in `model`.
        dtype: dtype of the loaded SHiRA values (default float32, as PEFT stores them).
        stack_name: the attribute holding scan-stacked blocks (`layers.N` in the file).
        allow_nonfinite: load NaN/inf values (refused by default).

    Raises:
        AdapterLoadError: (a ValueError) any bad file: not SHiRA, pickle file, unreadable or
            not a regular file, bad JSON, bad dtypes, shapes, sizes or ranges, keys for
            modules that do not exist, missing keys, NaN/inf values. Its subclasses
            AdapterFileNotFoundError (also a FileNotFoundError: no folder,
            adapter_config.json or adapter_model.safetensors) and AdapterKeyError (also a
            KeyError: a key for a layer the model does not have).
        KeyError: an adapter name clash with the model.
    """
    check_adapter_name(adapter_name)
    if tunix.is_tunix_model(model):  # HF paths in the file, Tunix paths in the model
        folder, state = read_tunix_state(directory, adapter_name, model)
        source = str(folder / WEIGHTS_NAME)
    else:
        folder, state = read_state(directory, adapter_name, model=model, stack_name=stack_name)
        source = str(folder / WEIGHTS_NAME)
        state = state.restacked(model, stack_name)
    inject(
        model,
        adapter_name,
        state,
        dtype=dtype,
        source=source,
        allow_nonfinite=allow_nonfinite,
    )


def save_peft_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    stack_name: str = "layers",
) -> None:
    """Save one adapter as a PEFT SHiRA folder that `PeftModel.from_pretrained` loads (JAX -> PEFT).

    `state.extract`, then `write_state` (which splits scan-stacked layers into PEFT's
    per-layer keys). As PEFT's `save_pretrained`, an adapter not named "default" goes to the
    subfolder `directory/<adapter_name>`. On a Tunix model the layers get HF's paths and a
    fused kernel's adapter is split per HF linear (`bridge.tunix.to_hf_state`; one made on
    the fused kernel itself does not split into PEFT's sizes and is refused).

    Args:
        model: an NNX model with the adapter.
        directory: output folder (created).
        adapter_name: which adapter; also the subfolder name unless "default".
        base_model_name_or_path: written to the config (default: the adapter config's).
        stack_name: the attribute holding scan-stacked blocks (`layers.N` in the file).
    """
    check_adapter_name(adapter_name)
    state, names_from = extract(model, adapter_name), model
    if tunix.is_tunix_model(model):  # Tunix paths in the model, HF paths in the file
        state, names_from = tunix.to_hf_state(state, model), None
    write_state(
        directory,
        state,
        adapter_name,
        model=names_from,
        base_model_name_or_path=base_model_name_or_path,
        stack_name=stack_name,
    )


# ----------------------------------------------------------------------------- read


def read_state(
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    model: nnx.Module | None = None,
    kernel_shapes: Mapping[str, tuple[int, int]] | None = None,
    stack_name: str = "layers",
) -> tuple[Path, AdapterState]:
    """A PEFT SHiRA folder as `(folder read, AdapterState)`, with PEFT's per-layer paths.

    A PEFT file does not store kernel shapes (its largest index only bounds them from below),
    so they come from `model` (any NNX model with the same module paths; it is not changed)
    or `kernel_shapes={path: (in, out)}` (torch's `weight.shape[::-1]`). Indices are turned
    into kernel layout (`bridge.conventions.torch_to_kernel_order`). With `model`, the
    per-layer keys of its scan-stacked layers are checked (every layer, one nnz: ready for
    `.restacked(model)`), and `modules_to_save` params are renamed to Flax variable paths in
    Flax layout and the model's dtype; without `model` a file with such params is refused.
    """
    if model is None and kernel_shapes is None:
        raise ValueError(
            "A PEFT file does not store kernel shapes: pass model=<NNX model with the same "
            "module paths> or kernel_shapes={path: (in, out)}."
        )
    folder, raw_config, tensors = read_peft_dir(directory, adapter_name)
    source = str(folder / WEIGHTS_NAME)
    try:
        config = ShiraConfig.from_dict(raw_config)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as err:
        raise AdapterLoadError(f"{folder / CONFIG_NAME}: bad SHiRA config: {err}") from err
    found, other, stray = split_peft_keys(tensors, source=source)
    if not found:
        raise AdapterLoadError(f"{source} has no {WEIGHT}/{INDICES} keys: no SHiRA layer to load.")
    if other and model is None:
        raise AdapterLoadError(
            f"{source} has modules_to_save params ({sorted(other)[:3]}...); converting them "
            "needs model=... to know each module's Flax variable names and layouts."
        )
    modules = {} if model is None else dict(named_modules(model))
    layers = {}
    for path, arrays in found.items():
        shape = (
            _given_shape(kernel_shapes, path, source)
            if kernel_shapes is not None
            else _model_shape(modules, path, source, stack_name)
        )
        try:
            idx, val = torch_to_kernel_order(
                arrays["indices"], arrays["values"], shape, layer_name=f"{path} in {source}"
            )
        except ValueError as err:
            raise AdapterLoadError(str(err)) from err
        layers[path] = LayerState(idx, val, shape, config.r)
    _check_stacks(modules, layers, source, stack_name)
    for path, arrays in found.items():
        _check_peft_size(arrays, layers[path].kernel_shape, config.r, f"{source}: layer {path}")
    if model is not None:
        check_targets(
            config, layers, _linear_paths(model, stack_name), source,
            model_type=_model_type(model), unsupported=_other_modules(model),
        )
    saved = _module_arrays(modules, config, other, source)
    _warn_stray(stray, source)
    return folder, AdapterState(config, layers, saved)


def read_tunix_state(
    directory: str | os.PathLike, adapter_name: str, model: nnx.Module
) -> tuple[Path, AdapterState]:
    """`read_state` for a Tunix model: the file's HF paths checked against the HF linears the
    model holds (`bridge.tunix.hf_kernel_shapes`), then mapped to its Tunix paths."""
    shapes = tunix.hf_kernel_shapes(model)
    folder, state = read_state(directory, adapter_name, kernel_shapes=shapes)
    source = str(folder / WEIGHTS_NAME)
    check_targets(state.config, state.layers, shapes, source, model_type=_model_type(model))
    return folder, tunix.to_tunix_state(state, model, source=source)


def check_targets(
    config: ShiraConfig,
    file_layers: Iterable[str],
    candidates: Iterable[str],
    source: str,
    *,
    model_type: str | None = None,
    unsupported: Mapping[str, str] | None = None,
) -> None:
    """Refuse a file whose SHiRA layers are not exactly the ones its `target_modules` select
    among the model's `candidates` (PEFT's per-layer paths): PEFT would wrap the missing ones
    with their initial values and skip the extra keys, warning at most. A selection of a module
    SHiRA cannot wrap is an `AdapterTargetError` (a TypeError too, as in PEFT)."""
    try:
        selected = set(
            resolve_targets(config, candidates, model_type=model_type, unsupported=unsupported)
        )
    except TypeError as err:
        raise AdapterTargetError(f"{source}: {err}") from err
    except ValueError as err:
        raise AdapterLoadError(f"{source}: target_modules select no layer here: {err}") from err
    have = set(file_layers)
    missing, extra = sorted(selected - have), sorted(have - selected)
    targets = config.target_modules
    if missing:
        raise AdapterLoadError(
            f"{source}: target_modules {targets!r} select {len(missing)} layer(s) of this model "
            f"that the file has no keys for, e.g. {missing[:3]} (PEFT would adapt them with "
            "their initial values and only warn). Was the adapter made for another model, e.g. "
            "one with fewer layers?"
        )
    if extra:
        raise AdapterLoadError(
            f"{source}: the file has keys for {len(extra)} layer(s) that target_modules "
            f"{targets!r} does not select, e.g. {extra[:3]} (PEFT would not load them). Make "
            "target_modules in adapter_config.json name every layer the file holds."
        )


def _model_type(model: nnx.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _other_modules(model: nnx.Module) -> dict[str, str]:
    """Paths and type names of the modules SHiRA cannot wrap (for PEFT's TypeError)."""
    return {
        path: type(module).__name__
        for path, module in named_modules(model)
        if kernel_view(unwrap(module)) is None and not isinstance(module, ModulesToSave)
    }


def _check_peft_size(
    arrays: Mapping[str, np.ndarray], shape: tuple[int, int], r: int, where: str
) -> None:
    """PEFT's own size check: its `shira_weight` of a layer `(in, out)` is exactly
    `r * (in + out)` long, so a file of another size (another base model whose indices
    happen to be in range, or an `r` that disagrees with the arrays) is refused as PEFT does."""
    n_in, n_out = shape
    nnz = int(np.shape(arrays["values"])[-1]) if np.ndim(arrays["values"]) else -1
    if nnz != r * (n_in + n_out):
        raise AdapterLoadError(
            f"{where}: {WEIGHT} has {nnz} entries, but r * (in + out) = {r} * ({n_in} + "
            f"{n_out}) = {r * (n_in + n_out)} for this model's layer (PEFT refuses such a file "
            "by size). Was the adapter made for another base model, or is the config's r wrong?"
        )


def _given_shape(
    kernel_shapes: Mapping[str, tuple[int, int]], path: str, source: str
) -> tuple[int, int]:
    if path not in kernel_shapes:
        raise AdapterKeyError(
            f"{source}: no kernel shape for layer {path!r}; kernel_shapes has "
            f"{sorted(kernel_shapes)[:10]}."
        )
    shape = tuple(int(n) for n in kernel_shapes[path])
    if len(shape) != 2 or min(shape) <= 0:
        raise AdapterLoadError(f"kernel_shapes[{path!r}] must be (in, out), got {shape}.")
    return shape


def _model_shape(
    modules: Mapping[str, nnx.Module], path: str, source: str, stack_name: str
) -> tuple[int, int]:
    """`(in, out)` of the layer a file path names: a module of the model, or one layer
    (`stack_name.N`) of a scan-stacked one."""
    hit = None if path in modules else stacked_path(path, stack_name)
    view = kernel_view(unwrap(modules[hit[0]])) if hit and hit[0] in modules else None
    if view is not None and view.stacked:
        if hit[1] >= view.stack_shape[0]:
            raise AdapterKeyError(
                f"{source}: key {KEY_PREFIX}{path}.{WEIGHT} is for layer {hit[1]} of the "
                f"scan-stacked layer {hit[0]!r}, which has {view.stack_shape[0]} layers. Was the "
                "adapter made for a deeper model?"
            )
        return view.n_in, view.n_out
    if path not in modules:
        close = [p for p in modules if p.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]][:5]
        raise AdapterKeyError(
            f"{source}: key {KEY_PREFIX}{path}.{WEIGHT} is for module {path!r}, which does not "
            f"exist in this model (similar: {close or 'none'}). Was the adapter made for "
            "another architecture? Module paths must equal the HF module names."
        )
    view = kernel_view(unwrap(modules[path]))
    if view is None:
        raise AdapterLoadError(
            f"{source}: SHiRA keys for {path!r}, but that module is a "
            f"{type(modules[path]).__name__}, which SHiRA cannot adapt (not an nnx.Linear)."
        )
    if view.stacked:
        raise AdapterLoadError(
            f"{source}: SHiRA keys for {path!r}, a scan-stacked layer; PEFT files name its layers "
            "one by one (`<prefix>.layers.N.<rest>`), never the stacked path."
        )
    return view.n_in, view.n_out


def _check_stacks(
    modules: Mapping[str, nnx.Module],
    layers: Mapping[str, LayerState],
    source: str,
    stack_name: str,
) -> None:
    """A stacked layer holds one `[L, nnz]` adapter: every layer present, one nnz."""
    stacks: dict[str, dict[int, int]] = {}  # stacked module path -> {layer: nnz}
    for path, layer in layers.items():
        hit = None if path in modules else stacked_path(path, stack_name)
        if hit is not None and hit[0] in modules:
            stacks.setdefault(hit[0], {})[hit[1]] = int(np.shape(layer.values)[-1])
    for path, sizes in stacks.items():
        n_layers = kernel_view(unwrap(modules[path])).stack_shape[0]
        missing = sorted(set(range(n_layers)) - set(sizes))
        if missing:
            names = [unstacked_path(path, i, stack_name) for i in missing[:3]]
            raise AdapterLoadError(
                f"{source}: the scan-stacked layer {path!r} has {n_layers} layers, but the file "
                f"has no SHiRA keys for layers {missing} (e.g. {KEY_PREFIX}{names[0]}.{WEIGHT}). "
                "A stacked layer gets an adapter in every layer; load it into a model with "
                "per-layer modules instead."
            )
        if len(set(sizes.values())) > 1:
            raise AdapterLoadError(
                f"{source}: the layers of the scan-stacked layer {path!r} have different numbers "
                f"of SHiRA entries (layer: nnz {dict(sorted(sizes.items()))}, counted after "
                "duplicate positions are summed); a stacked adapter holds one [L, nnz] array, so "
                "every layer needs the same nnz. Load it into a model with per-layer modules "
                "instead."
            )


def _module_arrays(
    modules: Mapping[str, nnx.Module],
    config: ShiraConfig,
    other: Mapping[str, np.ndarray],
    source: str,
) -> dict[str, dict[str, np.ndarray]]:
    """modules_to_save path -> {Flax variable path: array in Flax layout and the model's dtype};
    every key of `other` must be used."""
    if not config.modules_to_save:
        if other:
            keys = [KEY_PREFIX + k for k in sorted(other)][:5]
            raise AdapterLoadError(
                f"{source}: keys {keys} are neither SHiRA keys nor modules_to_save params (the "
                "config lists no modules_to_save). Refusing to guess; fix the config or file."
            )
        return {}
    if not modules:
        return {}
    try:
        paths = select_modules_to_save(dict(modules), config.modules_to_save)
    except ValueError as err:
        raise AdapterLoadError(f"{source}: {err} Was the adapter made for another model?") from err
    left = dict(other)
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in paths:
        module = modules[path]
        if isinstance(module, ModulesToSave):
            module = module.original_module
        variables = module_variables(module)
        out[path] = {}
        for name, (var_path, transpose) in torch_names(variables, path).items():
            key, variable = f"{path}.{name}", variables[var_path]
            if key not in left:
                raise AdapterLoadError(
                    f"{source}: modules_to_save module {path} needs key {KEY_PREFIX}{key}, which "
                    "is missing (PEFT would keep the base values and only warn); refusing."
                )
            array = np.asarray(left.pop(key))
            want = tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)
            if array.shape != want:
                raise AdapterLoadError(
                    f"{source}: {KEY_PREFIX}{key} has shape {array.shape}; module {path} needs "
                    f"{want} (torch layout). The adapter was made for another model size."
                )
            dtype = variable.get_value().dtype
            out[path][var_path] = np.asarray(array.T if transpose else array, dtype=dtype)
    if left:
        keys = [KEY_PREFIX + k for k in sorted(left)][:5]
        raise AdapterLoadError(
            f"{source}: keys {keys} belong to no SHiRA layer or modules_to_save module of this "
            f"model (modules_to_save matched {paths}). Check the base model."
        )
    return out


# ----------------------------------------------------------------------------- write


def write_state(
    directory: str | os.PathLike,
    state: AdapterState,
    adapter_name: str = "default",
    *,
    model: nnx.Module | None = None,
    base_model_name_or_path: str | None = None,
    stack_name: str = "layers",
) -> Path:
    """Write `state` as a PEFT SHiRA folder; returns the folder (`peft_output_folder`).

    PEFT's exact layout: float32 `shira_weight [nnz]`, int32 `shira_indices [2, nnz]` in torch
    order, modules_to_save params with torch names, metadata `{"format": "pt"}`, and
    `adapter_config.json`. Scan-stacked layers (`<prefix>.<stack_name>.<rest>`, `[L, ...]`)
    become L per-layer keys `<prefix>.<stack_name>.N.<rest>`. The config keeps its
    `target_modules` when they select exactly the adapter's layers (resolved on `model`'s
    layers when given, else on the adapter's own), otherwise lists the layer paths.
    """
    folder = peft_output_folder(directory, adapter_name)
    _refuse_stacked_modules_to_save(state, stack_name)
    state = state.unstacked(stack_name)
    if len(state.ranks) != 1:
        raise ValueError(
            f"Adapter {adapter_name!r} has different r per layer ({sorted(state.ranks)}); "
            "PEFT's config holds one r for all layers."
        )
    check_peft_budget(state)
    data = peft_config_dict(
        state.config, targets=_peft_targets(state, model, stack_name), r=min(state.ranks)
    )
    if base_model_name_or_path is not None:
        data["base_model_name_or_path"] = base_model_name_or_path
    write_peft_dir(folder, peft_tensors(state), data)
    return folder


def _refuse_stacked_modules_to_save(state: AdapterState, stack_name: str) -> None:
    """A modules_to_save copy inside (or around) the scan-stacked blocks holds `[L, ...]`
    params, which no PEFT key names; refuse instead of writing a file PEFT cannot load."""
    roots = set()
    for path, layer in state.layers.items():
        parts = path.split(".")
        if len(layer.kernel_shape) > 2 and stack_name in parts:
            roots.add(".".join(parts[: parts.index(stack_name) + 1]))
    for path in state.modules_to_save:
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



def check_peft_budget(state: AdapterState) -> None:
    """PEFT sizes each `shira_weight` as exactly `r * (in + out)` and refuses other sizes on
    load; raise a clear error here instead of writing a file PEFT cannot read."""
    for path, layer in state.layers.items():
        n_in, n_out = layer.kernel_shape[-2:]
        nnz, r = int(np.shape(layer.values)[-1]), layer.r
        if nnz != r * (n_in + n_out):
            raise ValueError(
                f"Layer {path}: {nnz} SHiRA entries, but PEFT needs exactly r * (in + out) = "
                f"{r} * ({n_in} + {n_out}) = {r * (n_in + n_out)} per layer (its shira_weight has "
                "that fixed size). Such an adapter (e.g. a file whose duplicate positions were "
                "summed, or a custom mask of another size) can only be saved with "
                "shira_jax.save_adapter."
            )


def peft_tensors(state: AdapterState) -> dict[str, np.ndarray]:
    """PEFT's state dict of a per-layer `state` (2-D kernels; see `AdapterState.unstacked`)."""
    out: dict[str, np.ndarray] = {}
    for path, layer in state.layers.items():
        idx, val = kernel_to_torch_order(layer.indices, layer.values, layer.kernel_shape)
        out[f"{KEY_PREFIX}{path}.{WEIGHT}"] = np.ascontiguousarray(val, dtype=np.float32)
        out[f"{KEY_PREFIX}{path}.{INDICES}"] = idx
    for path, params in state.modules_to_save.items():
        for name, array in to_torch(params, f"modules_to_save {path}").items():
            out[f"{KEY_PREFIX}{path}.{name}"] = np.ascontiguousarray(np.asarray(array))
    return out


def peft_config_dict(
    config: ShiraConfig, *, targets: Any = None, r: int | None = None
) -> dict[str, Any]:
    """PEFT's `adapter_config.json` fields for `config` (our extra options are left out, as
    PEFT warns about unknown keys). `inference_mode` is True, as PEFT's save_pretrained writes.
    """
    data = config.to_dict()
    data.pop(EXTRA_KEY, None)
    data["inference_mode"] = True
    if targets is not None:
        data["target_modules"] = targets
    if r is not None:
        data["r"] = int(r)
    if isinstance(data.get("target_modules"), tuple):
        data["target_modules"] = sorted(data["target_modules"])
    return dict(sorted(data.items()))



def _peft_targets(state: AdapterState, model: nnx.Module | None, stack_name: str) -> Any:
    """The config's target_modules if they select exactly the (per-layer) layers of `state`,
    else the sorted layer paths (so PEFT wraps exactly the layers the file has keys for).
    Resolved on `model`'s layers with PEFT's per-layer names when given (stacked layers as
    `stack_name.N` paths), else on the adapter's own layers ("all-linear" is then unknowable)."""
    paths = sorted(state.layers)
    targets = state.config.target_modules
    if targets == () or (model is None and targets == ALL_LINEAR):
        return paths
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        candidates = paths if model is None else _linear_paths(model, stack_name)
        chosen = resolve_targets(state.config, candidates, model_type=model_type)
    except ValueError:
        return paths
    return targets if sorted(chosen) == paths else paths


def _linear_paths(model: nnx.Module, stack_name: str) -> list[str]:
    """Every layer SHiRA can adapt, with PEFT's names (a stacked one as `stack_name.N` paths)."""
    out = []
    for path, module in named_modules(model):
        view = kernel_view(unwrap(module))
        if view is not None and view.stacked:
            out += [unstacked_path(path, i, stack_name) for i in range(view.stack_shape[0])]
        elif view is not None:
            out.append(path)
    return out


def write_peft_dir(
    folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `folder` as one unit
    (`shira_jax.atomic.write_files`): after a kill at any moment the folder holds the old pair
    or the new pair once the next save or load has recovered it, never a mix."""
    from safetensors.numpy import save

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Cannot write an adapter into {folder}: it is a file.")
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, {"format": "pt"})
    text = json.dumps(dict(sorted(config.items())), indent=2) + "\n"
    atomic.write_files(folder, {WEIGHTS_NAME: blob, CONFIG_NAME: text.encode()})
