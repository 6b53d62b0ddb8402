"""Convert adapter files between shira_jax's orbax checkpoints and PEFT folders, no base model.

* :func:`orbax_to_peft`: the orbax checkpoint (`shira_jax.save_adapter`) stores layer paths,
  kernel shapes, kernel-layout indices and values, so nothing else is needed.
* :func:`peft_to_orbax`: a PEFT file does NOT store kernel shapes, and the largest index only
  bounds them from below; guessing would write a checkpoint that fails (or silently
  misbehaves) on the real model. So the shapes must come from `model=` (any NNX model with
  the same module paths; its weights are not used) or `kernel_shapes={path: (in, out)}`.
  `modules_to_save` params need `model=` too, to know each variable's Flax name and layout.

The CLI's `shira-jax convert` calls these.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from bridge.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _check_modules_to_save,
    _linear_kernel_shape,
    _warn_stray,
    check_peft_budget,
    peft_config_dict,
    peft_output_folder,
    peft_tensors,
    read_peft_dir,
    split_peft_keys,
    torch_to_kernel_order,
    write_peft_dir,
)
from shira_jax.checkpoint import (
    ARRAYS_DIR,
    FORMAT,
    META_FILE,
    VERSION,
    _replace_dir,
    _restore_numpy,
    _slot,
)
from shira_jax.config import ALL_LINEAR, ShiraConfig, matches_target
from shira_jax.model import check_adapter_name, named_modules

__all__ = ["orbax_to_peft", "peft_to_orbax"]


def orbax_to_peft(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, adapter_name: str | None = None
) -> Path:
    """Convert a `shira_jax.save_adapter` checkpoint to a PEFT SHiRA folder.

    Args:
        src_dir: the orbax adapter checkpoint.
        dst_dir: the PEFT output folder; an adapter not named "default" is written to
            `dst_dir/<adapter_name>`, as PEFT's save_pretrained does.
        adapter_name: name for the output (default: the name stored in the checkpoint).

    Returns:
        The folder that holds `adapter_config.json` and `adapter_model.safetensors`.
    """
    src = Path(src_dir).absolute()
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{src} is not a shira-jax adapter checkpoint (no {META_FILE}); it should be the "
            "folder that shira_jax.save_adapter wrote."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}.")
    name = check_adapter_name(adapter_name or meta["adapter_name"])
    tree = _restore_numpy(src / ARRAYS_DIR)  # host numpy, whatever mesh saved it
    layer_info = meta["layers"]
    layers = {
        path: {k: np.asarray(v) for k, v in tree["layers"][_slot(i)].items()}
        for i, path in enumerate(layer_info)
    }
    shapes = {path: tuple(info["kernel_shape"]) for path, info in layer_info.items()}
    modules = {
        path: {
            var: np.asarray(tree["modules"][_slot(i)][_slot(j)]) for j, var in enumerate(var_paths)
        }
        for i, (path, var_paths) in enumerate(meta.get("modules_to_save", {}).items())
    }
    ranks = {info["r"] for info in layer_info.values()}
    if len(ranks) != 1:
        raise ValueError(
            f"{src}: layers have different r ({sorted(ranks)}); PEFT's config holds one r."
        )
    (r,) = ranks
    config = (
        ShiraConfig.from_dict(meta["config"])
        if meta.get("config")
        else ShiraConfig(r=r, mask_type="custom", mask_fn=_no_mask_fn, target_modules=())
    )
    targets = config.target_modules
    if (
        not targets
        or targets == ALL_LINEAR
        or not all(matches_target(p, targets) for p in layer_info)
    ):
        targets = sorted(layer_info)
    folder = peft_output_folder(dst_dir, name)
    check_peft_budget(shapes, layers, r)
    write_peft_dir(
        folder,
        peft_tensors(layers, shapes, modules),
        peft_config_dict(config, targets=targets, r=r),
    )
    return folder


def peft_to_orbax(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    model: nnx.Module | None = None,
    kernel_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Convert a PEFT SHiRA folder to a `shira_jax` orbax checkpoint (`sj.load_adapter` reads it).

    Args:
        src_dir: the PEFT adapter folder (for a non-default `adapter_name`, a subfolder of
            that name is preferred when it holds an adapter, as PEFT saves them).
        dst_dir: the orbax checkpoint to write (replaced atomically if it exists).
        adapter_name: the adapter name stored in the checkpoint.
        model: an NNX model with the same module paths, for kernel shapes and modules_to_save
            layouts (its weights are not used or changed).
        kernel_shapes: instead of `model`: layer path -> Flax kernel shape `(in, out)`, i.e.
            torch's `weight.shape[::-1]`. One of `model` / `kernel_shapes` is required.

    Returns:
        The checkpoint folder.
    """
    import orbax.checkpoint as ocp

    check_adapter_name(adapter_name)
    if model is None and kernel_shapes is None:
        raise ValueError(
            "peft_to_orbax needs the kernel shapes, which a PEFT file does not store: pass "
            "model=<NNX model with the same module paths> or kernel_shapes={path: (in, out)}."
        )
    folder, raw_config, tensors = read_peft_dir(src_dir, adapter_name)
    source = str(folder / WEIGHTS_NAME)
    try:
        config = ShiraConfig.from_dict(raw_config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: bad SHiRA config: {err}") from err
    layers, other, stray = split_peft_keys(tensors, source=source)
    if not layers:
        raise ValueError(f"{source} has no SHiRA layers.")
    modules = dict(named_modules(model)) if model is not None else {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    shapes: dict[str, list[int]] = {}
    for path, pair in layers.items():
        if kernel_shapes is not None:
            if path not in kernel_shapes:
                raise KeyError(
                    f"{source}: no kernel shape for layer {path!r}; kernel_shapes has "
                    f"{sorted(kernel_shapes)[:10]}."
                )
            shape = tuple(int(n) for n in kernel_shapes[path])
            if len(shape) != 2 or min(shape) <= 0:
                raise ValueError(f"kernel_shapes[{path!r}] must be (in, out), got {shape}.")
        else:
            shape = _linear_kernel_shape(modules, path, source)
        idx, val = torch_to_kernel_order(
            pair["indices"], pair["values"], shape, layer_name=f"{path} in {source}"
        )
        arrays[path] = {"values": np.asarray(val, np.float32), "indices": idx}
        shapes[path] = list(shape)
    if other and model is None:
        raise ValueError(
            f"{source} has modules_to_save params ({sorted(other)[:3]}...); converting them "
            "needs model=... to know each module's Flax variable names and layouts."
        )
    module_arrays = (
        _check_modules_to_save(modules, config, other, adapter_name, source)
        if model is not None
        else {}
    )
    _warn_stray(stray, source)

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "layers": {p: {"kernel_shape": shapes[p], "r": config.r} for p in arrays},
        "modules_to_save": {p: sorted(v) for p, v in module_arrays.items()},
    }
    tree = {
        "layers": {_slot(i): arrays[p] for i, p in enumerate(meta["layers"])},
        "modules": {
            _slot(i): {
                _slot(j): module_arrays[p][k] for j, k in enumerate(meta["modules_to_save"][p])
            }
            for i, p in enumerate(meta["modules_to_save"])
        },
    }
    target = Path(dst_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        ocp.PyTreeCheckpointer().save(tmp / ARRAYS_DIR, tree)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _no_mask_fn(*_: Any, **__: Any) -> Any:
    raise ValueError("This adapter's indices come from its file; it has no mask_fn.")
