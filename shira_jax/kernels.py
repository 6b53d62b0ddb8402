"""Kernel views and kernel placement: how a module's weight is seen, and where its shards live.

A SHiRA adapter sees the weight it modifies through a `KernelView`: a `[*stack, in, out]`
array whose trailing two axes are the 2-D matrix the adapter's indices address and whose
leading axes (scan-stacked layers) hold one independent matrix each. `kernel_view(module)`
knows `nnx.Linear` (kernel `[in, out]`, or `[L, in, out]` when created under `nnx.vmap`),
N-D kernels (`KernelLayout`) and einsum modules; `sparse_route` says how such a module's
input and output meet the matrix, for the sparse product (`delta_mode="sparse"`).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax import ops

__all__ = [
    "AxisEntry",
    "KernelLayout",
    "KernelView",
    "SparseRoute",
    "adapter_metadata",
    "axis_names",
    "einsum_axes",
    "kernel_layout",
    "kernel_view",
    "matrix_layout",
    "mesh_spec",
    "place_like_kernel",
    "register_kernel",
    "scatter_delta",
    "scatter_fn",
    "sparse_refusal",
    "sparse_route",
]

AxisEntry = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How an N-D kernel's axes form the 2-D `[in, out]` matrix an adapter addresses.

    `in` is the row-major flattening of `in_axes` (the kernel axes contracted with the
    input, in kernel order), `out` that of `out_axes` (the axes that reach the output). This is
    the order of HF's flattened linears: HF `q_proj.weight` `[N*H, D]` is a kernel `(D, N, H)`
    with `in_axes=(0,)`, `out_axes=(1, 2)`. Positions are scattered straight into the kernel
    seen as its free reshape `[size // last, last]` (`storage_indices`), never transposed.

    Example:
        >>> layout = KernelLayout((2, 3, 4), in_axes=(1,), out_axes=(0, 2))
        >>> layout.n_in, layout.n_out
        (3, 8)
        >>> import numpy as np
        >>> layout.storage_indices(np.array([[1], [5]])).ravel().tolist()  # (a=1, b=1, c=1)
        [4, 1]
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @property
    def n_in(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def n_out(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes)

    @property
    def storage_shape(self) -> tuple[int, int]:
        return (math.prod(self.shape[:-1]), self.shape[-1])

    def native_coords(self, indices: Any) -> tuple[Any, ...]:
        """Per kernel axis, the coordinates of `[2, nnz]` matrix indices (NumPy or jax)."""
        coords: dict[int, Any] = {}
        for axes, flat in ((self.in_axes, indices[0]), (self.out_axes, indices[1])):
            for a in reversed(axes):
                coords[a], flat = flat % self.shape[a], flat // self.shape[a]
        return tuple(coords[a] for a in range(len(self.shape)))

    def storage_indices(self, indices: Any) -> Any:
        """`[2, nnz]` positions of matrix `indices` in the kernel's `[size // last, last]`."""
        coords = self.native_coords(indices)
        row = coords[0] * 0
        for a in range(len(self.shape) - 1):
            row = row * self.shape[a] + coords[a]
        stack = jnp.stack if isinstance(indices, jax.Array) else np.stack
        return stack([row, coords[-1]])

    def to_storage(self, kernel: Any) -> Any:
        return kernel.reshape(self.storage_shape)

    def to_native(self, matrix: Any) -> Any:
        return matrix.reshape(self.shape)

    def to_matrix(self, kernel: Any) -> Any:
        """The kernel (or a gradient shaped like it) as the `[in, out]` matrix (a copy)."""
        moved = kernel.transpose(*self.in_axes, *self.out_axes)
        return moved.reshape(self.n_in, self.n_out)


@dataclasses.dataclass(frozen=True)
class KernelView:
    """A module's weight seen as `[*stack_shape, n_in, n_out]` (Flax's `[in, out]` layout).

    Attributes:
        module: the module that owns the weight (e.g. an `nnx.Linear`).
        variable: the weight's `nnx.Variable` (None when it is not one, e.g. quantized).
        stack_shape: leading axes that hold one independent matrix each (scan-stacked layers).
        n_in, n_out: the matrix an adapter's `[2, nnz]` indices address.
        attr: the module attribute that holds the weight (`"kernel"`, Tunix's `"w"`, ...).
        layout: how an N-D kernel forms the matrix (None: the kernel is `[*stack, in, out]`).
        unsupported: why SHiRA cannot adapt this weight yet ("" when it can).
        quantized: the weight is quantized (qwix `WithAux`): SHiRA adds the sparse product to
            the quantized base matmul and never writes the weight.
        einsum: the module's forward as `"input,weight->output"` (any input rank through
            `...`), which routes `delta_mode="sparse"` on an N-D kernel (`sparse_route`);
            None when unknown (kinds registered by `in_axes`/`out_axes`).
    """

    module: nnx.Module
    variable: nnx.Variable | None
    stack_shape: tuple[int, ...]
    n_in: int
    n_out: int
    attr: str = "kernel"
    layout: KernelLayout | None = None
    unsupported: str = ""
    quantized: bool = False
    einsum: str | None = None

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
        """The weight's current value as `[*stack, in, out]`."""
        if self.variable is None:
            raise ValueError(
                f"The weight of this {type(self.module).__name__} is quantized; masks that read "
                "the kernel (weight_magnitude, snip) need a float one: pick 'random' or 'struct'."
            )
        value = self.variable.get_value()
        return value if self.layout is None else self.layout.to_matrix(value)

    def slice_module(self, i: int) -> nnx.Module:
        """A copy of the module holding only slice `i` of a stacked weight (for `mask_fn`)."""
        if not self.stacked:
            return self.module
        graphdef, state = nnx.split(self.module)
        index = np.unravel_index(i, self.stack_shape)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


ViewFn = Callable[[Any], "KernelView | None"]
_REGISTRY: dict[type, ViewFn] = {}


def kernel_view(module: Any) -> KernelView | None:
    """The `KernelView` of `module`'s weight, or None when it has no weight SHiRA knows.

    Known kinds: `nnx.Linear` (`[in, out]`, or `[L, in, out]` made by `nnx.vmap`),
    `nnx.LinearGeneral`, `nnx.Einsum`, any module with an `einsum_str` and a `w` or `kernel`
    weight (Tunix's `Einsum`), and what `register_kernel` taught. A view whose `unsupported`
    is set names a weight SHiRA recognises but cannot adapt (quantized, batch axes).
    """
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    if isinstance(getattr(module, "einsum_str", None), str):
        attr = "w" if hasattr(module, "w") else "kernel"
        return _einsum_view(module, attr, module.einsum_str)
    return None


def register_kernel(
    module_type: type,
    *,
    weight: str = "kernel",
    in_axes: Sequence[int] | None = None,
    out_axes: Sequence[int] | None = None,
    einsum: str | Callable[[Any], str] | None = None,
) -> None:
    """Teach `apply_shira` another library's module kind (MaxText `DenseGeneral`, EasyDeL
    `ParallelLinear`, your own): name the weight attribute and which of its axes the input
    contracts (`in_axes`) and which reach the output (`out_axes`), or give the einsum (a
    string, or a function of the module) whose second operand is the weight.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from shira_jax import kernels
        >>> class Proj(nnx.Module):  # y[b, n, h] = x[b, d] @ w[d, n, h]
        ...     def __init__(self):
        ...         self.w = nnx.Param(jnp.ones((8, 2, 4)))
        ...     def __call__(self, x):
        ...         return jnp.einsum("bd,dnh->bnh", x, self.w[...])
        >>> kernels.register_kernel(Proj, weight="w", in_axes=(0,), out_axes=(1, 2))
        >>> kernels.kernel_view(Proj()).shape
        (8, 8)
    """
    if einsum is not None:
        spec = einsum

        def view(module: Any) -> KernelView | None:
            text = spec(module) if callable(spec) else spec
            return _einsum_view(module, weight, text)

    else:
        if in_axes is None or out_axes is None:
            raise ValueError("register_kernel needs in_axes and out_axes, or einsum.")
        axes = (tuple(int(a) for a in in_axes), tuple(int(a) for a in out_axes))

        def view(module: Any) -> KernelView | None:
            return _axes_view(module, weight, *axes, ())

    _REGISTRY[module_type] = view


QUANTIZED = "quantized"  # `_weight`'s reason for a qwix-quantized weight (adapted sparsely)


def _weight(module: Any, attr: str) -> tuple[nnx.Variable | None, tuple[int, ...], str]:
    """The weight Variable, its shape, and why it cannot be adapted ("" if it can)."""
    weight = getattr(module, attr, None)
    value = weight.get_raw_value() if isinstance(weight, nnx.Variable) else weight
    shape = tuple(int(n) for n in getattr(value, "shape", ()))
    kind = type(value).__name__
    quantized = type(value).__module__.split(".")[0] == "qwix" or hasattr(value, "qvalue")
    if isinstance(weight, nnx.Variable) and hasattr(value, "dtype") and not quantized:
        return weight, shape, ""
    if quantized:
        return None, shape, QUANTIZED
    return None, shape, f"its weight {attr!r} is a {kind}, not an nnx.Variable holding an array"


def _axes_view(
    module: Any,
    attr: str,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
    einsum: str | None = None,
) -> KernelView | None:
    variable, shape, why = _weight(module, attr)
    if not shape:
        return None
    ndim = len(shape)
    in_axes = tuple(a % ndim for a in in_axes)
    out_axes = tuple(a % ndim for a in out_axes)
    layout = KernelLayout(shape, in_axes, out_axes)
    if why == QUANTIZED:
        why = (
            f"its weight {attr!r} is quantized (qwix); SHiRA adapts quantized nnx.Linear "
            "kernels only (the sparse product on the quantized matmul), not N-D ones"
        )
    if sorted(in_axes + out_axes + stack_axes) != list(range(ndim)) and not why:
        why = (
            f"its weight {attr!r} {shape} has axes that are neither contracted with the input "
            f"(in_axes={in_axes}) nor in the output (out_axes={out_axes})"
        )
    if stack_axes and not why:
        why = (
            f"its weight {attr!r} {shape} has batch axes {stack_axes} shared by the input and "
            "the output (one matrix per slice); SHiRA adapts those for scan-stacked nnx.Linear "
            "only"
        )
    plain = in_axes == (ndim - 2,) and out_axes == (ndim - 1,) and ndim == 2
    return KernelView(
        module, variable, (), layout.n_in, layout.n_out, attr,
        None if plain else layout, why, einsum=einsum,
    )


def _einsum_parts(spec: str) -> tuple[str, str, str]:
    """`(input, weight, output)` subscripts of `"input,weight->output"` (spaces dropped)."""
    try:
        operands, out = spec.replace(" ", "").split("->")
        x, w = operands.split(",")
    except ValueError:
        raise ValueError(f"einsum {spec!r}: need exactly 'input,weight->output'.") from None
    return x, w, out


def einsum_axes(spec: str, ndim: int) -> tuple[tuple[int, ...], ...]:
    """`(in_axes, out_axes, stack_axes, other)` of the weight in `"x,w->y"` (w second).

    >>> einsum_axes("BTD,DNH->BTNH", 3)
    ((0,), (1, 2), (), ())
    >>> einsum_axes("BSD,CKDH->CBSKH", 4)
    ((2,), (0, 1, 3), (), ())
    """
    x, w, out = _einsum_parts(spec)
    x, out = x.replace("...", ""), out.replace("...", "")
    if "..." in w or len(w) != ndim or len(set(w)) != ndim:
        raise ValueError(f"einsum {spec!r}: the weight part {w!r} must name its {ndim} axes once.")
    kinds: dict[str, list[int]] = {"in": [], "out": [], "stack": [], "other": []}
    for axis, letter in enumerate(w):
        key = {(True, False): "in", (False, True): "out", (True, True): "stack"}.get(
            (letter in x, letter in out), "other"
        )
        kinds[key].append(axis)
    return tuple(tuple(kinds[k]) for k in ("in", "out", "stack", "other"))


@dataclasses.dataclass(frozen=True)
class SparseRoute:
    """How an N-D kernel's module input meets the `[in, out]` matrix its adapter addresses, for
    `ops.sparse_product`: `rows(x)` is the input as `[*tokens, in]` (the contracted axes moved
    last, flattened row-major in kernel order, as `KernelLayout` flattens `in`), and
    `output(cols)` puts a `[*tokens, out]` product back in the module's output layout.

    Example:
        >>> import jax.numpy as jnp
        >>> layout = KernelLayout((4, 2, 3), in_axes=(1, 2), out_axes=(0,))  # "BNH,DNH->BD"
        >>> route = sparse_route("BNH,DNH->DB", layout)
        >>> route.rows(jnp.zeros((5, 2, 3))).shape, route.output(jnp.zeros((5, 4))).shape
        ((5, 6), (4, 5))
        >>> route.tokens((5, 2, 3))
        5
    """

    to_rows: str  # one-operand einsum: input -> (..., tokens, in axes in kernel order)
    to_output: str  # one-operand einsum: (..., tokens, out axes in kernel order) -> output
    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    token_letters: str  # the input's letters that reach the output (not the kernel)
    input_spec: str  # the input's subscripts, `...` included

    def rows(self, x: jax.Array) -> jax.Array:
        """`x` as `[*tokens, in]` (a transpose, then a free reshape)."""
        lhs, rhs = self.to_rows.split("->")
        moved = x if lhs == rhs else jnp.einsum(self.to_rows, x)
        lead = moved.shape[: moved.ndim - len(self.in_sizes)]
        return moved.reshape(*lead, math.prod(self.in_sizes))

    def output(self, cols: jax.Array) -> jax.Array:
        """A `[*tokens, out]` product in the module's output layout."""
        split = cols.reshape(*cols.shape[:-1], *self.out_sizes)
        lhs, rhs = self.to_output.split("->")
        return split if lhs == rhs else jnp.einsum(self.to_output, split)

    def tokens(self, shape: Sequence[int]) -> int:
        """How many `[in]` rows an input of `shape` has (`ops.prefer_sparse`'s `tokens`)."""
        head, _, tail = self.input_spec.partition("...")
        dims = dict(zip(head, shape[: len(head)]))
        dims.update(zip(tail, shape[len(shape) - len(tail) :]))
        kept = [n for c, n in dims.items() if c in self.token_letters]
        if "..." in self.to_output:
            kept += list(shape[len(head) : len(shape) - len(tail)])
        return math.prod(kept)


@functools.lru_cache(maxsize=256)
def sparse_route(spec: str, layout: KernelLayout) -> SparseRoute:
    """The `SparseRoute` of a module computing `spec` (`"input,weight->output"`) with a kernel
    seen through `layout`; ValueError for a form the sparse product cannot take.

    Refused: an input subscript that names an axis twice (a diagonal), and outputs whose axes
    are not the input's uncontracted axes plus the kernel's output axes (batch axes shared by
    input, kernel and output are refused earlier, by `kernel_view`).
    """
    x, w, out = _einsum_parts(spec)
    letters, out_letters = x.replace("...", ""), out.replace("...", "")
    if len(set(letters)) != len(letters) or len(w) != len(layout.shape):
        raise ValueError(
            f"einsum {spec!r}: the sparse product needs an input that names each axis once and a "
            f"weight with the kernel's {len(layout.shape)} axes"
        )
    ell = "..." if "..." in x and "..." in out else ""
    tokens = "".join(c for c in letters if c in out_letters and c not in w)
    k_in = "".join(w[a] for a in layout.in_axes)
    k_out = "".join(w[a] for a in layout.out_axes)
    if sorted(out_letters) != sorted(tokens + k_out) or ("..." in out) != bool(ell):
        raise ValueError(
            f"einsum {spec!r}: the sparse product needs an output made of the input's "
            f"uncontracted axes and the weight's output axes {k_out!r}"
        )
    return SparseRoute(
        to_rows=f"{x}->{ell}{tokens}{k_in}",
        to_output=f"{ell}{tokens}{k_out}->{out}",
        in_sizes=tuple(layout.shape[a] for a in layout.in_axes),
        out_sizes=tuple(layout.shape[a] for a in layout.out_axes),
        token_letters=tokens,
        input_spec=x,
    )


def sparse_refusal(view: KernelView) -> str:
    """Why `delta_mode="sparse"` cannot run on `view`'s weight, or "" when it can.

    Plain `[in, out]` kernels (`nnx.Linear`) always can; weights seen through an einsum (also a
    2-D one, whose output may be laid out otherwise) when `sparse_route` takes it; kinds
    registered by `in_axes`/`out_axes` with an N-D or transposed weight cannot.
    """
    if view.einsum is None:
        if view.layout is None:
            return ""
        return (
            "SHiRA does not know how its input meets its weight (a kind registered by "
            "in_axes/out_axes); register it with einsum=... for the sparse product"
        )
    try:
        sparse_route(view.einsum, matrix_layout(view.layout, view.n_in, view.n_out))
    except ValueError as err:
        return str(err)
    return ""


def matrix_layout(layout: KernelLayout | None, n_in: int, n_out: int) -> KernelLayout:
    """`layout`, or for a plain `[in, out]` kernel (None) the trivial one."""
    return layout if layout is not None else KernelLayout((n_in, n_out), (0,), (1,))


def _einsum_view(module: Any, attr: str, spec: Any) -> KernelView | None:
    variable, shape, why = _weight(module, attr)
    if not shape or not isinstance(spec, str):
        return None
    in_axes, out_axes, stack_axes, other = einsum_axes(spec, len(shape))
    view = _axes_view(module, attr, in_axes, out_axes, stack_axes + other, spec.replace(" ", ""))
    if view is not None and not (in_axes and out_axes) and not view.unsupported:
        view = dataclasses.replace(
            view, unsupported=f"its einsum {spec!r} has no contracted or no output weight axis"
        )
    return view


def _linear_view(module: nnx.Linear) -> KernelView | None:
    variable, shape, why = _weight(module, "kernel")
    if why == QUANTIZED and len(shape) == 2:
        return KernelView(module, None, (), shape[0], shape[1], quantized=True)
    if variable is None:
        return _axes_view(module, "kernel", (0,), (1,), ()) if why and len(shape) == 2 else None
    if len(shape) not in (2, 3):
        return None
    return KernelView(module, variable, shape[:-2], shape[-2], shape[-1])


def _linear_general_view(module: nnx.LinearGeneral) -> KernelView | None:
    n_stack, n_in = len(module.batch_axis), len(module.in_features)
    ndim = n_stack + n_in + len(module.out_features)
    einsum = None if n_stack else _linear_general_einsum(module.axis, n_in, ndim - n_in)
    return _axes_view(
        module,
        "kernel",
        tuple(range(n_stack, n_stack + n_in)),
        tuple(range(n_stack + n_in, ndim)),
        tuple(range(n_stack)),
        einsum,
    )


def _linear_general_einsum(axis: Sequence[int], n_in: int, n_out: int) -> str | None:
    """`nnx.LinearGeneral`'s `dot_general` as an einsum over any input rank: kernel axis `i`
    contracts the `i`-th of the input's `axis` in ascending order (Flax sorts them); the output
    is the other input axes, then the kernel's out axes. Non-negative axes count from the
    front, negative ones from the back (`...` between).

    >>> _linear_general_einsum((-1, -2), 2, 1)
    '...ab,abc->...c'
    >>> _linear_general_einsum((1,), 1, 2)
    'Aa...,abc->A...bc'
    """
    axis = tuple(sorted((int(a) for a in axis), key=lambda a: (a < 0, a)))
    if len(axis) != n_in or len(set(axis)) != n_in:
        return None
    kernel = "abcdefghijklmnopqrstuvwxyz"[: n_in + n_out]
    head = [None] * (max([a + 1 for a in axis if a >= 0], default=0))
    tail = [None] * (max([-a for a in axis if a < 0], default=0))
    for letter, a in zip(kernel, axis):
        if a >= 0:
            head[a] = letter
        else:
            tail[len(tail) + a] = letter
    batch = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    head = [c or next(batch) for c in head]
    tail = [c or next(batch) for c in tail]
    kept = lambda part: "".join(c for c in part if c.isupper())  # noqa: E731
    x = "".join(head) + "..." + "".join(tail)
    return f"{x},{kernel}->{kept(head)}...{kept(tail)}{kernel[n_in:]}"


def _nnx_einsum_view(module: nnx.Einsum) -> KernelView | None:
    return _einsum_view(module, "kernel", module.einsum_str)


_REGISTRY.update(
    {
        nnx.Linear: _linear_view,
        nnx.LinearGeneral: _linear_general_view,
        nnx.Einsum: _nnx_einsum_view,
    }
)


# ----------------------------------------------------------------------------- placement



def _entries(spec: Any) -> tuple[AxisEntry, ...] | None:
    if spec is None:
        return None
    if isinstance(spec, NamedSharding):
        spec = spec.spec
    return tuple(spec)


def adapter_metadata(
    kernel: nnx.Variable, stack_ndim: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """NNX metadata for an adapter's values and indices, derived from the kernel's.

    A kernel `out_sharding` of `(*lead, a, b)` gives values `(*lead, None)` and indices
    `(*lead, None, None)`: replicated over the matrix axes, split like the kernel over any
    leading (scan-stacked) axis. `sharding_rules` and `mesh` metadata are carried over. The
    adapter's arrays are placed by `ShiraDense` itself (next to the kernel), so eager sharding
    is off for them: no mesh context is needed to add an adapter.

    `stack_ndim` counts the kernel's stacked axes (default: all but the last two; 0 for an
    N-D kernel seen through a `KernelLayout`). Returns `({}, {})` when the kernel carries no
    sharding metadata.
    """
    meta = kernel.get_metadata()
    spec = _entries(meta.get("out_sharding"))
    if not spec:
        return {}, {}
    lead = tuple(spec[: len(spec) - 2 if stack_ndim is None else stack_ndim])
    extra = {k: meta[k] for k in ("sharding_rules", "mesh") if meta.get(k) is not None}
    values = {"out_sharding": (*lead, None), "eager_sharding": False, **extra}
    indices = {"out_sharding": (*lead, None, None), "eager_sharding": False, **extra}
    return values, indices


def _is_concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def place_like_kernel(array: Any, kernel: Any, stack_ndim: int | None = None) -> Any:
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
    lead = kernel.ndim - 2 if stack_ndim is None else stack_ndim
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


def mesh_spec(
    variable: nnx.Variable | None, kernel: Any
) -> tuple[Any, tuple[AxisEntry, ...]] | None:
    """`(mesh, spec)` of a kernel split over more than one device (one entry per axis), else None.

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
    spec = tuple(spec) + (None,) * max(0, kernel.ndim - len(spec))
    sizes = _mesh_sizes(mesh)
    if any(a not in sizes for e in spec for a in axis_names(e)):
        return None
    parts = [math.prod(sizes[a] for a in axis_names(e)) for e in spec]
    if math.prod(parts) == 1 or any(n % p for n, p in zip(kernel.shape, parts)):
        return None
    return mesh, spec


def kernel_layout(
    variable: nnx.Variable | None, kernel: Any
) -> tuple[Any, tuple[AxisEntry, AxisEntry]] | None:
    """`(mesh, (rows_axes, cols_axes))` of a kernel whose last two axes are split over more
    than one device, else None (see `mesh_spec`)."""
    found = mesh_spec(variable, kernel)
    if found is None:
        return None
    mesh, spec = found
    rows, cols = spec[-2], spec[-1]
    sizes = _mesh_sizes(mesh)
    if math.prod(sizes[a] for a in axis_names(rows) + axis_names(cols)) == 1:
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
    variable: nnx.Variable | None, kernel: Any, layout: KernelLayout | None = None
) -> Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]:
    """The scatter to use for `kernel`: shard-local when it is split over a mesh, else `ops`.

    `ShiraDense` calls this with its kernel Variable, the kernel array and, for an N-D kernel,
    its `KernelLayout` (the scatter then takes `[in, out]` matrix indices). When a plain 2-D
    kernel is not split this returns `ops.scatter_delta` itself, so callers may test identity.
    """
    if layout is not None:
        found = mesh_spec(variable, kernel)
        if found is None:
            return functools.partial(_storage_scatter, layout=layout)
        mesh, spec = found
        spec = tuple(e if e is None or isinstance(e, str) else tuple(e) for e in spec)
        return functools.partial(_scatter_nd, mesh=mesh, spec=spec, layout=layout)
    if kernel.ndim != 2:
        return ops.scatter_delta
    found = kernel_layout(variable, kernel)
    if found is None:
        return ops.scatter_delta
    mesh, spec = found

    def scatter(k: jax.Array, idx: jax.Array, vals: jax.Array, scale: Any = 1.0) -> jax.Array:
        return scatter_delta(k, idx, vals, scale, mesh=mesh, spec=spec)

    return scatter


def _storage_scatter(
    kernel: jax.Array, indices: jax.Array, values: jax.Array, scale: Any = 1.0, *,
    layout: KernelLayout,
) -> jax.Array:
    """`ops.scatter_delta` on an N-D kernel through its free 2-D reshape."""
    flat = ops.scatter_delta(
        layout.to_storage(kernel), layout.storage_indices(indices), values, scale
    )
    return layout.to_native(flat)


def _scatter_nd(
    kernel: jax.Array, indices: jax.Array, values: jax.Array, scale: Any = 1.0, *,
    mesh: Any, spec: tuple[AxisEntry, ...], layout: KernelLayout,
) -> jax.Array:
    """`_storage_scatter` on an N-D kernel split over `mesh`: each device writes its block."""
    acc_dtype = jnp.promote_types(jnp.promote_types(kernel.dtype, values.dtype), jnp.float32)
    sizes = _mesh_sizes(mesh)
    block = tuple(
        n // math.prod(sizes[a] for a in axis_names(e)) for n, e in zip(kernel.shape, spec)
    )

    def local(part: jax.Array, idx: jax.Array, vals: jax.Array, s: jax.Array) -> jax.Array:
        coords = layout.native_coords(idx)
        inside = jnp.ones(idx.shape[-1], bool)
        local_coords = []
        for axis, (c, e) in enumerate(zip(coords, spec)):
            c = c - _block_index(axis_names(e), sizes) * block[axis]
            inside = inside & (c >= 0) & (c < block[axis])
            local_coords.append(c)
        row = jnp.zeros_like(local_coords[0])
        for axis in range(len(block) - 1):
            row = row * block[axis] + local_coords[axis]
        rows = math.prod(block[:-1])
        row = jnp.where(inside, row, rows)  # outside this block: dropped by scatter_block
        flat = ops.scatter_block(part.reshape(rows, block[-1]), row, local_coords[-1], vals, s)
        return flat.reshape(block)

    kspec = PartitionSpec(*spec)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(kspec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=kspec,
    )(kernel, indices, values, jnp.asarray(scale, acc_dtype))
