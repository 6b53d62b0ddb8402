"""The SHiRA delta math on plain arrays, shared by the NNX layer and the functional form.

Indices are `[2, nnz]` int32 in kernel layout (`[in, out]`): row 0 is the input (row) index,
row 1 the output (column) index.

Three kinds of function live here:

* the delta itself: `scatter_delta` (kernel + scaled values, rounded once), `restore_entries`
  (the exact inverse of a merge) and `dense_delta`;
* `sparse_product`, the delta applied without a kernel: `x @ S` from the `nnz` entries only
  (a hand-written backward: the sampled product for the values, the transposed sparse product
  for the input), for kernels that cannot be patched (quantized) and per-example adapters;
* `patched_call`, the training forward: one matmul on the patched kernel whose backward pass
  recomputes that kernel instead of keeping it, so a SHiRA step holds no more memory than a
  LoRA step (see BENCHMARKS.md);
* merged-mode switching: `merge_entries` / `switch_entries` (gather the entries to keep, write
  the new ones, in one pass) and `switch_kernels`, which switches a whole list of kernels in
  place: one compiled, donated call per group of same-shaped kernels (`switch_group`), or, for
  16-bit kernels on a CPU, in their own buffers (`switch_on_host`: XLA CPU cannot write 16-bit
  floats in place).

16-bit float kernels (bf16, f16) are written through a `uint16` view: XLA's CPU scatter has no
16-bit float kernel and otherwise converts the whole kernel to float32 and back for a few
entries. The rounding is unchanged: new entries are computed in float32 and rounded once.

Example:
    >>> import jax.numpy as jnp
    >>> from shira_jax import ops
    >>> kernel = jnp.zeros((2, 3))
    >>> idx = jnp.array([[0, 1], [2, 0]], jnp.int32)
    >>> ops.scatter_delta(kernel, idx, jnp.array([1.0, 2.0]), 0.5).tolist()
    [[0.0, 0.0, 0.5], [1.0, 0.0, 0.0]]
    >>> merged, saved = ops.merge_entries(kernel, idx, jnp.array([1.0, 2.0]))
    >>> bool((ops.restore_entries(merged, idx, saved) == kernel).all())
    True
"""

from __future__ import annotations

import ctypes
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dense_delta",
    "entries_from_bits",
    "flat_positions",
    "gather_block_bits",
    "gather_entries",
    "host_writable",
    "merge_entries",
    "patched_call",
    "prefer_sparse",
    "restore_entries",
    "scatter_block",
    "scatter_delta",
    "sparse_product",
    "switch_entries",
    "switch_group",
    "switch_kernels",
    "switch_on_host",
    "write_block",
    "write_entries",
]

_BITS_VIEW = {2: jnp.uint16}


# ----------------------------------------------------------------------------- primitives


def _acc_dtype(kernel_dtype: Any, values_dtype: Any) -> Any:
    return jnp.promote_types(jnp.promote_types(kernel_dtype, values_dtype), jnp.float32)


def _bits_dtype(dtype: Any) -> Any | None:
    """The unsigned view used to scatter a 16-bit float kernel, or None to scatter directly."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize in _BITS_VIEW:
        return _BITS_VIEW[dtype.itemsize]
    return None


def _flat(indices: jax.Array, shape: tuple[int, ...], flat: bool) -> jax.Array | None:
    """Row-major flat positions of `[2, nnz]` indices when asked for and they fit int32."""
    if not flat or len(shape) != 2 or shape[0] * shape[1] >= 2**31:
        return None
    return indices[0] * shape[1] + indices[1]


def gather_entries(kernel: jax.Array, indices: jax.Array, *, flat: bool = False) -> jax.Array:
    """`kernel[indices[0], indices[1]]` (the entries an adapter touches), in the kernel's dtype.

    `flat=True` indexes the flattened kernel (faster on one device; a kernel split over
    devices must keep 2-D indices, or XLA would gather it whole to flatten it).
    """
    bits = _bits_dtype(kernel.dtype)
    view = kernel if bits is None else jax.lax.bitcast_convert_type(kernel, bits)
    positions = _flat(indices, kernel.shape, flat)
    if positions is None:
        out = view[indices[0], indices[1]]
    else:
        out = view.reshape(-1)[positions]
    return out if bits is None else jax.lax.bitcast_convert_type(out, kernel.dtype)


def write_entries(
    kernel: jax.Array, indices: jax.Array, entries: jax.Array, *, flat: bool = False
) -> jax.Array:
    """`kernel` with `entries` (cast to its dtype) written at the unique `indices`.

    A plain scatter-set. 16-bit float kernels go through a same-width unsigned view, so XLA
    writes 2-byte words instead of converting the kernel to float32 and back. `flat=True`
    writes at row-major flat positions (about 15% faster on CPU; one device only, see
    `gather_entries`).
    """
    entries = entries.astype(kernel.dtype)
    bits = _bits_dtype(kernel.dtype)
    view = kernel if bits is None else jax.lax.bitcast_convert_type(kernel, bits)
    entries = entries if bits is None else jax.lax.bitcast_convert_type(entries, bits)
    positions = _flat(indices, kernel.shape, flat)
    if positions is None:
        view = view.at[indices[0], indices[1]].set(entries, unique_indices=True)
    else:
        view = view.reshape(-1).at[positions].set(entries, unique_indices=True)
        view = view.reshape(kernel.shape)
    return view if bits is None else jax.lax.bitcast_convert_type(view, kernel.dtype)


def _added(old: jax.Array, values: jax.Array, scale: Any, out_dtype: Any) -> jax.Array:
    acc = _acc_dtype(out_dtype, values.dtype)
    return (old.astype(acc) + jnp.asarray(scale, acc) * values.astype(acc)).astype(out_dtype)


def scatter_delta(
    kernel: jax.Array, indices: jax.Array, values: jax.Array, scale: float | jax.Array = 1.0
) -> jax.Array:
    """`kernel` with `scale * values` added at `indices`, rounded once to the kernel's dtype.

    Entries are gathered, summed in float32 (or the values' wider dtype) and written back, so
    a bf16 kernel sees one rounding per entry, as PyTorch's in-place add does. Indices must be
    unique (the canonical form every loader produces).
    """
    return _scatter_delta(kernel, indices, values, jnp.asarray(scale, jnp.float32))


@jax.custom_vjp
def _scatter_delta(
    kernel: jax.Array, indices: jax.Array, values: jax.Array, scale: jax.Array
) -> jax.Array:
    old = gather_entries(kernel, indices)
    return write_entries(kernel, indices, _added(old, values, scale, kernel.dtype))


def _scatter_delta_fwd(kernel, indices, values, scale):  # noqa: ANN001, ANN202
    return _scatter_delta(kernel, indices, values, scale), (indices, values, scale)


def _scatter_delta_bwd(residuals, cotangent):  # noqa: ANN001, ANN202
    # Written by hand because the uint16 view of 16-bit kernels is not differentiable: the
    # output is `kernel` with `round(kernel[i] + scale * v)` at i, so (rounding aside) the
    # kernel's cotangent passes through and the values' is `scale * cotangent[i]`.
    indices, values, scale = residuals
    picked = cotangent[indices[0], indices[1]].astype(jnp.float32)
    d_values = (scale * picked).astype(values.dtype)
    d_scale = jnp.sum(picked * values.astype(jnp.float32)).astype(scale.dtype)
    d_indices = np.zeros(np.shape(indices), jax.dtypes.float0)
    return cotangent, d_indices, d_values, d_scale


_scatter_delta.defvjp(_scatter_delta_fwd, _scatter_delta_bwd)


def scatter_block(
    block: jax.Array, rows: jax.Array, cols: jax.Array, values: jax.Array, scale: jax.Array
) -> jax.Array:
    """`scatter_delta` on one block of a kernel split over devices (the shard-local body).

    `rows` / `cols` are positions relative to the block; entries outside it are dropped (they
    belong to another device's block). The rounding is `scatter_delta`'s: one per entry.
    """
    inside = (rows >= 0) & (rows < block.shape[0]) & (cols >= 0) & (cols < block.shape[1])
    rows = jnp.where(inside, rows, block.shape[0])  # out of range: read as 0, write dropped
    cols = jnp.where(inside, cols, block.shape[1])
    old = block.at[rows, cols].get(mode="fill", fill_value=0)
    new = _added(old, values, scale, block.dtype)
    return block.at[rows, cols].set(new, mode="drop", unique_indices=True)


def _block_positions(block: jax.Array, rows: jax.Array, cols: jax.Array) -> tuple[Any, Any]:
    inside = (rows >= 0) & (rows < block.shape[0]) & (cols >= 0) & (cols < block.shape[1])
    return jnp.where(inside, rows, block.shape[0]), jnp.where(inside, cols, block.shape[1])


def gather_block_bits(block: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """The entries of one kernel block at block-relative `rows` / `cols` as uint32 bit
    patterns, 0 for positions outside the block (summing over blocks is then exact)."""
    rows, cols = _block_positions(block, rows, cols)
    bits = _bits_dtype(block.dtype) or {4: jnp.uint32, 8: jnp.uint64}[block.dtype.itemsize]
    view = jax.lax.bitcast_convert_type(block, bits)
    return view.at[rows, cols].get(mode="fill", fill_value=0).astype(jnp.uint32)


def entries_from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    """Inverse of `gather_block_bits` (after summing the blocks' patterns)."""
    dtype = jnp.dtype(dtype)
    raw = _bits_dtype(dtype) or {4: jnp.uint32, 8: jnp.uint64}[dtype.itemsize]
    return jax.lax.bitcast_convert_type(bits.astype(raw), dtype)


def write_block(
    block: jax.Array, rows: jax.Array, cols: jax.Array, entries: jax.Array
) -> jax.Array:
    """Write `entries` at block-relative positions; those outside the block are dropped."""
    rows, cols = _block_positions(block, rows, cols)
    bits = _bits_dtype(block.dtype)
    entries = entries.astype(block.dtype)
    if bits is None:
        return block.at[rows, cols].set(entries, mode="drop", unique_indices=True)
    view = jax.lax.bitcast_convert_type(block, bits)
    view = view.at[rows, cols].set(
        jax.lax.bitcast_convert_type(entries, bits), mode="drop", unique_indices=True
    )
    return jax.lax.bitcast_convert_type(view, block.dtype)


def restore_entries(
    kernel: jax.Array, indices: jax.Array, saved: jax.Array, *, flat: bool = False
) -> jax.Array:
    """Write back the exact values a merge overwrote (the inverse of a merge, bit for bit)."""
    return write_entries(kernel, indices, saved, flat=flat)


def dense_delta(
    shape: tuple[int, int],
    indices: jax.Array,
    values: jax.Array,
    scale: float | jax.Array = 1.0,
    dtype: jnp.dtype | None = None,
) -> jax.Array:
    """The dense `[in, out]` delta `scatter(indices, scale * values)`; duplicates add up."""
    dtype = dtype or values.dtype
    delta = jnp.zeros(shape, dtype)
    return delta.at[indices[0], indices[1]].add((scale * values).astype(dtype))


# ----------------------------------------------------------------------------- merged mode


def merge_entries(
    kernel: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    scale: float | jax.Array = 1.0,
    *,
    flat: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Merge one adapter: `(kernel + scale * delta, the entries it overwrote)`, one gather.

    The second result is what `restore_entries` needs to undo the merge bit for bit.
    """
    saved = gather_entries(kernel, indices, flat=flat)
    new = _added(saved, values, scale, kernel.dtype)
    return write_entries(kernel, indices, new, flat=flat), saved


def switch_entries(
    kernel: jax.Array,
    old_indices: jax.Array | None,
    old_saved: jax.Array | None,
    new_indices: jax.Array | None,
    new_values: jax.Array | None,
    new_scale: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """Swap a merged adapter for another: restore the old one's entries, then merge the new one.

    Either half may be None (pure unmerge / pure merge). Returns the kernel and the entries the
    new adapter overwrote (None without one). Inside `jax.jit` with the kernel donated this is
    one in-place pass over `2 * nnz` entries; the kernel's other entries are never read.
    """
    if old_indices is not None:
        kernel = restore_entries(kernel, old_indices, old_saved)
    if new_indices is None:
        return kernel, None
    return merge_entries(kernel, new_indices, new_values, new_scale)


def _switch_one(
    kernel: jax.Array, restore: list[Any], merge: list[Any], flat: bool
) -> tuple[jax.Array, list[jax.Array]]:
    for idx, saved in restore:
        kernel = restore_entries(kernel, idx, saved, flat=flat)
    saved_now = []
    for idx, values, scale in merge:
        kernel, saved = merge_entries(kernel, idx, values, scale, flat=flat)
        saved_now.append(saved)
    return kernel, saved_now


def _one_device(kernel: jax.Array) -> bool:
    sharding = getattr(kernel, "sharding", None)
    return sharding is not None and len(sharding.device_set) == 1


@functools.lru_cache(maxsize=64)
def _scale_constant(scale: float) -> jax.Array:
    return jnp.asarray(scale, jnp.float32)


def _scale_array(scale: float | jax.Array) -> jax.Array:
    """Scales are traced (no recompilation per scale); Python floats are converted once."""
    return _scale_constant(float(scale)) if isinstance(scale, (int, float)) else scale


def flat_positions(indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Row-major positions in the flattened `[*stack, in, out]` kernel of `[*stack, 2, nnz]`
    indices, as one vector (stack slices one after another). Works under `jit`.

    Example:
        >>> import jax.numpy as jnp
        >>> from shira_jax import ops
        >>> ops.flat_positions(jnp.array([[0, 1], [2, 0]]), (2, 3)).tolist()
        [2, 3]
        >>> ops.flat_positions(jnp.array([[[0], [1]], [[1], [0]]]), (2, 2, 2)).tolist()
        [1, 6]
    """
    n_in, n_out = shape[-2], shape[-1]
    pos = indices[..., 0, :] * n_out + indices[..., 1, :]
    if len(shape) > 2:
        offsets = jnp.arange(math.prod(shape[:-2]), dtype=pos.dtype) * (n_in * n_out)
        pos = pos + offsets.reshape(*shape[:-2], 1)
    return pos.reshape(-1)


def _flat_ok(kernel: jax.Array) -> bool:
    """Flat positions are used on one device when they fit int32 (else 2-D indices)."""
    return _one_device(kernel) and kernel.size < 2**31


def _bits(x: jax.Array, dtype: Any) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype)


def _flat_switch(
    kernel: jax.Array, restore: list[Any], merge: list[Any]
) -> tuple[jax.Array, list[jax.Array]]:
    """`_switch_one` on the flattened kernel (any stack), 16-bit floats through a uint view."""
    bits = _bits_dtype(kernel.dtype)
    view = kernel.reshape(-1) if bits is None else _bits(kernel, bits).reshape(-1)
    for idx, saved in restore:
        entries = saved.reshape(-1).astype(kernel.dtype)
        entries = entries if bits is None else _bits(entries, bits)
        pos = flat_positions(idx, kernel.shape)
        view = view.at[pos].set(entries, unique_indices=True)
    saved_now = []
    for idx, values, scale in merge:
        pos = flat_positions(idx, kernel.shape)
        old = view[pos] if bits is None else _bits(view[pos], kernel.dtype)
        new = _added(old, values.reshape(-1), scale, kernel.dtype)
        view = view.at[pos].set(new if bits is None else _bits(new, bits), unique_indices=True)
        saved_now.append((old.reshape(values.shape), new.reshape(values.shape)))
    view = view.reshape(kernel.shape)
    return (view if bits is None else _bits(view, kernel.dtype)), saved_now


def _kernel_switch(
    kernel: jax.Array, restore: list[Any], merge: list[Any], flat: bool
) -> tuple[jax.Array, list[jax.Array]]:
    if flat:
        return _flat_switch(kernel, restore, merge)
    if kernel.ndim == 2:
        kernel, saved = _switch_one(kernel, restore, merge, False)
    else:  # a stacked kernel over several devices: the 2-D pass per slice (no flattening)
        axes = ([(0, 0)] * len(restore), [(0, 0, None)] * len(merge))
        kernel, saved = jax.vmap(
            lambda k, r, m: _switch_one(k, r, m, False), in_axes=(0, *axes)
        )(kernel, restore, merge)
    return kernel, [(s, None) for s in saved]  # (the written entries are not kept here)


def _group_body(
    kernels: tuple[jax.Array, ...], restores: Any, merges: Any, flat: tuple[bool, ...]
) -> tuple[list[jax.Array], list[list[jax.Array]]]:
    out = [_kernel_switch(k, r, m, f) for k, r, m, f in zip(kernels, restores, merges, flat)]
    return [k for k, _ in out], [s for _, s in out]


# One program per group of same-signature kernels (shape, dtype, adapters' sizes), at most
# `GROUP` kernels each: a model compiles a few small programs and dispatches one call per group
# (one program over all 210 kernels of a model took ~15 s to compile).
_group_donated = jax.jit(_group_body, donate_argnums=(0,), static_argnums=(3,))
_group_copied = jax.jit(_group_body, static_argnums=(3,))
GROUP = 16


def switch_group(
    kernels: list[jax.Array],
    restores: Sequence[Any],
    merges: Sequence[Any],
    *,
    donate: bool = True,
    written: bool = False,
) -> tuple[list[jax.Array], list[list[Any]]]:
    """One compiled call that switches every kernel of `kernels` (see `switch_kernels`).

    Kernels of one call should share a signature (shape, dtype, adapters' sizes) so that the
    program is reused; with `donate` they are all updated in place. `kernels` is emptied.
    """
    arrays = tuple(kernels)
    kernels.clear()
    flat = tuple(_flat_ok(k) for k in arrays)
    run = _group_donated if donate else _group_copied
    out, saved = run(arrays, list(restores), list(merges), flat)
    return out, saved if written else [[old for old, _ in s] for s in saved]


# ----------------------------------------------------------------------------- 16-bit on CPU
# XLA's CPU scatter has no 16-bit float kernel, and a uint16 (or uint32) view of the kernel is
# a `bitcast-convert` that XLA CPU materialises as a full copy (twice: in and out), so no XLA
# program writes a bf16 kernel in place on CPU (see BENCHMARKS.md). On one CPU device the
# switch is therefore done on the kernel's own buffer: the kernel is first donated to an
# identity program (so that every computation still reading it has finished and nothing else
# holds it: a user's reference or NumPy view makes XLA hand back a fresh buffer instead), then
# its entries are read and written through a NumPy uint16 view, with the same float32 math and
# rounding as `merge_entries`.

_fence = jax.jit(lambda arrays: arrays, donate_argnums=(0,))
_HOST_POSITIONS: dict[int, tuple[Any, tuple[int, ...], np.ndarray]] = {}


def host_writable(kernel: Any) -> bool:
    """True when `switch_on_host` handles `kernel`: a concrete 16-bit float array on one CPU."""
    if not isinstance(kernel, jax.Array) or isinstance(kernel, jax.core.Tracer):
        return False
    if _bits_dtype(kernel.dtype) is None or kernel.is_deleted():
        return False
    devices = kernel.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _host_positions(indices: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`flat_positions` as a NumPy intp array, cached per indices array (while it lives)."""
    key = id(indices)
    hit = _HOST_POSITIONS.get(key)
    if hit is not None and hit[0]() is indices and hit[1] == shape:
        return hit[2]
    idx = np.asarray(indices).astype(np.intp)
    pos = idx[..., 0, :] * shape[-1] + idx[..., 1, :]
    if len(shape) > 2:
        offsets = np.arange(math.prod(shape[:-2]), dtype=np.intp) * (shape[-2] * shape[-1])
        pos = pos + offsets.reshape(*shape[:-2], 1)
    pos = pos.reshape(-1)
    try:
        ref = weakref.ref(indices, lambda _, key=key: _HOST_POSITIONS.pop(key, None))
    except TypeError:
        return pos
    _HOST_POSITIONS[key] = (ref, shape, pos)
    return pos


def _bits_view(kernel: jax.Array) -> np.ndarray:
    """A writable flat unsigned view of `kernel`'s own (CPU, row-major) buffer."""
    bits = np.dtype(_bits_dtype(kernel.dtype))
    size = kernel.size * bits.itemsize
    buffer = (ctypes.c_char * size).from_address(kernel.unsafe_buffer_pointer())
    return np.frombuffer(buffer, bits)


def switch_on_host(
    kernels: list[jax.Array],
    restores: Sequence[Any],
    merges: Sequence[Any],
    *,
    written: bool = False,
) -> tuple[list[jax.Array], list[list[Any]]]:
    """`switch_kernels` for 16-bit kernels on one CPU device, in their own buffers.

    Same contract as `switch_kernels` with donation: every kernel passed is consumed (donated
    to a no-op program first), the results are the updated kernels and the saved entries.
    Rounding is `merge_entries`': entries summed in float32 (or wider), rounded once.

    Example:
        >>> import jax.numpy as jnp
        >>> from shira_jax import ops
        >>> idx = jnp.array([[0, 1], [1, 0]], jnp.int32)
        >>> (k,), ((saved,),) = ops.switch_on_host([jnp.ones((2, 2), jnp.bfloat16)], [[]],
        ...                                       [[(idx, jnp.array([1.0, 2.0]), 1.0)]])
        >>> k.astype(float).tolist(), saved.astype(float).tolist()
        ([[1.0, 2.0], [3.0, 1.0]], [1.0, 1.0])
    """
    arrays = _fence(tuple(kernels))
    kernels.clear()
    jax.block_until_ready(arrays)
    saved_all = []
    for kernel, restore, merge in zip(arrays, restores, merges):
        view, dtype = _bits_view(kernel), np.dtype(kernel.dtype)
        for idx, saved in restore:
            entries = np.asarray(saved).astype(dtype, copy=False).reshape(-1)
            view[_host_positions(idx, kernel.shape)] = entries.view(view.dtype)
        now = []
        for idx, values, scale in merge:
            pos = _host_positions(idx, kernel.shape)
            old = view[pos].view(dtype)
            acc = np.dtype(_acc_dtype(dtype, values.dtype))
            vals = np.asarray(values).astype(acc, copy=False).reshape(-1)
            new = (old.astype(acc) + np.asarray(scale, acc) * vals).astype(dtype)
            view[pos] = new.view(view.dtype)
            shape = np.shape(values)
            old = jax.device_put(old.reshape(shape))
            now.append((old, jax.device_put(new.reshape(shape))) if written else old)
        saved_all.append(now)
    return list(arrays), saved_all


def _signature(kernel: jax.Array, restore: Any, merge: Any, donate: bool) -> Any:
    return (
        kernel.shape, kernel.dtype, donate, getattr(kernel, "sharding", None),
        tuple((i.shape, s.shape, s.dtype) for i, s in restore),
        tuple((i.shape, v.shape, v.dtype) for i, v, _ in merge),
    )


def switch_kernels(
    kernels: list[jax.Array],
    restores: Sequence[Sequence[tuple[jax.Array, jax.Array]]],
    merges: Sequence[Sequence[tuple[jax.Array, jax.Array, float | jax.Array]]],
    donate: bool | Sequence[bool] = True,
    *,
    written: bool = False,
) -> tuple[list[jax.Array], list[list[Any]]]:
    """Switch many kernels in place: compiled, donated passes over same-signature groups.

    For kernel `i` (`[in, out]` or stacked `[*stack, in, out]`, with indices
    `[*stack, 2, nnz]`, saved entries and values `[*stack, nnz]`), first every
    `(indices, saved)` of `restores[i]` is written back (in the order given: pass the last
    merged adapter first), then every `(indices, values, scale)` of `merges[i]` is merged.
    Returns the new kernels and, per kernel, the entries each merge overwrote. Kernels of the
    same signature run in one program call (`switch_group`, at most `GROUP` per call); 16-bit
    kernels on one CPU device are written in their own buffer (`switch_on_host`). A donated
    kernel is invalid afterwards, so the caller must hold no other reference it still wants to
    read; `donate` may be False, or one flag per kernel. The list `kernels` is emptied. With
    `written`, each saved entry is a pair `(overwritten, written)`: the merged entries too
    (`written` is None where a kernel spans several devices).

    Example:
        >>> import jax.numpy as jnp
        >>> from shira_jax import ops
        >>> idx = jnp.array([[0, 1], [1, 0]], jnp.int32)
        >>> (k,), ((saved,),) = ops.switch_kernels([jnp.ones((2, 2))], [[]],
        ...                                       [[(idx, jnp.array([1.0, 2.0]), 1.0)]])
        >>> k.tolist(), saved.tolist()
        ([[1.0, 2.0], [3.0, 1.0]], [1.0, 1.0])
    """
    restores = [[(i, s) for i, s in r] for r in restores]
    merges = [[(i, v, _scale_array(s)) for i, v, s in m] for m in merges]
    flags = [bool(donate)] * len(restores) if isinstance(donate, bool) else list(donate)
    arrays = list(kernels)
    kernels.clear()
    groups: dict[Any, list[int]] = {}
    for i, (k, r, m, flag) in enumerate(zip(arrays, restores, merges, flags)):
        key = "host" if flag and host_writable(k) else _signature(k, r, m, flag)
        groups.setdefault(key, []).append(i)
    out: list[Any] = [None] * len(arrays)
    saved: list[Any] = [None] * len(arrays)
    for key, members in groups.items():
        size = len(members) if key == "host" else GROUP
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            batch = [arrays[i] for i in chunk]
            for i in chunk:
                arrays[i] = None
            r, m = [restores[i] for i in chunk], [merges[i] for i in chunk]
            if key == "host":
                new, entries = switch_on_host(batch, r, m, written=written)
            else:
                new, entries = switch_group(batch, r, m, donate=key[2], written=written)
            for i, k, e in zip(chunk, new, entries):
                out[i], saved[i] = k, e
    return out, saved


# ----------------------------------------------------------------------------- training


def patched_call(
    patch: Callable[[jax.Array, Any, Any], jax.Array],
    apply: Callable[[jax.Array, Any], Any],
    kernel: jax.Array,
    indices: Any,
    values: Any,
    operands: Any,
) -> Any:
    """`apply(patch(kernel, indices, values), operands)`, without keeping the patched kernel.

    Plain autodiff of a patched matmul keeps each layer's patched kernel (an `[in, out]` copy)
    alive from the forward pass to the backward pass. Here the backward pass only keeps the
    inputs (the frozen kernel, which is alive anyway, the indices, the values and the operands:
    the layer input is needed for the values' gradient in any case) and rebuilds the patched
    kernel when the output cotangent arrives. The rebuilt forward matmul is dead code and XLA
    drops it, so the step does the same matmuls as plain autodiff, plus one kernel copy and one
    scatter per adapted layer. The kernel copies are tied by data to the first leaf of
    `operands` (forward) and to the cotangent (backward), see `_after`: put the layer's
    input first in `operands`.

    `patch(kernel, indices, values)` must be a pure function of arrays, and so must
    `apply(kernel, operands)`. Gradients flow to `kernel`, `values` and `operands`; forward-mode
    differentiation (`jax.jvp`) is not available through this function.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from shira_jax import ops
        >>> idx = jnp.array([[0, 1], [1, 0]], jnp.int32)
        >>> patch = lambda k, i, v: ops.scatter_delta(k, i, v)
        >>> f = lambda v, x: ops.patched_call(patch, lambda k, x: x @ k, jnp.eye(2), idx, v, x)
        >>> jax.grad(lambda v: f(v, jnp.ones((1, 2))).sum())(jnp.zeros(2)).tolist()
        [1.0, 1.0]
    """
    return _patched_call(patch, apply, kernel, indices, values, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _patched_call(patch, apply, kernel, indices, values, operands):
    kernel, indices = _after(kernel, indices, operands)
    return apply(patch(kernel, indices, values), operands)


def _patched_call_fwd(patch, apply, kernel, indices, values, operands):
    out = _patched_call(patch, apply, kernel, indices, values, operands)
    return out, (kernel, indices, values, operands)


def _after(kernel: jax.Array, indices: Any, tree: Any) -> tuple[jax.Array, Any]:
    """A copy of `kernel` and the indices, bit for bit, that XLA can only compute once the
    first leaf of `tree` exists.

    Adding -0.0 leaves every float as it is (NaN included) and costs what the copy costs; the
    indices pass through a `minimum` with a bound above any index. Without this data dependency
    XLA hoists every layer's patched copy (and the scatter's index layout) to the start of the
    program, where all of them are alive at once, and merges the backward pass's rebuild with
    the forward pass's (common-subexpression elimination; optimisation barriers are dropped on
    CPU), which keeps them alive across the whole step.
    """
    leaf = jnp.asarray(jax.tree.leaves(tree)[0])
    # one element, without reshaping (a reshape of a sharded array would gather it)
    first = leaf[(0,) * leaf.ndim] if leaf.size else jnp.zeros((), leaf.dtype)
    finite = jnp.isfinite(first)
    negative_zero = finite.astype(jnp.float32) * jnp.float32(-0.0)
    bound = jnp.where(finite, jnp.int32(2**31 - 1), jnp.int32(2**31 - 2))
    indices = jax.tree.map(lambda i: jnp.minimum(i, bound.astype(i.dtype)), indices)
    return kernel + negative_zero.astype(kernel.dtype), indices


def _patched_call_bwd(patch, apply, residuals, cotangent):
    kernel, indices, values, operands = residuals
    # Rebuild the patched kernel once the cotangent exists (never in the forward pass).
    kernel, indices = _after(kernel, indices, cotangent)

    def f(kernel: jax.Array, values: Any, operands: Any) -> Any:
        return apply(patch(kernel, indices, values), operands)

    _, vjp = jax.vjp(f, kernel, values, operands)
    d_kernel, d_values, d_operands = vjp(cotangent)
    d_indices = jax.tree.map(lambda i: np.zeros(np.shape(i), jax.dtypes.float0), indices)
    return d_kernel, d_indices, d_values, d_operands


_patched_call.defvjp(_patched_call_fwd, _patched_call_bwd)


# ----------------------------------------------------------------------------- sparse product

#: "auto" picks the sparse product when a call's `tokens * nnz` is at most this fraction of
#: the kernel's `in * out` entries (where the kernel copy + scatter of the patched path costs
#: more than the gathers of the sparse one); measured in BENCHMARKS.md ("Sparse vs patched").
SPARSE_CROSSOVER = 0.15


def prefer_sparse(tokens: int, nnz: int, n_in: int, n_out: int) -> bool:
    """True when `delta_mode="auto"` should use `sparse_product` for one call (see
    `SPARSE_CROSSOVER`).

    >>> prefer_sparse(1, 524288, 4096, 4096), prefer_sparse(512, 524288, 4096, 4096)  # r=64
    (True, False)
    """
    return tokens * nnz <= SPARSE_CROSSOVER * n_in * n_out


def sparse_product(
    x: jax.Array, indices: jax.Array, values: jax.Array, n_out: int, scale: Any = 1.0
) -> jax.Array:
    """`x @ S` for the sparse `[in, out]` delta `S` (`scale * values` at `indices`), in fp32.

    Gathers the input columns at the row indices, multiplies by the values and sums into the
    output columns: `2 * tokens * nnz` FLOPs, and no `[in, out]` array at any point. The
    backward pass is written by hand: the values' gradient is the sampled product
    `sum_t x[t, row_k] * g[t, col_k]` (`tokens * nnz`, never the dense `x^T g`), the input's
    the transposed sparse product.

    Example:
        >>> import jax.numpy as jnp
        >>> from shira_jax import ops
        >>> idx = jnp.array([[0, 1], [2, 0]], jnp.int32)
        >>> x = jnp.array([[1.0, 2.0]])
        >>> ops.sparse_product(x, idx, jnp.array([3.0, 4.0]), n_out=3).tolist()
        [[8.0, 0.0, 3.0]]
        >>> (x @ dense_delta((2, 3), idx, jnp.array([3.0, 4.0]))).tolist()
        [[8.0, 0.0, 3.0]]
    """
    scale = jnp.asarray(scale, jnp.float32)
    return _sparse_product(x, indices, values, scale, int(n_out))


def dense_delta_product(
    x: jax.Array, indices: jax.Array, values: jax.Array, n_out: int, scale: Any = 1.0
) -> jax.Array:
    """`x @ S` like `sparse_product`, computed as one matmul with the dense delta, in fp32.

    For calls with many tokens, where `sparse_product`'s gathers cost more than a matmul
    (quantized kernels, whose patched kernel cannot be formed, use it while training). The
    delta `[in, out]` is rebuilt in the backward pass (`jax.checkpoint`), so no layer keeps
    one alive between the passes; the values' gradient is `x^T g` at the indices.

    Example:
        >>> import jax.numpy as jnp
        >>> from shira_jax import ops
        >>> idx = jnp.array([[0, 1], [2, 0]], jnp.int32)
        >>> x = jnp.array([[1.0, 2.0]])
        >>> ops.dense_delta_product(x, idx, jnp.array([3.0, 4.0]), n_out=3).tolist()
        [[8.0, 0.0, 3.0]]
    """
    scale = jnp.asarray(scale, jnp.float32)
    return _dense_delta_product(x, indices, values, scale, int(n_out))


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _dense_delta_product(x, indices, values, scale, n_out):  # noqa: ANN001, ANN202
    delta = dense_delta((x.shape[-1], n_out), indices, values.astype(jnp.float32), scale)
    return x.astype(jnp.float32) @ delta


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sparse_product(x, indices, values, scale, n_out):  # noqa: ANN001, ANN202
    picked = jnp.take(x, indices[0], axis=-1).astype(jnp.float32)  # [..., nnz]
    contrib = picked * (scale * values.astype(jnp.float32))
    out = jnp.zeros((*x.shape[:-1], n_out), jnp.float32)
    return out.at[..., indices[1]].add(contrib)


def _sparse_product_fwd(x, indices, values, scale, n_out):  # noqa: ANN001, ANN202
    return _sparse_product(x, indices, values, scale, n_out), (x, indices, values, scale)


def _sparse_product_bwd(n_out, residuals, g):  # noqa: ANN001, ANN202
    x, indices, values, scale = residuals
    g_cols = jnp.take(g, indices[1], axis=-1)  # [..., nnz]
    x_rows = jnp.take(x, indices[0], axis=-1).astype(jnp.float32)
    sampled = jnp.sum((x_rows * g_cols).reshape(-1, indices.shape[-1]), axis=0)  # [nnz]
    v = values.astype(jnp.float32)
    d_values = (scale * sampled).astype(values.dtype)
    d_scale = jnp.sum(sampled * v).astype(scale.dtype)
    d_x = jnp.zeros(x.shape, jnp.float32).at[..., indices[0]].add(g_cols * (scale * v))
    d_indices = np.zeros(np.shape(indices), jax.dtypes.float0)
    return d_x.astype(x.dtype), d_indices, d_values, d_scale


_sparse_product.defvjp(_sparse_product_fwd, _sparse_product_bwd)
