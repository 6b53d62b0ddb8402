"""Kernel views and kernel placement: how a module's weight is seen, and where its shards live.

A SHiRA adapter sees the weight it modifies through a `KernelView`: a `[*stack, in, out]`
array whose trailing two axes are the 2-D matrix the adapter's indices address and whose
leading axes (scan-stacked layers) hold one independent matrix each. `kernel_view(module)`
knows `nnx.Linear` (kernel `[in, out]`, or `[L, in, out]` when created under `nnx.vmap`).

The rest of this module places adapter arrays next to a kernel split over a device mesh and
picks the scatter to use: shard-local (`shard_map`, no kernel gather) when the kernel is
split over more than one device, else `ops.scatter_delta`.

Example:
    >>> from flax import nnx
    >>> from shira_jax import kernels
    >>> view = kernels.kernel_view(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    >>> view.shape, view.stacked
    ((8, 4), False)
    >>> kernels.kernel_view(nnx.Embed(10, 4, rngs=nnx.Rngs(0))) is None
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax import ops

__all__ = [
    "AxisEntry",
    "KernelView",
    "adapter_metadata",
    "axis_names",
    "kernel_layout",
    "kernel_view",
    "place_like_kernel",
    "scatter_delta",
    "scatter_fn",
]

AxisEntry = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True)
class KernelView:
    """A module's weight seen as `[*stack_shape, n_in, n_out]` (Flax's `[in, out]` layout).

    Attributes:
        module: the module that owns the weight (e.g. an `nnx.Linear`).
        variable: the weight's `nnx.Variable`.
        stack_shape: leading axes that hold one independent matrix each (scan-stacked layers).
        n_in, n_out: the matrix an adapter's `[2, nnz]` indices address.
    """

    module: nnx.Module
    variable: nnx.Variable
    stack_shape: tuple[int, ...]
    n_in: int
    n_out: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, self.n_in, self.n_out)

    @property
    def stacked(self) -> bool:
        return bool(self.stack_shape)

    @property
    def num_slices(self) -> int:
        return math.prod(self.stack_shape)

    def array(self) -> Any:
        """The weight's current value."""
        return self.variable.get_value()

    def slice_module(self, i: int) -> nnx.Module:
        """A copy of the module holding only slice `i` of a stacked weight (for `mask_fn`)."""
        if not self.stacked:
            return self.module
        graphdef, state = nnx.split(self.module)
        index = np.unravel_index(i, self.stack_shape)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def kernel_view(module: Any) -> KernelView | None:
    """The `KernelView` of `module`'s weight, or None when SHiRA cannot adapt it.

    `nnx.Linear` (and subclasses) with a kernel `[in, out]` or a stacked `[L, in, out]`.
    """
    if not isinstance(module, nnx.Linear):
        return None
    variable = module.kernel
    shape = tuple(int(s) for s in variable.shape)
    if len(shape) not in (2, 3):
        return None
    return KernelView(module, variable, shape[:-2], shape[-2], shape[-1])


# ----------------------------------------------------------------------------- placement



def _entries(spec: Any) -> tuple[AxisEntry, ...] | None:
    if spec is None:
        return None
    if isinstance(spec, NamedSharding):
        spec = spec.spec
    return tuple(spec)


def adapter_metadata(kernel: nnx.Variable) -> tuple[dict[str, Any], dict[str, Any]]:
    """NNX metadata for an adapter's values and indices, derived from the kernel's.

    A kernel `out_sharding` of `(*lead, a, b)` gives values `(*lead, None)` and indices
    `(*lead, None, None)`: replicated over the matrix axes, split like the kernel over any
    leading (scan-stacked) axis. `sharding_rules` and `mesh` metadata are carried over. The
    adapter's arrays are placed by `ShiraDense` itself (next to the kernel), so eager sharding
    is off for them: no mesh context is needed to add an adapter.

    Returns `({}, {})` when the kernel carries no sharding metadata.
    """
    meta = kernel.get_metadata()
    spec = _entries(meta.get("out_sharding"))
    if not spec:
        return {}, {}
    lead = tuple(spec[:-2])
    extra = {k: meta[k] for k in ("sharding_rules", "mesh") if meta.get(k) is not None}
    values = {"out_sharding": (*lead, None), "eager_sharding": False, **extra}
    indices = {"out_sharding": (*lead, None, None), "eager_sharding": False, **extra}
    return values, indices


def _is_concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def place_like_kernel(array: Any, kernel: Any) -> Any:
    """Put an adapter array on the mesh a concrete `kernel` lives on, sharded like its lead axes.

    `array` is values `[*lead, nnz]` or indices `[*lead, 2, nnz]` of a kernel `[*lead, in, out]`:
    it is split like the kernel over the leading (stacked) axes and replicated otherwise. Under
    a trace, or when the kernel is not on a multi-device `NamedSharding`, `array` is returned
    as is.
    """
    if not _is_concrete(kernel) or not isinstance(array, (jax.Array, np.ndarray)):
        return array
    if isinstance(array, jax.core.Tracer):
        return array
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
        return array
    lead = kernel.ndim - 2
    kspec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    spec = PartitionSpec(*kspec[:lead], *([None] * (np.ndim(array) - lead)))
    return jax.device_put(array, NamedSharding(sharding.mesh, spec))


# ----------------------------------------------------------------------------- layout


def axis_names(entry: AxisEntry) -> tuple[str, ...]:
    """The mesh axis names of one `PartitionSpec` entry (None -> ())."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    return dict(mesh.shape)


def kernel_layout(
    variable: nnx.Variable | None, kernel: Any
) -> tuple[Any, tuple[AxisEntry, AxisEntry]] | None:
    """`(mesh, (rows_axes, cols_axes))` of a 2-D kernel split over more than one device, else None.

    Looked up, in order, from the concrete array's `NamedSharding`, its type's sharding
    (explicit mesh axes), and the Variable's `out_sharding` metadata (logical rules applied)
    with its `mesh` metadata or the mesh of `jax.set_mesh`.
    """
    mesh, spec = None, None
    if _is_concrete(kernel):
        sharding = getattr(kernel, "sharding", None)
        if isinstance(sharding, NamedSharding):
            mesh, spec = sharding.mesh, tuple(sharding.spec)
    else:
        try:
            typed = jax.typeof(kernel).sharding
        except Exception:  # noqa: BLE001 - not every tracer has a typed sharding
            typed = None
        if typed is not None and not typed.mesh.empty and any(axis_names(e) for e in typed.spec):
            mesh, spec = typed.mesh, tuple(typed.spec)
    if spec is None and variable is not None and variable.get_metadata().get("out_sharding"):
        spec = tuple(nnx.spmd.get_var_pspec(variable))
        mesh = variable.get_metadata().get("mesh")
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                if any(axis_names(e) for e in spec):
                    _warn_no_mesh(spec)
                return None
    if mesh is None or spec is None:
        return None
    ndim = kernel.ndim
    spec = tuple(spec) + (None,) * max(0, ndim - len(spec))
    rows, cols = spec[ndim - 2], spec[ndim - 1]
    sizes = _mesh_sizes(mesh)
    if any(a not in sizes for a in axis_names(rows) + axis_names(cols)):
        return None
    n0 = math.prod(sizes[a] for a in axis_names(rows))
    n1 = math.prod(sizes[a] for a in axis_names(cols))
    if n0 * n1 == 1 or kernel.shape[-2] % n0 or kernel.shape[-1] % n1:
        return None
    return mesh, (rows, cols)


_warned: set[tuple[Any, ...]] = set()


def _warn_no_mesh(spec: tuple[Any, ...]) -> None:
    if spec not in _warned and jax.device_count() > 1:
        _warned.add(spec)
        warnings.warn(
            f"A SHiRA kernel has out_sharding {spec} but no mesh is set, so its scatter is left "
            "to XLA's partitioner. Run the step under `with jax.set_mesh(mesh):` so each device "
            "scatters into its own kernel shard.",
            stacklevel=3,
        )


def _block_index(axes: tuple[str, ...], sizes: Mapping[str, int]) -> jax.Array:
    index = jnp.int32(0)
    for a in axes:
        index = index * sizes[a] + jax.lax.axis_index(a)
    return index


# ----------------------------------------------------------------------------- scatter


def scatter_delta(
    kernel: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    scale: float | jax.Array = 1.0,
    *,
    mesh: Any,
    spec: tuple[AxisEntry, AxisEntry],
) -> jax.Array:
    """`ops.scatter_delta` on a kernel split over `mesh` as `spec`, done shard by shard.

    Under `shard_map`, each device shifts the (replicated) indices into its own block, drops
    those outside it, and gathers / adds / writes back only its local entries, with the same
    rounding as `ops.scatter_delta`. Nothing of the kernel moves between devices; the values'
    gradient is summed over the kernel's axes (`nnz` numbers).
    """
    acc_dtype = jnp.promote_types(jnp.promote_types(kernel.dtype, values.dtype), jnp.float32)
    spec = (
        spec[0] if spec[0] is None or isinstance(spec[0], str) else tuple(spec[0]),
        spec[1] if spec[1] is None or isinstance(spec[1], str) else tuple(spec[1]),
    )
    return _local_scatter(
        kernel, indices, values, jnp.asarray(scale, acc_dtype), mesh=mesh, spec=spec
    )


@functools.partial(jax.jit, static_argnames=("mesh", "spec"))
def _local_scatter(
    kernel: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    scale: jax.Array,
    *,
    mesh: Any,
    spec: tuple[AxisEntry, AxisEntry],
) -> jax.Array:
    # jitted so that an eager call (merge) compiles once instead of running op by op per device
    rows_axes, cols_axes = spec
    sizes = _mesh_sizes(mesh)
    n0 = math.prod(sizes[a] for a in axis_names(rows_axes))
    n1 = math.prod(sizes[a] for a in axis_names(cols_axes))
    b0, b1 = kernel.shape[0] // n0, kernel.shape[1] // n1

    def local(block: jax.Array, idx: jax.Array, vals: jax.Array, s: jax.Array) -> jax.Array:
        row0 = _block_index(axis_names(rows_axes), sizes) * b0
        col0 = _block_index(axis_names(cols_axes), sizes) * b1
        return ops.scatter_block(block, idx[0] - row0, idx[1] - col0, vals, s)

    kspec = PartitionSpec(rows_axes, cols_axes)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(kspec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=kspec,
    )(kernel, indices, values, scale)


def scatter_fn(
    variable: nnx.Variable | None, kernel: Any
) -> Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]:
    """The scatter to use for `kernel`: shard-local when it is split over a mesh, else `ops`.

    `ShiraDense` calls this with its kernel Variable and the kernel array. When the kernel is
    not split this returns `ops.scatter_delta` itself, so callers may test identity.
    """
    if kernel.ndim != 2:
        return ops.scatter_delta
    layout = kernel_layout(variable, kernel)
    if layout is None:
        return ops.scatter_delta
    mesh, spec = layout

    def scatter(k: jax.Array, idx: jax.Array, vals: jax.Array, scale: Any = 1.0) -> jax.Array:
        return scatter_delta(k, idx, vals, scale, mesh=mesh, spec=spec)

    return scatter
