"""`ShiraDense`: an `nnx.Linear` with one or more sparse high-rank adapters.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> linear = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> layer = sj.ShiraDense(linear)
    >>> layer.add_adapter("default", sj.masks.random_mask(8, 4, r=1, seed=0), r=1)
    >>> layer.shira_weight["default"].shape, layer.shira_indices["default"].shape
    ((12,), (2, 12))
    >>> bool(jnp.allclose(layer(jnp.ones((2, 8))), linear(jnp.ones((2, 8)))))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import ops


class ShiraParam(nnx.Param):
    """Trainable SHiRA values `[nnz]` of an active adapter: `nnx.Optimizer(..., wrt=ShiraParam)`."""


class ShiraFrozenValues(nnx.Variable):
    """SHiRA values of an inactive adapter: kept, but not trained (PEFT's requires_grad=False)."""


class ShiraIndices(nnx.Variable):
    """Static int32 `[2, nnz]` positions (kernel layout: input row, output column)."""


class ShiraMergeBackup(nnx.Variable):
    """Kernel entries a merge overwrote, so that unmerge restores them bit for bit."""


def _tuple(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


class ShiraDense(nnx.Module):
    """Wraps an `nnx.Linear`; each adapter is a flat value vector plus static indices.

    The forward pass scatters `scaling * values` of every active, unmerged adapter into a copy
    of the kernel and runs the base layer's one matmul on it (never a second pass over x).

    Attributes:
        base_layer: the wrapped `nnx.Linear` (kernel `[in, out]`).
        shira_weight: adapter name -> `ShiraParam` `[nnz]` (`ShiraFrozenValues` if inactive).
        shira_indices: adapter name -> `ShiraIndices` int32 `[2, nnz]`.
        r, scaling: adapter name -> budget rank and inference scale (1.0 by default).
        active_adapters, merged_adapters: tuples of adapter names.
    """

    def __init__(self, base_layer: nnx.Module, *, name: str = "") -> None:
        kernel = getattr(base_layer, "kernel", None)
        if kernel is None or kernel[...].ndim != 2:
            shape = None if kernel is None else tuple(kernel.shape)
            raise TypeError(
                f"SHiRA wraps 2-D linear layers only; {name or type(base_layer).__name__} "
                f"has kernel shape {shape}. Choose nnx.Linear layers in target_modules."
            )
        self.base_layer = base_layer
        self.shira_weight = nnx.Dict()
        self.shira_indices = nnx.Dict()
        self.merge_backup = nnx.Dict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.layer_name = name

    # ------------------------------------------------------------------ shapes and names
    @property
    def in_features(self) -> int:
        return int(self.base_layer.kernel.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.kernel.shape[1])

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.shira_weight.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _require(self, adapter: str) -> None:
        if adapter not in self.shira_weight:
            raise KeyError(
                f"Layer {self.layer_name or '?'} has no adapter {adapter!r}; "
                f"it has {list(self.adapter_names)}."
            )

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        adapter: str,
        indices: np.ndarray | jax.Array,
        *,
        r: int,
        values: np.ndarray | jax.Array | None = None,
        init_weights: bool = True,
        key: jax.Array | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        active: bool = True,
    ) -> None:
        """Add an adapter at `indices` (`[2, nnz]`, kernel layout, unique).

        Values start at zero (`init_weights=True`), at standard normals drawn with `key`
        (`init_weights=False`, for tests), or at the given `values`.
        """
        if adapter in self.shira_weight:
            raise ValueError(f"Layer {self.layer_name}: adapter {adapter!r} already exists.")
        idx = jnp.asarray(indices, jnp.int32)
        nnz = idx.shape[1]
        if values is None:
            if init_weights:
                values = jnp.zeros((nnz,), param_dtype)
            else:
                key = jax.random.key(0) if key is None else key
                values = jax.random.normal(key, (nnz,), param_dtype)
        values = jnp.asarray(values, param_dtype)
        if values.shape != (nnz,):
            raise ValueError(
                f"Layer {self.layer_name}: adapter {adapter!r} has {nnz} indices but values "
                f"of shape {tuple(values.shape)}; they must be [nnz]."
            )
        kind = ShiraParam if active else ShiraFrozenValues
        self.shira_weight[adapter] = kind(values)
        self.shira_indices[adapter] = ShiraIndices(idx)
        self.r = {**self.r, adapter: int(r)}
        self.scaling = {**self.scaling, adapter: 1.0}

    def delete_adapter(self, adapter: str) -> None:
        self._require(adapter)
        if adapter in self.merged_adapters:
            raise ValueError(
                f"Layer {self.layer_name}: adapter {adapter!r} is merged; unmerge before deleting."
            )
        del self.shira_weight[adapter]
        del self.shira_indices[adapter]
        self.r = {k: v for k, v in self.r.items() if k != adapter}
        self.scaling = {k: v for k, v in self.scaling.items() if k != adapter}
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter)

    def set_adapter(self, adapters: str | Sequence[str]) -> None:
        """Make `adapters` the active ones; only active adapters' values train."""
        names = _tuple(adapters)
        self.active_adapters = names
        for name in self.adapter_names:
            variable = self.shira_weight[name]
            kind = ShiraParam if name in names else ShiraFrozenValues
            if type(variable) is not kind:
                self.shira_weight[name] = kind(variable[...], **variable.get_metadata())

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:  # as PEFT: silently skip layers without the adapter
            self.scaling = {**self.scaling, adapter: float(scale)}

    # ------------------------------------------------------------------ math
    def get_delta_weight(self, adapter: str) -> jax.Array:
        """Dense delta of one adapter, `[in, out]`, scale applied, in the values' dtype."""
        self._require(adapter)
        return ops.dense_delta(
            (self.in_features, self.out_features),
            self.shira_indices[adapter][...],
            self.shira_weight[adapter][...],
            self.scaling[adapter],
        )

    def _live_adapters(self) -> tuple[str, ...]:
        if self.disabled:
            return ()
        return tuple(
            a
            for a in self.active_adapters
            if a in self.shira_weight and a not in self.merged_adapters
        )

    def _patched(self, kernel: jax.Array, adapters: Sequence[str]) -> jax.Array:
        for a in adapters:
            kernel = ops.scatter_delta(
                kernel, self.shira_indices[a][...], self.shira_weight[a][...], self.scaling[a]
            )
        return kernel

    def effective_kernel(self) -> jax.Array:
        """The kernel the forward pass uses: base (merged adapters included) + live deltas."""
        return self._patched(self.base_layer.kernel[...], self._live_adapters())

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        live = self._live_adapters()
        if not live:
            return self.base_layer(inputs, *args, **kwargs)
        with _kernel_swapped(self.base_layer, self._patched(self.base_layer.kernel[...], live)):
            return self.base_layer(inputs, *args, **kwargs)

    # ------------------------------------------------------------------ merge
    def plan_merge(
        self, adapter_names: Sequence[str] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array], tuple[str, ...]]:
        """Merged kernel, per-adapter backups and names to merge, without changing the layer."""
        names = self.active_adapters if adapter_names is None else _tuple(adapter_names)
        names = tuple(a for a in names if a in self.shira_weight and a not in self.merged_adapters)
        kernel = self.base_layer.kernel[...]
        backups: dict[str, jax.Array] = {}
        for a in names:
            idx = self.shira_indices[a][...]
            backups[a] = kernel[idx[0], idx[1]]
            kernel = self._patched(kernel, (a,))
        return kernel, backups, names

    def commit_merge(
        self, kernel: jax.Array, backups: dict[str, jax.Array], names: Sequence[str]
    ) -> None:
        self.base_layer.kernel[...] = kernel
        for a in names:
            self.merge_backup[a] = ShiraMergeBackup(backups[a])
        self.merged_adapters = self.merged_adapters + tuple(names)

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the kernel, saving what they overwrite.

        With `safe_merge`, a non-finite result is refused and the layer left unchanged.
        """
        kernel, backups, names = self.plan_merge(adapter_names)
        if not names:
            return
        if safe_merge and not bool(jnp.isfinite(kernel).all()):
            raise ValueError(
                f"Layer {self.layer_name}: merging {list(names)} gives non-finite weights; "
                "the adapter seems broken. Nothing was merged."
            )
        self.commit_merge(kernel, backups, names)

    def unmerge(self) -> None:
        """Restore the exact original kernel entries, last merged first."""
        kernel = self.base_layer.kernel[...]
        for a in reversed(self.merged_adapters):
            kernel = ops.restore_entries(
                kernel, self.shira_indices[a][...], self.merge_backup[a][...]
            )
            del self.merge_backup[a]
        self.base_layer.kernel[...] = kernel
        self.merged_adapters = ()


@contextlib.contextmanager
def _kernel_swapped(layer: nnx.Module, kernel: jax.Array) -> Iterator[None]:
    """Let the base layer run its own call (dtype, precision, kwargs) on a patched kernel."""
    variable = layer.kernel
    original = variable.get_value()
    variable.set_value(kernel)
    try:
        yield
    finally:
        variable.set_value(original)
