"""`ShiraDense`: a linear layer (any kernel kind) with one or more sparse high-rank adapters.

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
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from shira_jax import kernels, ops
from shira_jax.util import as_tuple


class ShiraParam(nnx.LoRAParam):
    """Trainable SHiRA values `[nnz]` of an active adapter: `nnx.Optimizer(..., wrt=ShiraParam)`.

    A subclass of `nnx.LoRAParam` (itself an `nnx.Param`): trainers that train only
    `LoRAParam` (Tunix's `PeftTrainer`, MaxText, EasyDeL) train exactly the SHiRA values. Pick
    base weights with `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`.
    """


class ShiraFrozenValues(nnx.Variable):
    """SHiRA values of an inactive adapter: kept, but not trained (PEFT's requires_grad=False)."""


class ShiraIndices(nnx.Variable):
    """Static int32 `[2, nnz]` positions (kernel layout: input row, output column)."""


class ShiraMergeBackup(nnx.Variable):
    """Kernel entries a merge overwrote, so that unmerge restores them bit for bit.

    `merge_backup[name]` is meaningful while `name` is in `merged_adapters`; the in-place
    engine keeps an unmerged adapter's entry (and overwrites it at its next merge)."""


class ShiraDense(nnx.Module):
    """Wraps a linear layer; each adapter is a flat value vector plus static indices.

    Any module `kernels.kernel_view` knows can be wrapped: `nnx.Linear`, `nnx.LinearGeneral`,
    `nnx.Einsum`, Tunix's `Einsum`, kinds taught by `register_kernel`. Indices address the
    weight as its `[in, out]` matrix (`kernels.KernelLayout` for N-D weights).

    The forward pass scatters `scaling * values` of every active, unmerged adapter into a copy
    of the kernel and runs the base layer's one matmul on it (never a second pass over x).
    An adapter with `delta_mode="sparse"` (or "auto" on few tokens) instead adds
    `ops.sparse_product` to the base output; on an N-D kernel the input is moved to `[*tokens,
    in]` and the product back to the module's output layout (`kernels.SparseRoute`).

    Attributes:
        base_layer: the wrapped layer (its weight seen as `[in, out]`).
        shira_weight: adapter name -> `ShiraParam` `[nnz]` (`ShiraFrozenValues` if inactive).
        shira_indices: adapter name -> `ShiraIndices` int32 `[2, nnz]`.
        r, scaling: adapter name -> budget rank and inference scale (1.0 by default).
        active_adapters, merged_adapters: tuples of adapter names.
    """

    def __init__(self, base_layer: nnx.Module, *, name: str = "") -> None:
        view = kernels.kernel_view(base_layer)
        label = name or type(base_layer).__name__
        if view is None or view.unsupported or view.stacked:
            why = "it has no weight SHiRA knows" if view is None else view.unsupported
            if view is not None and view.stacked:
                why = f"its kernel {view.variable.shape} is stacked (wrap it per slice)"
            raise TypeError(
                f"SHiRA cannot wrap {label} ({type(base_layer).__name__}): {why}. Choose other "
                "layers in target_modules, or teach SHiRA the kind with sj.register_kernel."
            )
        self.base_layer = base_layer
        self.weight_attr = view.attr
        self.kernel_layout = view.layout
        # the module's forward as an einsum: routes the sparse product (kernels.SparseRoute)
        self.sparse_einsum = view.einsum
        self.sparse_unsupported = kernels.sparse_refusal(view)  # "": delta_mode="sparse" runs
        self.quantized = view.quantized  # a qwix kernel: base matmul + delta product, no merge
        self.shira_weight = nnx.Dict()
        self.shira_indices = nnx.Dict()
        self.merge_backup = nnx.Dict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.delta_mode: dict[str, str] = {}
        self.parts: dict[str, int] = {}  # fused kernels (state.LayerState.parts), if not 1
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.layer_name = name

    # ------------------------------------------------------------------ shapes and names
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped layer (Tunix reads
        `q_proj.shape`, other code `in_features`, `dtype`, ...)."""
        if name.startswith("_") or "base_layer" not in vars(self):
            raise AttributeError(name)
        return getattr(vars(self)["base_layer"], name)

    @property
    def kernel_variable(self) -> nnx.Variable:
        """The wrapped layer's weight Variable (`kernel`, Tunix's `w`, ...), in its own shape."""
        return getattr(self.base_layer, self.weight_attr)

    @property
    def in_features(self) -> int:
        layout = self.kernel_layout
        return int(self.kernel_variable.shape[0]) if layout is None else layout.n_in

    @property
    def out_features(self) -> int:
        layout = self.kernel_layout
        return int(self.kernel_variable.shape[1]) if layout is None else layout.n_out

    @property
    def _stack_ndim(self) -> int | None:
        return None if self.kernel_layout is None else 0

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
        delta_mode: str = "patched",
    ) -> None:
        """Add an adapter at `indices` (`[2, nnz]`, kernel layout, unique).

        Values start at zero (`init_weights=True`), at standard normals drawn with `key`
        (`init_weights=False`, for tests), or at the given `values`.
        """
        if adapter in self.shira_weight:
            raise ValueError(f"Layer {self.layer_name}: adapter {adapter!r} already exists.")
        if delta_mode == "sparse" and self.sparse_unsupported:
            raise ValueError(
                f"Layer {self.layer_name or '?'}: delta_mode='sparse' cannot run on this "
                f"{type(self.base_layer).__name__} (weight {tuple(self.kernel_variable.shape)}): "
                f"{self.sparse_unsupported}. Use 'patched' or 'auto'."
            )
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
        # Sharding metadata derived from the kernel's (kernels.adapter_metadata); the arrays
        # are placed on the kernel's mesh, so nnx.get_partition_spec + jit need nothing else.
        vmeta, imeta = {}, {}
        if not self.quantized:
            kernel, lead = self.kernel_variable, self._stack_ndim
            vmeta, imeta = kernels.adapter_metadata(kernel, lead)
            values = kernels.place_like_kernel(values, kernel.get_value(), lead)
            idx = kernels.place_like_kernel(idx, kernel.get_value(), lead)
        self.shira_weight[adapter] = kind(values, **vmeta)
        self.shira_indices[adapter] = ShiraIndices(idx, **imeta)
        self.r = {**self.r, adapter: int(r)}
        self.scaling = {**self.scaling, adapter: 1.0}
        self.delta_mode = {**self.delta_mode, adapter: delta_mode}

    def delete_adapter(self, adapter: str) -> None:
        self._require(adapter)
        if adapter in self.merged_adapters:
            raise ValueError(
                f"Layer {self.layer_name}: adapter {adapter!r} is merged; unmerge before deleting."
            )
        del self.shira_weight[adapter]
        del self.shira_indices[adapter]
        if adapter in self.merge_backup:  # a backup kept from an earlier merge
            del self.merge_backup[adapter]
        self.r = {k: v for k, v in self.r.items() if k != adapter}
        self.scaling = {k: v for k, v in self.scaling.items() if k != adapter}
        self.delta_mode = {k: v for k, v in self.delta_mode.items() if k != adapter}
        self.parts = {k: v for k, v in self.parts.items() if k != adapter}
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter)

    def set_adapter(self, adapters: str | Sequence[str]) -> None:
        """Make `adapters` the active ones; only active adapters' values train."""
        names = as_tuple(adapters)
        if self.active_adapters != names:
            _set_static(self, "active_adapters", names)
        for name in self.adapter_names:
            variable = self.shira_weight[name]
            kind = ShiraParam if name in names else ShiraFrozenValues
            if type(variable) is kind:
                continue
            if _concrete(variable.get_raw_value()):  # same object, new kind: ~100x cheaper
                object.__setattr__(variable, "__class__", kind)  # (eager: no trace to check)
            else:
                self.shira_weight[name] = kind(variable[...], **variable.get_metadata())

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:  # as PEFT: silently skip layers without the adapter
            self.scaling = {**self.scaling, adapter: float(scale)}

    def refresh_placement(self) -> None:
        """Re-derive the adapters' sharding metadata from the kernel's and re-place them.

        Use after changing the kernel's `out_sharding` (e.g. `sharding.annotate`).
        """
        if self.quantized:
            return
        lead = self._stack_ndim
        vmeta, imeta = kernels.adapter_metadata(self.kernel_variable, lead)
        kernel = self.kernel_variable.get_value()
        for group, meta in ((self.shira_weight, vmeta), (self.shira_indices, imeta)):
            for name in list(group.keys()):
                var = group[name]
                old = {k: v for k, v in var.get_metadata().items() if k != "out_sharding"}
                old.update(meta)
                placed = kernels.place_like_kernel(var.get_value(), kernel, lead)
                group[name] = type(var)(placed, **old)

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

    def _scatter(self, kernel: Any) -> Any:
        # shard-local scatter when the kernel is split over a mesh, else ops.scatter_delta
        return kernels.scatter_fn(self.kernel_variable, kernel, self.kernel_layout)

    def _gather(self, kernel: jax.Array, indices: jax.Array) -> jax.Array:
        """The kernel entries at `[in, out]` matrix `indices`."""
        if self.kernel_layout is None:
            return kernel[indices[0], indices[1]]
        return kernel[self.kernel_layout.native_coords(indices)]

    def _restore(self, kernel: jax.Array, indices: jax.Array, saved: jax.Array) -> jax.Array:
        """`ops.restore_entries` at `[in, out]` matrix `indices` (N-D kernels via storage)."""
        layout = self.kernel_layout
        if layout is None:
            return ops.restore_entries(kernel, indices, saved)
        flat = ops.restore_entries(
            layout.to_storage(kernel), layout.storage_indices(indices), saved
        )
        return layout.to_native(flat)

    def _patched(
        self,
        kernel: jax.Array,
        adapters: Sequence[str],
        indices: Sequence[jax.Array] | None = None,
        values: Sequence[jax.Array] | None = None,
    ) -> jax.Array:
        """`kernel` plus the scaled deltas of `adapters` (their stored indices and values, or
        the given ones), each rounded once to the kernel's dtype."""
        scatter = self._scatter(kernel)
        for i, a in enumerate(adapters):
            idx = self.shira_indices[a][...] if indices is None else indices[i]
            vals = self.shira_weight[a][...] if values is None else values[i]
            kernel = scatter(kernel, idx, vals, self.scaling[a])
        return kernel

    def effective_kernel(self) -> jax.Array:
        """The kernel the forward pass uses: base (merged adapters included) + live deltas."""
        return self._patched(self.kernel_variable[...], self._live_adapters())

    #: Rebuild the patched kernel in the backward pass instead of keeping one per layer
    #: (`ops.patched_call`): a SHiRA step then holds no more memory than a LoRA step. Set it to
    #: False on a layer (or the class) for plain autodiff, e.g. to use forward-mode `jax.jvp`.
    recompute_in_backward: bool = True

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        mixed = getattr(self, "mixed_ids", None)
        if mixed is not None and not self.disabled and set(self.mixed_names) & set(
            self.adapter_names
        ):
            return self._mixed_call((self.mixed_names, mixed[...]), inputs, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return self.base_layer(inputs, *args, **kwargs)
        route = self._sparse_route()
        tokens = math.prod(inputs.shape[:-1]) if route is None else route.tokens(inputs.shape)
        sparse = tuple(a for a in live if self.resolved_mode(a, tokens) == "sparse")
        if not sparse:
            return self._patched_forward(live, inputs, *args, **kwargs)
        patched = tuple(a for a in live if a not in sparse)
        if patched:
            out = self._patched_forward(patched, inputs, *args, **kwargs)
        else:
            out = self.base_layer(inputs, *args, **kwargs)
        rows = inputs if route is None else route.rows(inputs)  # [*tokens, in]
        for a in sparse:
            product = ops.sparse_product
            if self.quantized and self._dense_delta_call(a, tokens):
                product = ops.dense_delta_product
            delta = product(
                rows, self.shira_indices[a][...], self.shira_weight[a][...],
                self.out_features, self.scaling[a],
            )
            delta = delta if route is None else route.output(delta)
            out = out + delta.astype(out.dtype)
        return out

    def _sparse_route(self) -> kernels.SparseRoute | None:
        """How the input and output of a kernel seen through an einsum meet its `[in, out]`
        matrix (None: a plain `[in, out]` kernel, or one the sparse product cannot take)."""
        if self.sparse_einsum is None or self.sparse_unsupported:
            return None
        layout = kernels.matrix_layout(self.kernel_layout, self.in_features, self.out_features)
        return kernels.sparse_route(self.sparse_einsum, layout)

    def resolved_mode(self, adapter: str, tokens: int) -> str:
        """"patched" or "sparse": the adapter's `delta_mode`, with "auto" decided for a call
        over `tokens` input rows (`ops.prefer_sparse` on the `[in, out]` matrix; patched where
        the sparse product cannot run: `sparse_unsupported`)."""
        mode = self.delta_mode.get(adapter, "patched")
        if self.quantized:
            return "sparse"
        if mode != "auto":
            return mode
        if self.sparse_unsupported:
            return "patched"
        return "sparse" if self._auto_prefers_sparse(adapter, tokens) else "patched"

    def _auto_prefers_sparse(self, adapter: str, tokens: int) -> bool:
        """`ops.prefer_sparse` for this adapter's `nnz` on the `[in, out]` matrix."""
        nnz = int(self.shira_indices[adapter].shape[-1])
        return ops.prefer_sparse(tokens, nnz, self.in_features, self.out_features)

    def _dense_delta_call(self, adapter: str, tokens: int) -> bool:
        """On a quantized kernel, whether this call multiplies by the dense delta instead of
        running the sparse product: for `delta_mode` "patched" (the default) and for "auto" at
        training-sized calls, where the sparse product's gathers cost far more than one more
        matmul (BENCHMARKS.md section 7). "sparse" always takes the sparse product."""
        mode = self.delta_mode.get(adapter, "patched")
        if mode == "sparse":
            return False
        return mode == "patched" or not self._auto_prefers_sparse(adapter, tokens)

    def _patched_forward(
        self, live: tuple[str, ...], inputs: jax.Array, *args: Any, **kwargs: Any
    ) -> jax.Array:
        """The base layer's own call on `kernel + deltas of live` (one matmul)."""
        kernel = self.kernel_variable[...]
        if not self.recompute_in_backward:
            with _kernel_swapped(self.kernel_variable, self._patched(kernel, live)):
                return self.base_layer(inputs, *args, **kwargs)
        # The base layer runs its own call (dtype promotion, precision, bias, extra arguments)
        # on a pure copy of itself whose kernel is the patched one.
        graphdef, kernel_state, rest = nnx.split(
            self.base_layer, _weight_filter(self.weight_attr), ...
        )
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

        scatter = self._scatter(kernel)  # decided here, on the Variable and its array

        def patch(kernel: jax.Array, indices: Any, values: Any) -> jax.Array:
            for a, idx, vals in zip(live, indices, values):
                kernel = scatter(kernel, idx, vals, self.scaling[a])
            return kernel

        def apply(kernel: jax.Array, operands: Any) -> jax.Array:
            x, rest_state, dynamic_leaves = operands
            call_leaves = list(leaves)
            for i, leaf in zip(dynamic, dynamic_leaves):
                call_leaves[i] = leaf
            call_args, call_kwargs = jax.tree.unflatten(treedef, call_leaves)
            patched_state = jax.tree.map(lambda _: kernel, kernel_state)
            return nnx.merge(graphdef, patched_state, rest_state)(x, *call_args, **call_kwargs)

        return ops.patched_call(
            patch,
            apply,
            kernel,
            tuple(self.shira_indices[a][...] for a in live),
            tuple(self.shira_weight[a][...] for a in live),
            (inputs, rest, [leaves[i] for i in dynamic]),
        )

    def _mixed_call(
        self, mix: tuple[tuple[str, ...], jax.Array], inputs: jax.Array, *args: Any, **kwargs: Any
    ) -> jax.Array:
        """One adapter (or none: id -1) per example along the leading axis of `inputs`: each
        example runs the base layer's own call on its own patched kernel (one batched matmul).
        """
        names, ids = mix
        if self.quantized:
            raise ValueError(
                f"Layer {self.layer_name or '?'}: its kernel is quantized; mixed-adapter batches "
                "need float kernels. Run the adapters one at a time."
            )
        if self.merged_adapters:
            raise ValueError(
                f"Layer {self.layer_name or '?'}: adapters {list(self.merged_adapters)} are "
                "merged; unmerge before mixing adapters per example."
            )
        if jnp.ndim(ids) != 1 or inputs.shape[0] != ids.shape[0]:
            raise ValueError(
                f"Layer {self.layer_name or '?'}: {jnp.shape(ids)} adapter ids for inputs of "
                f"shape {inputs.shape}; give one id per example (the leading axis)."
            )
        kernel = self.kernel_variable[...]
        layout = self.kernel_layout
        matrix = kernel if layout is None else layout.to_storage(kernel)
        nnz = max(int(self.shira_indices[a].shape[-1]) for a in self.adapter_names)
        # One row per model adapter, in the matrix's own (storage) positions, plus one for the
        # base; padding and absent adapters point past the last row (ops.scatter_block drops
        # them), so every example's kernel is rounded exactly as the one-adapter forward does.
        empty = jnp.stack([jnp.full((nnz,), matrix.shape[0], jnp.int32), jnp.zeros(nnz, jnp.int32)])
        table_idx, table_vals = [], []
        for a in names:
            if a not in self.shira_weight:
                table_idx.append(empty)
                table_vals.append(jnp.zeros((nnz,), jnp.float32))
                continue
            i = self.shira_indices[a][...]
            i = i if layout is None else layout.storage_indices(i)
            pad = nnz - i.shape[-1]
            table_idx.append(jnp.concatenate([i, empty[:, :pad]], axis=1))
            v = self.shira_weight[a][...].astype(jnp.float32) * jnp.float32(self.scaling[a])
            table_vals.append(jnp.pad(v, (0, pad)))
        table_idx.append(empty)
        table_vals.append(jnp.zeros((nnz,), jnp.float32))
        rows = jnp.where(ids < 0, len(names), ids)
        picked_idx, picked_vals = jnp.stack(table_idx)[rows], jnp.stack(table_vals)[rows]
        graphdef, kernel_state, rest = nnx.split(
            self.base_layer, _weight_filter(self.weight_attr), ...
        )

        def one(i: jax.Array, v: jax.Array, x: jax.Array) -> jax.Array:
            k = ops.scatter_block(matrix, i[0], i[1], v, jnp.float32(1.0))
            k = k if layout is None else layout.to_native(k)
            patched = jax.tree.map(lambda _: k, kernel_state)
            return nnx.merge(graphdef, patched, rest)(x[None], *args, **kwargs)[0]

        return jax.vmap(one)(picked_idx, picked_vals, inputs)

    # ------------------------------------------------------------------ merge
    def plan_merge(
        self, adapter_names: Sequence[str] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array], tuple[str, ...]]:
        """Merged kernel, per-adapter backups and names to merge, without changing the layer."""
        names = self.active_adapters if adapter_names is None else as_tuple(adapter_names)
        names = tuple(a for a in names if a in self.shira_weight and a not in self.merged_adapters)
        if self.quantized and names:
            raise ValueError(
                f"Layer {self.layer_name or '?'}: its kernel is quantized (qwix); merging "
                f"{list(names)} would need dequantize, add, requantize, which changes every "
                "weight by the quantization error. Keep the adapter unmerged (the forward adds "
                "the sparse product), or merge into the float model before quantizing."
            )
        kernel = self.kernel_variable[...]
        backups: dict[str, jax.Array] = {}
        if self._scatter(kernel) is not ops.scatter_delta:  # split over a mesh, or N-D
            for a in names:
                backups[a] = self._gather(kernel, self.shira_indices[a][...])
                kernel = self._patched(kernel, (a,))
            return kernel, backups, names
        for a in names:  # one gather per adapter: the saved entries are the ones added to
            kernel, backups[a] = ops.merge_entries(
                kernel, self.shira_indices[a][...], self.shira_weight[a][...], self.scaling[a]
            )
        return kernel, backups, names

    def commit_merge(
        self, kernel: jax.Array, backups: dict[str, jax.Array], names: Sequence[str]
    ) -> None:
        self.kernel_variable[...] = kernel
        for a in names:
            self.merge_backup[a] = ShiraMergeBackup(backups[a])
        self.merged_adapters = self.merged_adapters + tuple(names)

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the kernel, saving what they overwrite.

        With `safe_merge`, a non-finite result is refused and the layer left unchanged.
        """
        if _fast(self):  # one compiled pass (or in-buffer write), in place when possible
            merge_layers([self], adapter_names, safe_merge=safe_merge)
            return
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
        if not self.merged_adapters:
            return
        if _fast(self):  # one pass, in place when nothing else holds the kernel
            unmerge_layers([self])
            return
        kernel = self.kernel_variable[...]
        for a in reversed(self.merged_adapters):
            kernel = self._restore(kernel, self.shira_indices[a][...], self.merge_backup[a][...])
            del self.merge_backup[a]
        self.kernel_variable[...] = kernel
        self.merged_adapters = ()

    # ------------------------------------------------------------------ switching
    def switch(self, old: str | None, new: str | None, *, safe_merge: bool = False) -> None:
        """In merged mode, replace merged adapter `old` by `new` in one pass over their entries.

        `old`'s saved entries are written back and `new` is merged (its overwritten entries
        saved for `unmerge`), in one compiled pass that updates the kernel in place (donated)
        when nothing else holds it: the kernel's other entries are never read or copied.
        `old=None` only merges `new`; `new=None` only unmerges `old`. `new` takes `old`'s place
        among the active adapters. Unmerging afterwards still restores the base bit for bit.

        With `safe_merge`, non-finite merged entries are refused and the layer left unchanged.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import shira_jax as sj
            >>> layer = sj.ShiraDense(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
            >>> for i, name in enumerate(["a", "b"]):
            ...     layer.add_adapter(name, sj.masks.random_mask(8, 4, r=1, seed=i), r=1,
            ...                       init_weights=False)
            >>> base = layer.base_layer.kernel[...].copy()
            >>> layer.set_adapter("a"); layer.merge()
            >>> layer.switch("a", "b")
            >>> layer.merged_adapters, layer.active_adapters
            (('b',), ('b',))
            >>> layer.unmerge(); bool((layer.base_layer.kernel[...] == base).all())
            True
        """
        for name in (old, new):
            if name is not None:
                self._require(name)
        switch_layers([self], old, new, safe_merge=safe_merge)

    def _switch_plan(
        self, old: str | None, new: str | None, *, unmerge_all: bool = False
    ) -> _SwitchPlan:
        """What `switch(old, new)` writes: entries to restore, adapters to (re)merge."""
        merged = self.merged_adapters
        joining = new is not None and new in self.shira_weight and new not in merged
        add = (new,) if joining else ()
        if unmerge_all:
            undo, redo, order = merged, (), ()
        elif old is not None and old in merged:
            # restore old and everything merged after it (their saved entries may include
            # old's delta), then merge new and re-merge those, so unmerge stays exact
            pos = merged.index(old)
            undo, after = merged[pos:], merged[pos + 1 :]
            redo, order = add + after, merged[:pos] + add + after
        else:
            undo, redo, order = (), add, merged + add
        return _make_plan(self, undo, redo, order)


class _SwitchPlan:
    """One layer's part of a switch: restore `undo`, merge `redo`, end with `order` merged."""

    __slots__ = ("layer", "undo", "redo", "order", "restores", "merges", "tags")

    def __init__(self, layer, undo, redo, order, restores, merges) -> None:
        self.layer, self.undo, self.redo, self.order = layer, undo, redo, order
        self.restores, self.merges = restores, merges

    @property
    def empty(self) -> bool:
        return not self.restores and not self.merges


def _raw(variable: nnx.Variable) -> Any:
    """A Variable's array without `get_value`'s copy and hooks (~30 us each on NNX 0.12)."""
    value = variable.get_raw_value()
    return value if isinstance(value, (jax.Array, np.ndarray)) else variable[...]


def _make_plan(
    layer: ShiraDense, undo: Sequence[str], redo: Sequence[str], order: tuple[str, ...]
) -> _SwitchPlan:
    """Restore `undo`'s saved entries (last merged first), merge `redo`, end with `order`."""
    restores = [(_raw(layer.shira_indices[a]), _raw(layer.merge_backup[a])) for a in reversed(undo)]
    merges = [
        (_raw(layer.shira_indices[a]), _raw(layer.shira_weight[a]), layer.scaling[a])
        for a in redo
    ]
    plan = _SwitchPlan(layer, tuple(undo), tuple(redo), order, restores, merges)
    first = len(order) - len(redo)  # redo is the tail of order: what lies below each merge
    plan.tags = [(a, order[: first + j]) for j, a in enumerate(redo)]
    return plan


def _merge_plan(layer: ShiraDense, names: Sequence[str] | None) -> _SwitchPlan:
    chosen = layer.active_adapters if names is None else names
    merged = layer.merged_adapters
    todo = tuple(a for a in chosen if a in layer.shira_weight and a not in merged)
    return _make_plan(layer, (), todo, merged + todo)


def _sole_owner(values: list[Any], i: int) -> bool:
    """True when only the kernel Variable holds `values[i]`, so donating it changes nothing
    visible: the count covers the Variable, the list, this frame's name and `getrefcount`'s
    argument. A NumPy view of the array makes XLA copy instead of donating (safe as well)."""
    value = values[i]
    if not isinstance(value, jax.Array) or value.is_deleted():
        return False
    return sys.getrefcount(value) <= 4


def _fast(layer: ShiraDense) -> bool:
    """The in-place engine applies: a concrete kernel (2-D or stacked), outside any trace."""
    if layer.kernel_layout is not None or layer.quantized:  # these merge through plan_merge
        return False
    value = layer.kernel_variable.get_raw_value()
    return _concrete(value) and value.ndim in (2, 3)


def _commit(plan: _SwitchPlan, entries: Sequence[jax.Array]) -> None:
    """Record one plan's backups and merge order (raw setters: no NNX bookkeeping).

    Backups of adapters restored here stay in `merge_backup` (ignored until the adapter is
    merged again, then overwritten in place): adding or removing an `nnx.Dict` entry costs
    ~150 us of NNX attribute checks, which a model-wide switch would pay per layer.
    """
    layer = plan.layer
    backups = layer.merge_backup
    for a, e in zip(plan.redo, entries):
        if a in backups:
            backups[a].set_raw_value(e)
        else:
            backups[a] = ShiraMergeBackup(e)
    if layer.merged_adapters != plan.order:
        _set_static(layer, "merged_adapters", plan.order)


def _sharded_body(kernel, restore, merge, *, mesh, spec):  # noqa: ANN001, ANN202
    rows_axes, cols_axes = (kernels.axis_names(e) for e in spec)
    sizes = dict(mesh.shape)
    b0 = kernel.shape[0] // math.prod(sizes[a] for a in rows_axes)
    b1 = kernel.shape[1] // math.prod(sizes[a] for a in cols_axes)

    def block_start(axes: tuple[str, ...], size: int) -> jax.Array:
        index = jnp.int32(0)
        for a in axes:
            index = index * sizes[a] + jax.lax.axis_index(a)
        return index * size

    def local(block, restore, merge):  # noqa: ANN001, ANN202
        row0, col0 = block_start(rows_axes, b0), block_start(cols_axes, b1)
        for idx, saved in restore:
            block = ops.write_block(block, idx[0] - row0, idx[1] - col0, saved)
        saved_now = []
        for idx, values, scale in merge:
            rows, cols = idx[0] - row0, idx[1] - col0
            bits = ops.gather_block_bits(block, rows, cols)  # 0 outside this block: sums exact
            block = ops.scatter_block(block, rows, cols, values, scale)
            saved_now.append(jax.lax.psum(bits, rows_axes + cols_axes))
        return block, saved_now

    kspec = PartitionSpec(*spec)
    block, bits = jax.shard_map(
        local, mesh=mesh, in_specs=(kspec, PartitionSpec(), PartitionSpec()),
        out_specs=(kspec, PartitionSpec()),
    )(kernel, restore, merge)
    return block, [ops.entries_from_bits(b, kernel.dtype) for b in bits]


_sharded_donated = jax.jit(_sharded_body, static_argnames=("mesh", "spec"), donate_argnums=(0,))
_sharded_copied = jax.jit(_sharded_body, static_argnames=("mesh", "spec"))


def _scale(scale: Any) -> Any:
    # a NumPy scalar: jit passes it to every device cheaply (a jnp scalar lives on one device)
    return np.float32(scale) if isinstance(scale, (int, float)) else scale


def _switch_sharded(
    kernel: jax.Array, restores: Any, merges: Any, layout: Any, donate: bool
) -> Any:
    """One kernel's switch when it is split over a mesh: every device writes its own block."""
    mesh, spec = layout
    spec = tuple(e if e is None or isinstance(e, str) else tuple(e) for e in spec)
    merges = [(i, v, _scale(s)) for i, v, s in merges]
    run = _sharded_donated if donate else _sharded_copied
    return run(kernel, restores, merges, mesh=mesh, spec=spec)


def update_kernels(
    variables: Sequence[nnx.Variable],
    restores: Sequence[Sequence[tuple[Any, Any]]],
    merges: Sequence[Sequence[tuple[Any, Any, Any]]],
    *,
    check_finite: bool = False,
    labels: Sequence[str] | None = None,
    tags: Sequence[Sequence[Any]] | None = None,
    owner: Any = "layers",
) -> list[list[jax.Array]]:
    """Restore then merge entries of many kernel Variables in place; returns, per kernel, the
    entries each merge overwrote (what its unmerge writes back).

    Same-shaped kernels run in one compiled, donated call per group (`ops.switch_kernels`;
    16-bit kernels on one CPU in their own buffer), kernels split over a mesh shard by shard
    (`shard_map`, nothing gathered). A kernel is donated only when nothing but its Variable
    holds it. With `check_finite` nothing is donated, and non-finite merged entries raise
    (naming `labels`) with every Variable unchanged.

    `tags` (per kernel, per merge: a hashable naming the adapter and what lies below it)
    let a merge reuse the entries it read and wrote last time, when only this engine (for
    the same `owner`) has written the kernel since: the merge is then a pure write, as cheap
    as a restore (`_reuse`).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from shira_jax import layer
        >>> w = nnx.Param(jnp.zeros((2, 2)))
        >>> idx = jnp.array([[0, 1], [1, 0]], jnp.int32)
        >>> [[saved]] = layer.update_kernels([w], [[]], [[(idx, jnp.array([1.0, 2.0]), 1.0)]])
        >>> w[...].tolist(), saved.tolist()
        ([[0.0, 1.0], [2.0, 0.0]], [0.0, 0.0])
    """
    values = [v.get_raw_value() for v in variables]
    counts: dict[int, int] = {}
    for i in range(len(values)):  # (no loop name bound to a kernel: it would count as a holder)
        counts[id(values[i])] = counts.get(id(values[i]), 0) + 1
    donate = [
        not check_finite and counts[id(values[i])] == 1 and _sole_owner(values, i)
        for i in range(len(values))
    ]
    layouts = [
        kernels.kernel_layout(var, v) if v.ndim == 2 else None
        for var, v in zip(variables, values)
    ]
    memos = [_memo(var, values[i], owner) for i, var in enumerate(variables)]
    reuse = [
        _reuse(memo, merges[i], tags[i]) if tags and not check_finite and layouts[i] is None
        else None
        for i, memo in enumerate(memos)
    ]
    befores = [getattr(v, "sharding", None) for v in values]
    results = _execute(values, restores, merges, reuse, layouts, donate)
    if check_finite:  # only merged entries can have become non-finite
        _check_finite(labels or ["?"] * len(results), merges, results)
    saved = []
    for i, (var, before, (kernel, entries)) in enumerate(zip(variables, befores, results)):
        if before is not None and getattr(kernel, "sharding", None) != before:
            kernel = jax.device_put(kernel, before)
        memos[i].track(var, kernel)  # before the old array is released
        if isinstance(var.get_raw_value(), jax.Array):
            var.set_raw_value(kernel)
        else:
            var.set_value(kernel)
        if reuse[i]:
            saved.append([old for old, _ in reuse[i]])
            continue
        saved.append([old for old, _ in entries])
        for merge, tag, (old, new) in zip(merges[i], tags[i] if tags else (), entries):
            if new is not None:
                memos[i].entries[tag] = (*merge, old, new)
    return saved


def _execute(values, restores, merges, reuse, layouts, donate):  # noqa: ANN001, ANN202
    """Run the kernels' restores and merges (reused merges as plain writes); empties
    `values` so that no reference of this frame keeps a donated kernel alive."""
    restores = [
        [*r, *((m[0], new) for m, (_, new) in zip(merge, hit))] if hit else r
        for r, merge, hit in zip(restores, merges, reuse)
    ]
    merges = [[] if hit else m for m, hit in zip(merges, reuse)]
    results: list[Any] = [None] * len(values)
    for i, layout in enumerate(layouts):
        if layout is not None:
            value, values[i] = values[i], None
            kernel, saved = _switch_sharded(value, restores[i], merges[i], layout, donate[i])
            results[i] = (kernel, [(s, None) for s in saved])
            del value
    plain = [i for i, layout in enumerate(layouts) if layout is None]
    batch = [values[i] for i in plain]
    for i in plain:
        values[i] = None
    new, saved = ops.switch_kernels(
        batch, [restores[i] for i in plain], [merges[i] for i in plain],
        [donate[i] for i in plain], written=True,
    )
    for i, k, e in zip(plain, new, saved):
        results[i] = (k, e)
    return results


class _Memo:
    """What the engine last did to one kernel: the array it left there, its owner, and per
    merge tag `(indices, values, scale, overwritten, written)`."""

    __slots__ = ("array", "owner", "entries", "__weakref__")

    def __init__(self, owner: Any) -> None:
        self.array: Any = None
        self.owner = owner
        self.entries: dict[Any, tuple[Any, ...]] = {}

    def track(self, variable: nnx.Variable, kernel: Any) -> None:
        """Remember `kernel` as the array left in `variable`; the memo goes with it."""
        key, me = id(variable), weakref.ref(self)

        def gone(ref: Any) -> None:  # the kernel died: drop the memo unless it moved on
            memo = me()
            if memo is not None and memo.array is ref and _MEMOS.get(key) is memo:
                del _MEMOS[key]

        try:
            self.array = weakref.ref(kernel, gone)
        except TypeError:
            self.array = None


# Keyed by id(kernel Variable) (Variables take no weak references); an entry is used only
# while the Variable still holds the very array recorded in it, so a reused id is harmless.
_MEMOS: dict[int, _Memo] = {}


def _memo(variable: nnx.Variable, value: Any, owner: Any) -> _Memo:
    """The kernel's memo, emptied unless the kernel is still the array the engine left there
    for the same owner (any other write, e.g. new base weights, invalidates it)."""
    memo = _MEMOS.get(id(variable))
    if memo is None:
        memo = _MEMOS[id(variable)] = _Memo(owner)
    if memo.owner != owner or memo.array is None or memo.array() is not value:
        memo.entries.clear()
        memo.owner = owner
    return memo


def _reuse(memo: _Memo, merge: Sequence[Any], tags: Sequence[Any]) -> list[Any] | None:
    """`(overwritten, written)` per merge when every one is memoised for the same indices,
    values (the same array objects) and scale, else None (the merge reads the kernel).

    A tag names the adapter and the adapters merged below it; with the kernel unchanged but
    by this engine, the entries under an adapter are then the ones it saw last time."""
    if not merge or not tags:
        return None
    out = []
    for (idx, vals, scale), tag in zip(merge, tags):
        hit = memo.entries.get(tag)
        if hit is None or hit[0] is not idx or hit[1] is not vals or hit[2] != scale:
            return None
        out.append(hit[3:])
    return out


def _run_switch_plans(plans: list[_SwitchPlan], *, check_finite: bool = False) -> None:
    """Execute the plans in place (`update_kernels`) and commit their backups and order."""
    plans = [p for p in plans if not p.empty]
    if not plans:
        return
    saved = update_kernels(
        [p.layer.kernel_variable for p in plans], [p.restores for p in plans],
        [p.merges for p in plans], check_finite=check_finite,
        labels=[p.layer.layer_name or "?" for p in plans], tags=[p.tags for p in plans],
    )
    for p, entries in zip(plans, saved):
        _commit(p, entries)


def _check_finite(labels: Sequence[str], merges: Any, results: Sequence[Any]) -> None:
    bad = [
        label
        for label, merge, (_, entries) in zip(labels, merges, results)
        if not all(bool(jnp.isfinite(_merged(e, m)).all()) for (e, _), m in zip(entries, merge))
    ]
    if bad:
        raise ValueError(
            f"Merging gives non-finite weights in {bad[:3]}; the adapter seems broken. "
            "Nothing was changed."
        )


def _merged(saved: jax.Array, merge: Any) -> jax.Array:
    """The merged entries of one adapter, recomputed from what it overwrote."""
    _, values, scale = merge
    new = saved.astype(jnp.float32) + jnp.float32(scale) * values.astype(jnp.float32)
    return new.astype(saved.dtype)


def _check_plain(layers: Sequence[ShiraDense]) -> None:
    for layer in layers:
        if layer.quantized:
            raise ValueError(
                f"Layer {layer.layer_name or '?'}: its kernel is quantized; merged-mode "
                "switching is not available there (adapters stay unmerged)."
            )
        if not _concrete(layer.kernel_variable.get_raw_value()):
            raise ValueError(
                f"Layer {layer.layer_name or '?'}: switching needs a concrete 2-D or stacked "
                "kernel outside jit; call it eagerly."
            )


def switch_layers(
    layers: Sequence[ShiraDense], old: str | None, new: str | None, *, safe_merge: bool = False
) -> None:
    """`ShiraDense.switch` over many layers (plain or stacked), in place, grouped by shape."""
    _check_plain(layers)
    plans = [layer._switch_plan(old, new) for layer in layers]
    _remerge_nd([(p.layer, p.order) for p in plans if p.layer.kernel_layout is not None],
                safe_merge=safe_merge)
    _run_switch_plans([p for p in plans if p.layer.kernel_layout is None],
                      check_finite=safe_merge)
    if old is None or new is None:
        return
    for layer in layers:
        if old in layer.active_adapters:
            active = tuple(dict.fromkeys(new if a == old else a for a in layer.active_adapters))
            layer.set_adapter(active)  # re-types values: only the active ones train


def merge_layers(
    layers: Sequence[ShiraDense], names: Sequence[str] | None, *, safe_merge: bool = False
) -> None:
    """`ShiraDense.merge` over many layers: concrete kernels in one in-place engine call, traced
    ones layer by layer; with `safe_merge` a non-finite result anywhere merges nothing."""
    fast = [layer for layer in layers if _fast(layer)]
    slow = [(layer, *plan_merge(layer, names)) for layer in layers if not _fast(layer)]
    if safe_merge:
        for layer, kernel, _, todo in slow:
            if todo and not bool(jnp.isfinite(kernel).all()):
                raise ValueError(
                    f"Merging {list(todo)} into {layer.layer_name or '?'} gives non-finite "
                    "weights; the adapter seems broken. Nothing was merged."
                )
    _run_switch_plans([_merge_plan(layer, names) for layer in fast], check_finite=safe_merge)
    for layer, kernel, backups, todo in slow:
        if todo:
            commit_merge(layer, kernel, backups, todo)


def unmerge_layers(layers: Sequence[ShiraDense]) -> None:
    """`ShiraDense.unmerge` over many layers: saved entries written back, last merged first."""
    fast = [layer for layer in layers if _fast(layer) and layer.merged_adapters]
    _run_switch_plans([_make_plan(layer, layer.merged_adapters, (), ()) for layer in fast])
    for layer in layers:
        if layer.merged_adapters and not _fast(layer):
            unmerge_layer(layer)


def remerge_layers(
    layers: Sequence[ShiraDense], names: Sequence[Sequence[str]] | Sequence[str]
) -> None:
    """Make `names` the merged adapters of every layer (one sequence for all, or one per
    layer), in one pass per kernel: the merged ones are restored, then `names` merged."""
    _check_plain(layers)
    per_layer = names and not isinstance(names[0], str)
    plans = []
    for i, layer in enumerate(layers):
        wanted = tuple(a for a in (names[i] if per_layer else names) if a in layer.shira_weight)
        if wanted != layer.merged_adapters and layer.kernel_layout is not None:
            _remerge_nd([(layer, wanted)])
        elif wanted != layer.merged_adapters:
            plans.append(_make_plan(layer, layer.merged_adapters, wanted, wanted))
    _run_switch_plans(plans)


def _remerge_nd(
    todo: Sequence[tuple[ShiraDense, tuple[str, ...]]], *, safe_merge: bool = False
) -> None:
    """Make `order` the merged adapters of N-D-kernel layers: unmerge (exact), then merge in
    order, which gives the in-place engine's bits. On a refused merge every layer is put back."""
    done: list[tuple[ShiraDense, tuple[str, ...]]] = []
    try:
        for layer, order in todo:
            if layer.merged_adapters == tuple(order):
                continue
            done.append((layer, layer.merged_adapters))
            unmerge_layer(layer)
            layer.merge(order, safe_merge=safe_merge)
    except ValueError:
        for layer, before in reversed(done):
            unmerge_layer(layer)
            layer.merge(before)
        raise


def _set_static(module: nnx.Module, name: str, value: tuple[str, ...]) -> None:
    """Set an existing static (tuple of names) attribute; outside a trace this skips NNX's
    ~100 us of attribute bookkeeping, which only matters for new or data attributes."""
    probe = module.kernel_variable
    if module.quantized:  # a qwix kernel: look at the adapter values instead
        probe = next(iter(module.shira_weight.values()), None)
    raw = probe.get_raw_value() if isinstance(probe, nnx.Variable) else None
    if name in vars(module) and not isinstance(raw, jax.core.Tracer):
        object.__setattr__(module, name, value)
    else:
        setattr(module, name, value)


def _concrete(value: Any) -> bool:
    return isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)


def _weight_filter(attr: str) -> Callable[[tuple[Any, ...], Any], bool]:
    """An `nnx.split` filter for the wrapped layer's weight attribute."""

    def is_weight(path: tuple[Any, ...], _: Any) -> bool:
        return tuple(str(p) for p in path) == (attr,)

    return is_weight


@contextlib.contextmanager
def _kernel_swapped(variable: nnx.Variable, kernel: jax.Array) -> Iterator[None]:
    """Let the base layer run its own call (dtype, precision, kwargs) on a patched kernel."""
    original = variable.get_value()
    variable.set_value(kernel)
    try:
        yield
    finally:
        variable.set_value(original)


# ----------------------------------------------------------------------------- mixed batches

class MixedAdapterIds(nnx.Variable):
    """The adapter id of every example (-1: the base) while `sj.mixed_adapters` runs. It is
    the layer's state, so a jitted call takes it as data (one trace serves every mix) and the
    layer's structure differs inside and outside the block (no trace is reused across it); a
    stacked layer holds one copy per slice, for `nnx.scan`."""


@contextlib.contextmanager
def mixed_batch(layers: Sequence[ShiraDense], names: Sequence[str], ids: Any) -> Iterator[None]:
    """Within the block, each of `layers` runs adapter `names[ids[b]]` (or, for -1, the base)
    for example `b`; other modules are untouched. Use `sj.mixed_adapters(model, ids)`, which
    checks the model and the ids first. Nested blocks restore the outer mix on exit."""
    names = tuple(names)
    layers = [layer for layer in layers if layer.adapter_names]  # empty wrappers: nothing to mix
    saved = [(layer, getattr(layer, "mixed_ids", None), getattr(layer, "mixed_names", None))
             for layer in layers]
    try:
        for layer in layers:
            stack = layer.shira_indices[layer.adapter_names[0]].shape[:-2]
            layer.mixed_ids = MixedAdapterIds(jnp.broadcast_to(ids, (*stack, *jnp.shape(ids))))
            layer.mixed_names = names
        yield
    finally:
        for layer, ids_before, names_before in saved:
            if ids_before is None:
                for attr in ("mixed_ids", "mixed_names"):
                    if hasattr(layer, attr):
                        delattr(layer, attr)
            else:
                layer.mixed_ids, layer.mixed_names = ids_before, names_before


# ----------------------------------------------------------------------------- any kernel view


def unwrap(module: Any) -> Any:
    """The wrapped base layer of a `ShiraDense`; any other module as it is."""
    return module.base_layer if isinstance(module, ShiraDense) else module


def is_stacked(layer: Any) -> bool:
    """True for a `ShiraDense` / `nnx.Linear` whose kernel has a leading layer axis."""
    base = unwrap(layer)
    kernel = getattr(base, "kernel", None)
    return isinstance(base, nnx.Linear) and isinstance(kernel, nnx.Variable) and kernel.ndim == 3


def _kernel_of(layer: Any) -> nnx.Variable:
    return layer.kernel_variable if isinstance(layer, ShiraDense) else unwrap(layer).kernel


def _stack_axis_name(layer: Any) -> Any:
    """The name the layer axis carries in the kernel's `out_sharding` (None if unannotated)."""
    kernel = _kernel_of(layer)
    spec = kernel.get_metadata().get("out_sharding")
    return spec[0] if spec and len(spec) == kernel.ndim else None


def per_slice(
    fn: Callable[..., Any], layer: Any, *, in_axes: Any = 0, out_axes: Any = 0
) -> Callable[..., Any]:
    """`nnx.vmap(fn)` over the stack axis of a stacked layer, keeping its sharding name."""
    return nnx.vmap(
        fn,
        in_axes=in_axes,
        out_axes=out_axes,
        transform_metadata={nnx.PARTITION_NAME: _stack_axis_name(layer)},
    )


def _sharding(layer: Any) -> Any:
    return getattr(_kernel_of(layer).get_value(), "sharding", None)


def _restore_placement(layer: ShiraDense, before: Any) -> None:
    """Eager `nnx.vmap` outputs may land anywhere: put the kernel back on `before` (its
    sharding before the vmap) and the adapters next to it."""
    after = layer.kernel_variable.get_value()
    if before is not None and getattr(after, "sharding", None) != before:
        layer.kernel_variable.set_value(jax.device_put(after, before))
    kernel = layer.kernel_variable.get_value()
    for group in (layer.shira_weight, layer.shira_indices):
        for name in list(group.keys()):
            var = group[name]
            var.set_value(kernels.place_like_kernel(var.get_value(), kernel, layer._stack_ndim))


def attach_adapter(
    node: nnx.Module,
    adapter: str,
    indices: Any,
    values: Any,
    *,
    r: int,
    active: Sequence[str],
    path: str = "",
    delta_mode: str = "patched",
) -> ShiraDense:
    """Add `adapter` to `node` (a `ShiraDense`, or a layer it then wraps) and return the wrapper.

    `indices` `[*stack, 2, nnz]` and `values` `[*stack, nnz]` follow the kernel's view: a
    stacked kernel `[L, in, out]` gets one mask per slice (the layer is built under
    `nnx.vmap`, so inside `nnx.scan` each step sees an ordinary 2-D `ShiraDense`).
    """
    is_active = adapter in active
    if not is_stacked(node):
        layer = node if isinstance(node, ShiraDense) else ShiraDense(node, name=path)
        layer.add_adapter(
            adapter, indices, r=r, values=values, active=is_active, delta_mode=delta_mode
        )
        if layer is not node:
            layer.set_adapter(tuple(active))
        return layer
    idx = jnp.asarray(indices, jnp.int32)
    if isinstance(node, ShiraDense):

        def add(layer: ShiraDense, i: jax.Array, v: jax.Array) -> None:
            layer.add_adapter(adapter, i, r=r, values=v, active=is_active, delta_mode=delta_mode)

        before = _sharding(node)
        per_slice(add, node, in_axes=(0, 0, 0), out_axes=None)(node, idx, values)
        _restore_placement(node, before)
        return node
    graphdef, state = nnx.split(node)
    before = _sharding(node)

    def build(state: nnx.State, i: jax.Array, v: jax.Array) -> ShiraDense:
        layer = ShiraDense(nnx.merge(graphdef, state), name=path)
        layer.add_adapter(adapter, i, r=r, values=v, active=is_active, delta_mode=delta_mode)
        layer.set_adapter(tuple(active))
        return layer

    layer = per_slice(build, node, in_axes=(0, 0, 0), out_axes=0)(state, idx, values)
    _restore_placement(layer, before)
    return layer


def delta_weight(layer: ShiraDense, adapter: str) -> jax.Array:
    """Dense delta `[*stack, in, out]` of one adapter (`get_delta_weight` per slice)."""
    if not is_stacked(layer):
        return layer.get_delta_weight(adapter)
    return per_slice(lambda m: m.get_delta_weight(adapter), layer)(layer)


def plan_merge(
    layer: ShiraDense, adapter_names: Sequence[str] | None
) -> tuple[jax.Array, dict[str, jax.Array], tuple[str, ...]]:
    """`ShiraDense.plan_merge` for any kernel view (stacked slices merge one by one)."""
    if not is_stacked(layer):
        return layer.plan_merge(adapter_names)
    kernel, backups = per_slice(lambda m: m.plan_merge(adapter_names)[:2], layer)(layer)
    chosen = layer.active_adapters if adapter_names is None else adapter_names
    todo = tuple(a for a in chosen if a in layer.adapter_names and a not in layer.merged_adapters)
    return kernel, backups, todo


def commit_merge(
    layer: ShiraDense, kernel: jax.Array, backups: dict[str, jax.Array], names: Sequence[str]
) -> None:
    """Write a `plan_merge` result into the layer, keeping the kernel's placement."""
    before = _sharding(layer)
    layer.commit_merge(kernel, {a: backups[a] for a in names}, names)
    _restore_placement(layer, before)


def unmerge_layer(layer: ShiraDense) -> None:
    """`ShiraDense.unmerge` for any kernel view: the original kernel, bit for bit."""
    if not layer.merged:
        return
    if not is_stacked(layer):
        layer.unmerge()
        return
    before = _sharding(layer)
    per_slice(lambda m: m.unmerge(), layer, out_axes=None)(layer)
    _restore_placement(layer, before)
