"""SHiRA on plain param pytrees (Linen, Equinox, raw JAX): no module wrapping needed.

An adapter is two dicts keyed by the kernel's dotted pytree path: `values` (trainable,
`[nnz]`) and `indices` (static `[2, nnz]` int32). `apply` returns params with the deltas
added; differentiate w.r.t. `values` only.

Example (a Linen model):
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import shira_jax as sj
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> cfg = sj.ShiraConfig(r=1, target_modules=["params"], random_seed=0)
    >>> adapter = sj.functional.init(params, cfg)
    >>> list(adapter.values)
    ['params.kernel']
    >>> def loss(values, x):
    ...     patched = sj.functional.apply(params, values, adapter.indices)
    ...     return jnp.sum(model.apply(patched, x) ** 2)
    >>> grads = jax.grad(loss)(adapter.values, jnp.ones((2, 8)))
    >>> grads["params.kernel"].shape
    (12,)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shira_jax import masks, ops
from shira_jax.config import matches_target

PyTree = Any


class Adapter(NamedTuple):
    """A functional SHiRA adapter: `values[path]` `[nnz]` and `indices[path]` `[2, nnz]`."""

    values: dict[str, jax.Array]
    indices: dict[str, jax.Array]


def kernel_paths(params: PyTree, name: str = "kernel") -> list[str]:
    """Dotted paths of every 2-D leaf called `name` (Linen's Dense kernels by default)."""
    paths = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [_key(k) for k in path]
        if keys and keys[-1] == name and np.ndim(leaf) == 2:
            paths.append(".".join(keys))
    return paths


def init(
    params: PyTree,
    config: Any,
    *,
    key: jax.Array | None = None,
    kernel_name: str = "kernel",
) -> Adapter:
    """Make an adapter for the kernels whose owner path matches `config.target_modules`.

    Matching uses PEFT's rules on the path without the trailing kernel name, so
    `["Dense_0"]` selects `params.Dense_0.kernel`. Masks: "random" (PEFT-exact), "struct",
    "weight_magnitude", or a custom `mask_fn(kernel, r)`.
    """
    leaves = {p: leaf for p, leaf in _flat(params).items()}
    candidates = kernel_paths(params, kernel_name)
    targets = config.target_modules
    if targets is None:
        raise ValueError("functional.init needs config.target_modules (paths of kernel owners).")
    chosen = [p for p in candidates if matches_target(p.rsplit(".", 1)[0], targets)]
    if not chosen:
        owners = [p.rsplit(".", 1)[0] for p in candidates]
        raise ValueError(f"target_modules {targets!r} matched no kernel; kernel owners: {owners}")
    key = jax.random.key(0) if key is None else key
    values, indices = {}, {}
    for i, path in enumerate(chosen):
        kernel = leaves[path]
        n_in, n_out = kernel.shape
        if config.mask_fn is None and config.needs_calibration:
            raise ValueError(
                f'functional.init supports "random", "struct", "weight_magnitude" and custom '
                f"masks; for {config.mask_type!r} compute scores and pass mask_fn."
            )
        idx = masks.make_mask(
            config, n_in, n_out, layer_name=path, kernel=np.asarray(kernel),
            custom=lambda kernel=kernel: config.mask_fn(kernel, config.r),
        )
        nnz = idx.shape[1]
        indices[path] = jnp.asarray(idx, jnp.int32)
        if config.init_weights:
            values[path] = jnp.zeros((nnz,), jnp.float32)
        else:
            values[path] = jax.random.normal(jax.random.fold_in(key, i), (nnz,), jnp.float32)
    return Adapter(values, indices)


def apply(
    params: PyTree,
    values: Mapping[str, jax.Array],
    indices: Mapping[str, jax.Array],
    scale: float = 1.0,
) -> PyTree:
    """Params with `scale * values` scattered into each adapted kernel (jit/grad friendly)."""
    missing = [p for p in values if p not in indices]
    if missing:
        raise KeyError(f"values for {missing} have no indices.")

    def patch(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        name = ".".join(_key(k) for k in path)
        if name in values:
            return ops.scatter_delta(leaf, indices[name], values[name], scale)
        return leaf

    found = set(_flat(params)) & set(values)
    if len(found) != len(values):
        raise KeyError(f"No kernel at {sorted(set(values) - found)} in params.")
    return jax.tree_util.tree_map_with_path(patch, params)


def merge(
    params: PyTree, adapter: Adapter, scale: float = 1.0
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Fold the adapter into the params; also returns the overwritten entries for `unmerge`."""
    flat = _flat(params)
    backup = {p: flat[p][idx[0], idx[1]] for p, idx in adapter.indices.items()}
    return apply(params, adapter.values, adapter.indices, scale), backup


def unmerge(params: PyTree, adapter: Adapter, backup: Mapping[str, jax.Array]) -> PyTree:
    """Restore the exact kernel entries that `merge` overwrote."""

    def restore(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        name = ".".join(_key(k) for k in path)
        if name in backup:
            return ops.restore_entries(leaf, adapter.indices[name], backup[name])
        return leaf

    return jax.tree_util.tree_map_with_path(restore, params)


def delta(params: PyTree, adapter: Adapter, path: str, scale: float = 1.0) -> jax.Array:
    """The dense `[in, out]` delta of one adapted kernel."""
    shape = _flat(params)[path].shape
    return ops.dense_delta(shape, adapter.indices[path], adapter.values[path], scale)


def _flat(params: PyTree) -> dict[str, jax.Array]:
    return {
        ".".join(_key(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
