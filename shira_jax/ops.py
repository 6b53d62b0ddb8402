"""The SHiRA delta math on plain arrays, shared by the NNX layer and the functional form.

Indices are `[2, nnz]` int32 in kernel layout (`[in, out]`): row 0 is the input (row) index,
row 1 the output (column) index.

Example:
    >>> import jax.numpy as jnp
    >>> from shira_jax import ops
    >>> kernel = jnp.zeros((2, 3))
    >>> idx = jnp.array([[0, 1], [2, 0]], jnp.int32)
    >>> ops.scatter_delta(kernel, idx, jnp.array([1.0, 2.0]), 0.5).tolist()
    [[0.0, 0.0, 0.5], [1.0, 0.0, 0.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scatter_delta(
    kernel: jax.Array, indices: jax.Array, values: jax.Array, scale: float | jax.Array = 1.0
) -> jax.Array:
    """`kernel` with `scale * values` added at `indices`, rounded once to the kernel's dtype.

    Entries are gathered, summed in float32 (or the values' wider dtype) and written back, so
    a bf16 kernel sees one rounding per entry, as PyTorch's in-place add does. Indices must be
    unique (the canonical form every loader produces).
    """
    rows, cols = indices[0], indices[1]
    acc_dtype = jnp.promote_types(jnp.promote_types(kernel.dtype, values.dtype), jnp.float32)
    old = kernel[rows, cols].astype(acc_dtype)
    new = old + jnp.asarray(scale, acc_dtype) * values.astype(acc_dtype)
    return kernel.at[rows, cols].set(new.astype(kernel.dtype), unique_indices=True)


def restore_entries(kernel: jax.Array, indices: jax.Array, saved: jax.Array) -> jax.Array:
    """Write back the exact values a merge overwrote (the inverse of a merge, bit for bit)."""
    return kernel.at[indices[0], indices[1]].set(saved, unique_indices=True)


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
