"""Torch conventions, written once: how Flax NNX arrays appear in PyTorch / HF / PEFT / GGUF files.

Every conversion in `bridge` goes through this table (`weights` for HF safetensors, `peft` for
PEFT adapter folders, `gguf` for llama.cpp files):

=============================================  ===============================================
Flax NNX                                       torch / HF
=============================================  ===============================================
`<module>.kernel` `[in, out]` (2-D)            `<module>.weight` `[out, in]` (transposed)
`<module>.embedding` (`nnx.Embed`)             `<module>.weight`
`<module>.scale` (`nnx.LayerNorm`, RMSNorm)    `<module>.weight`
`<module>.bias`, any other variable name       the same name
SHiRA indices `[2, nnz]`, kernel layout:       PEFT `shira_indices` `[2, nnz]`, torch order:
row 0 input, row 1 output, sorted by           row 0 output, row 1 input, sorted by
`in_idx * out + out_idx`                       `out_idx * in + in_idx` (values permuted alike)
a SHiRA layer at `<path>`                      `base_model.model.<path>.shira_weight` /
                                               `base_model.model.<path>.shira_indices`
q_proj / k_proj rows (HF order)                GGUF rows, permuted by llama.cpp for rotary
                                               embeddings (`unpermute_rows` undoes it)
=============================================  ===============================================

Example:
    >>> import numpy as np
    >>> from bridge import conventions
    >>> conventions.torch_param_name("mlp.kernel", 2), conventions.torch_param_name("scale", 1)
    (('mlp.weight', True), ('weight', False))
    >>> {k: v.shape for k, v in conventions.to_torch({"kernel": np.zeros((3, 2))}).items()}
    {'weight': (2, 3)}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from shira_jax import masks

__all__ = [
    "FLAX_TO_TORCH",
    "INDICES",
    "KEY_PREFIX",
    "WEIGHT",
    "kernel_to_torch_order",
    "to_torch",
    "torch_names",
    "torch_param_name",
    "torch_to_kernel_order",
    "unpermute_rows",
]

#: Flax variable name -> torch parameter name (`nnx.Linear`, `nnx.Embed`, `nnx.LayerNorm`).
FLAX_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
#: PEFT's state-dict keys: `KEY_PREFIX + <module path> + "." + (WEIGHT | INDICES | param)`.
KEY_PREFIX = "base_model.model."
WEIGHT = "shira_weight"
INDICES = "shira_indices"


# ----------------------------------------------------------------------------- names


def torch_param_name(var_path: str, ndim: int) -> tuple[str, bool]:
    """Flax variable path -> (torch parameter name, transpose?).

    `kernel` (2-D) -> `weight` transposed; `embedding` and `scale` -> `weight`; anything else
    keeps its name (`bias`, a Llama RMSNorm's `weight`). Nested paths keep their prefix.

    >>> torch_param_name("kernel", 2), torch_param_name("sub.embedding", 2)
    (('weight', True), ('sub.weight', False))
    """
    owner, _, leaf = var_path.rpartition(".")
    if leaf == "kernel" and ndim != 2:
        raise ValueError(
            f"{var_path}: a {ndim}-D kernel has no torch Linear equivalent; only 2-D kernels "
            "(nnx.Linear) are converted."
        )
    name = FLAX_TO_TORCH.get(leaf, leaf)
    return (f"{owner}.{name}" if owner else name), leaf == "kernel"


def torch_names(variables: Mapping[str, Any], where: str = "") -> dict[str, tuple[str, bool]]:
    """`{torch name: (Flax variable path, transpose?)}` for `{variable path: array or Variable}`.

    Two variables that map to one torch name are refused (`where` names the module).
    """
    out: dict[str, tuple[str, bool]] = {}
    for var_path, value in variables.items():
        name, transpose = torch_param_name(var_path, len(value.shape))
        if name in out:
            raise ValueError(
                f"{where or 'module'}: variables {out[name][0]} and {var_path} both map to "
                f"torch name {name!r}; this module type has no torch equivalent."
            )
        out[name] = (var_path, transpose)
    return out


def to_torch(arrays: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """`{torch name: array in torch layout}` of `{Flax variable path: array}`."""
    return {
        name: arrays[path].T if transpose else arrays[path]
        for name, (path, transpose) in torch_names(arrays, where).items()
    }


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
    idx, val = np.asarray(indices), np.asarray(values)
    if idx.ndim != 2 or idx.shape[0] != 2:
        raise ValueError(f"{where}{INDICES} must have shape [2, nnz], got {idx.shape}.")
    if val.ndim != 1:
        raise ValueError(f"{where}{WEIGHT} must have shape [nnz], got {val.shape}.")
    if val.shape[0] != idx.shape[1]:
        raise ValueError(
            f"{where}{WEIGHT} has {val.shape[0]} values but {INDICES} has {idx.shape[1]} "
            "positions; they must have the same length."
        )
    if not jnp.issubdtype(val.dtype, jnp.floating):
        raise ValueError(f"{where}{WEIGHT} must be floating point, got {val.dtype}.")
    if idx.dtype.kind not in "iuf":
        raise ValueError(f"{where}{INDICES} must be integers, got dtype {idx.dtype}.")
    for row, (name, limit) in enumerate((("output", n_out), ("input", n_in))):
        bad = (idx[row] < 0) | (idx[row] >= limit)
        if bad.any():
            raise ValueError(
                f"{where}{int(bad.sum())} {name} index(es) in {INDICES} row {row} are out of "
                f"range [0, {limit}) for a torch weight [out={n_out}, in={n_in}], e.g. "
                f"{idx[row][bad][0].item()!r}. The adapter was made for a layer of another "
                "shape: check the base model."
            )
    kernel_idx = masks.validate_indices(idx[::-1], n_in, n_out, layer_name=layer_name)
    return masks.canonicalize(kernel_idx, val, (n_in, n_out))


# ----------------------------------------------------------------------------- GGUF


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q_proj / k_proj (weight or bias).

    llama.cpp's converter stores `w.reshape(n_head, 2, d, ...).swapaxes(1, 2)`; this is the
    inverse.

    >>> unpermute_rows(np.arange(4), 1).tolist()
    [0, 2, 1, 3]
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
