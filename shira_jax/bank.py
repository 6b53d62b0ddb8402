"""`AdapterBank`: many SHiRA adapters kept beside a model, switched into its kernels by name.

A server that answers with one adapter at a time keeps that adapter merged (no adapter cost
in the forward pass) and swaps it when the next request needs another. The bank holds each
adapter's indices and values per layer (on the device, or in host memory), writes the chosen
one into the kernels in place, keeps the entries it overwrote, and writes them back before
the next one, so the base weights come back bit for bit. It uses the same in-place engine as
`sj.switch_adapter` (`layer.update_kernels`), and does not need the layers to be SHiRA
wrappers: plain `nnx.Linear` layers (e.g. after `merge_and_unload`) work as well.

Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.proj = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    >>> net = Net()
    >>> base = np.array(net.proj.kernel[...])
    >>> bank = sj.AdapterBank(net)
    >>> for seed, name in enumerate(["math", "code"]):
    ...     idx = sj.masks.random_mask(8, 8, r=1, seed=seed)
    ...     bank.add(name, {"proj": idx}, {"proj": np.full(idx.shape[1], 0.5, np.float32)})
    >>> seconds = bank.switch("math"); bank.current
    'math'
    >>> seconds = bank.switch("code"); len(bank.times)
    2
    >>> _ = bank.switch(None); bool((net.proj.kernel[...] == base).all())
    True
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from shira_jax.kernels import kernel_view
from shira_jax.layer import unwrap, update_kernels
from shira_jax.masks import validate_indices
from shira_jax.model import shira_layers
from shira_jax.util import get_submodule

__all__ = ["AdapterBank"]

_TOKENS = itertools.count()


class AdapterBank:
    """Adapters for `model`'s layers, switched into the kernels by name.

    Args:
        model: an NNX model; adapters address its layers by dotted path (`nnx.Linear` or a
            `ShiraDense` wrapping one; stacked kernels take `[*stack, 2, nnz]` indices).
        storage: `"device"` (default) keeps values and indices as device arrays, ready to
            write; `"host"` keeps them as NumPy arrays (host memory; 16-bit kernels on a CPU
            are written straight from them, others are copied to the device at each switch).

    Attributes:
        current: the adapter merged now (None: base weights).
        times: seconds of every `switch`, in order (the call returns it too).
    """

    def __init__(self, model: nnx.Module, *, storage: str = "device") -> None:
        if storage not in ("device", "host"):
            raise ValueError(f'storage must be "device" or "host", got {storage!r}.')
        self.model = model
        self.storage = storage
        self.current: str | None = None
        self.times: list[float] = []
        self._adapters: dict[str, dict[str, tuple[Any, Any, float]]] = {}
        self._saved: dict[str, Any] = {}
        self._token = next(_TOKENS)  # the engine's memo of written entries is per bank

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def _kernel(self, path: str) -> nnx.Variable:
        module = unwrap(get_submodule(self.model, path))
        view = kernel_view(module)
        if view is None or view.unsupported or view.layout is not None or view.quantized:
            raise TypeError(
                f"{path} is a {type(module).__name__}; AdapterBank switches nnx.Linear kernels "
                "([in, out] or stacked [L, in, out]). Use sj.switch_adapter for other kinds."
            )
        return view.variable

    def _store(self, array: Any, dtype: Any) -> Any:
        array = np.array(array, dtype)  # a copy: the bank never aliases the caller's memory
        return array if self.storage == "host" else jax.device_put(array)

    def add(
        self,
        name: str,
        indices: Mapping[str, Any],
        values: Mapping[str, Any],
        scale: float = 1.0,
    ) -> None:
        """Add adapter `name`: per layer path, `[*stack, 2, nnz]` indices and `[*stack, nnz]`
        values (kernel layout `[in, out]`), merged as `kernel + scale * delta`.

        Everything is checked (paths, shapes, unique in-range indices) before it is stored.
        """
        if name in self._adapters:
            raise ValueError(f"The bank already has an adapter {name!r}; pick another name.")
        if set(indices) != set(values):
            raise ValueError(f"Adapter {name!r}: indices and values name different layers.")
        entries = {}
        for path, idx in indices.items():
            shape = tuple(self._kernel(path).get_raw_value().shape)
            idx, vals = np.asarray(idx), np.asarray(values[path])
            if idx.shape[:-2] != shape[:-2] or vals.shape != (*idx.shape[:-2], idx.shape[-1]):
                raise ValueError(
                    f"Adapter {name!r}, layer {path} (kernel {shape}): indices {idx.shape} "
                    f"and values {vals.shape}; expected [*stack, 2, nnz] and [*stack, nnz]."
                )
            for one in idx.reshape(-1, *idx.shape[-2:]):
                one = validate_indices(one, shape[-2], shape[-1], layer_name=f"{name}:{path}")
                flat = one[0].astype(np.int64) * shape[-1] + one[1]
                if np.unique(flat).size != flat.size:  # an exact unmerge needs unique entries
                    raise ValueError(f"Adapter {name!r}, layer {path}: duplicate indices.")
            entries[path] = (self._store(idx, np.int32), self._store(vals, vals.dtype),
                             float(scale))
        self._adapters[name] = entries

    def add_from_model(self, name: str, *, adapter: str | None = None) -> None:
        """Copy adapter `adapter` (default: `name`) from the model's SHiRA layers."""
        adapter = name if adapter is None else adapter
        indices, values, scales = {}, {}, set()
        for path, layer in shira_layers(self.model):
            if adapter in layer.adapter_names:
                indices[path] = np.asarray(layer.shira_indices[adapter][...])
                values[path] = np.asarray(layer.shira_weight[adapter][...])
                scales.add(layer.scaling[adapter])
        if not indices:
            raise KeyError(f"No SHiRA layer of the model has an adapter {adapter!r}.")
        if len(scales) > 1:
            raise ValueError(f"Adapter {adapter!r} has different scales per layer: {scales}.")
        self.add(name, indices, values, scale=scales.pop())

    def remove(self, name: str) -> None:
        """Forget adapter `name` (switch away from it first if it is merged)."""
        if name == self.current:
            raise ValueError(f"Adapter {name!r} is merged; switch to another (or None) first.")
        del self._adapters[name]

    def switch(self, name: str | None) -> float:
        """Merge adapter `name` (None: the base weights) in place of the current one.

        Only the two adapters' entries are touched. Returns the seconds it took (until the
        new kernels are ready), also appended to `times`.
        """
        if name is not None and name not in self._adapters:
            raise KeyError(f"The bank has no adapter {name!r}; it has {list(self.names)}.")
        start = time.perf_counter()
        old = self._adapters.get(self.current, {}) if self.current is not None else {}
        new = self._adapters.get(name, {}) if name is not None else {}
        paths = list(dict.fromkeys([*old, *new]))
        variables = [self._kernel(p) for p in paths]
        restores = [[(old[p][0], self._saved[p])] if p in old else [] for p in paths]
        merges = [[new[p]] if p in new else [] for p in paths]
        tags = [[(name, ())] if p in new else [] for p in paths]
        saved = update_kernels(variables, restores, merges, tags=tags, owner=self._token)
        self._saved = {p: s[0] for p, s in zip(paths, saved) if s}
        self.current = name
        jax.block_until_ready([v.get_raw_value() for v in variables])
        seconds = time.perf_counter() - start
        self.times.append(seconds)
        return seconds

    def unmerge(self) -> float:
        """Write the base weights back (`switch(None)`)."""
        return self.switch(None)

