"""SHiRA on a device mesh: mesh helpers, adapter sharding, shard-local scatter, checkpoints.

SHiRA trains `r * (in + out)` entries of a kernel, stored as a flat vector. Its sharding is
derived from the base kernel's NNX `out_sharding` metadata (what `nnx.with_partitioning` and
`kernel_metadata={"out_sharding": ...}` set):

* values `[nnz]` and indices `[2, nnz]` are replicated across the kernel's two matrix axes
  (the flat axis mixes rows and columns, so no even split of it lines up with kernel shards;
  the vector is LoRA-sized), and keep any leading (scan-stacked) axis of the kernel, so a
  stacked kernel `("layers", "embed", "mlp")` gives values `("layers", None)`;
* the forward scatter runs under `shard_map`: each device keeps the indices that fall in its
  own kernel shard (the partition is computed on device from the index data, which stays a
  `Variable`), scatters into its local block and never gathers the kernel. The values'
  gradient is a psum of `nnz` numbers over the kernel's mesh axes.

`nnx.get_partition_spec` + `jax.jit` then shard a wrapped model with no extra code.

Workflow (what `shira-jax finetune --mesh data=2,model=4` does)::

    mesh = sharding.make_mesh("data=2,model=4")       # Auto axes, all devices of all hosts
    rules, batch_axes = sharding.mesh_rules(mesh)     # Megatron TP on "model", FSDP on "fsdp"
    sharding.annotate(model, rules, mesh=mesh)        # for models built without annotations
    sj.apply_shira(model, cfg)                        # adapters inherit the kernels' metadata
    sharding.shard_model(model, mesh)                 # device_put by nnx.get_partition_spec
    with jax.set_mesh(mesh):                          # the scatter finds the mesh here
        optimizer = nnx.Optimizer(model, tx, wrt=sj.ShiraParam)
        loss = train_step(model, optimizer, sharding.shard_batch(batch, mesh, batch_axes))
    sj.save_adapter(model, "ckpt/")                   # every process; restore on any mesh

Scan-stacked layers: see `shira_jax.stacked`.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> from shira_jax import sharding
    >>> sharding.parse_mesh("data=2,model=4")
    {'data': 2, 'model': 4}
    >>> meta = {"out_sharding": (None, "model"), "eager_sharding": False}
    >>> linear = nnx.Linear(8, 8, rngs=nnx.Rngs(0), kernel_metadata=meta)
    >>> layer = sj.ShiraDense(linear)
    >>> layer.add_adapter("default", sj.masks.random_mask(8, 8, r=1, seed=0), r=1)
    >>> nnx.get_partition_spec(nnx.state(layer))["shira_weight"]["default"].get_value()
    P(None,)
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax import ops

__all__ = [
    "MESH_SPEC_HELP",
    "adapter_metadata",
    "annotate",
    "batch_sharding",
    "place_like_kernel",
    "collectives",
    "default_rules",
    "full_kernel_gathers",
    "kernel_layout",
    "make_mesh",
    "parse_mesh",
    "refresh_adapter_metadata",
    "scatter_delta",
    "scatter_fn",
    "mesh_rules",
    "shard_batch",
    "shard_model",
]

MESH_SPEC_HELP = (
    'a mesh is written "name=size,name=size", e.g. "data=2,model=4"; one size may be -1 '
    "(all remaining devices), and the sizes must multiply to the number of devices used."
)

AxisEntry = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """`"data=2,model=4"` -> `{"data": 2, "model": 4}` (order kept; one size may be -1).

    >>> parse_mesh("fsdp=-1, model=2")
    {'fsdp': -1, 'model': 2}
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, size = part.partition("=")
            name, size = name.strip(), size.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"Bad mesh axis {part!r} in {spec!r}: {MESH_SPEC_HELP}")
            try:
                items.append((name, int(size)))
            except ValueError:
                raise ValueError(f"Bad size {size!r} for axis {name!r}: {MESH_SPEC_HELP}") from None
    if not items:
        raise ValueError(f"Empty mesh {spec!r}: {MESH_SPEC_HELP}")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh {spec!r} repeats an axis name: {MESH_SPEC_HELP}")
    if sum(s == -1 for _, s in items) > 1 or any(s == 0 or s < -1 for _, s in items):
        raise ValueError(f"Bad sizes in mesh {spec!r}: {MESH_SPEC_HELP}")
    return dict(items)


def make_mesh(
    spec: str | Mapping[str, int],
    *,
    devices: Sequence[jax.Device] | None = None,
    explicit: bool = False,
) -> jax.sharding.Mesh:
    """A `jax.sharding.Mesh` over `devices` (default: all, every host) from a mesh spec.

    Axes are `AxisType.Auto` (GSPMD propagates shardings from the parameters' metadata) unless
    `explicit=True`. A `-1` size takes the remaining devices.

    >>> make_mesh("data=-1").axis_names
    ('data',)
    """
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(f"Mesh {sizes} does not divide {len(devices)} devices.")
        sizes = {n: (len(devices) // known if s == -1 else s) for n, s in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"Mesh {sizes} needs {math.prod(sizes.values())} devices; {len(devices)} are "
            f"available ({jax.device_count()} in all, {jax.process_count()} process(es)). "
            f"{MESH_SPEC_HELP}"
        )
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(kind,) * len(sizes), devices=devices
    )


def batch_sharding(
    mesh: jax.sharding.Mesh, batch_axes: str | Sequence[str] = ("data", "fsdp"), ndim: int = 2
) -> NamedSharding:
    """`NamedSharding` splitting a batch's leading dim over those of `batch_axes` in the mesh."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    lead = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def shard_batch(
    batch: Any, mesh: jax.sharding.Mesh, batch_axes: str | Sequence[str] = ("data", "fsdp")
) -> Any:
    """Place a pytree of arrays on `mesh`, split over `batch_axes` along their leading dim.

    With one process, `batch` is the global batch. With several (`jax.distributed`), each
    process passes its own share (global batch / process count rows), as a per-host data
    loader yields it, and gets back global arrays.
    """

    def place(x: Any) -> jax.Array:
        target = batch_sharding(mesh, batch_axes, np.ndim(x))
        if jax.process_count() == 1:
            return jax.device_put(x, target)
        return jax.make_array_from_process_local_data(target, np.asarray(x))

    return jax.tree.map(place, batch)


def mesh_rules(
    mesh: jax.sharding.Mesh,
) -> tuple[list[tuple[str, tuple[AxisEntry, ...]]], tuple[str, ...]]:
    """`(annotate rules, batch axes)` for a mesh by its axis names.

    `data`: batch only (pure data parallel); `fsdp`: batch and the weights' other dim;
    `model` (or `tensor`): Megatron tensor parallel. E.g. `"data=2,model=4"` is DP x TP and
    `"fsdp=-1,model=4"` FSDP x TP.
    """
    names = mesh.axis_names
    model_axis = next((a for a in ("model", "tensor") if a in names), None)
    fsdp_axis = "fsdp" if "fsdp" in names else None
    batch_axes = tuple(a for a in ("data", "fsdp") if a in names)
    return default_rules(model_axis, fsdp_axis), batch_axes


# ----------------------------------------------------------------------------- metadata


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


def refresh_adapter_metadata(layer: Any) -> None:
    """Re-derive and re-place one `ShiraDense`'s adapter variables from its kernel's metadata.

    Use after changing the kernel's `out_sharding` (e.g. `annotate` on a wrapped model).
    """
    vmeta, imeta = adapter_metadata(layer.base_layer.kernel)
    kernel = layer.base_layer.kernel.get_value()
    for group, meta in ((layer.shira_weight, vmeta), (layer.shira_indices, imeta)):
        for name in list(group.keys()):
            var = group[name]
            old = {k: v for k, v in var.get_metadata().items() if k not in ("out_sharding",)}
            old.update(meta)
            value = place_like_kernel(var.get_value(), kernel)
            group[name] = type(var)(value, **old)


# ----------------------------------------------------------------------------- layout


def _axes(entry: AxisEntry) -> tuple[str, ...]:
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
        if typed is not None and not typed.mesh.empty and any(_axes(e) for e in typed.spec):
            mesh, spec = typed.mesh, tuple(typed.spec)
    if spec is None and variable is not None and variable.get_metadata().get("out_sharding"):
        spec = tuple(nnx.spmd.get_var_pspec(variable))
        mesh = variable.get_metadata().get("mesh")
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty:
                if any(_axes(e) for e in spec):
                    _warn_no_mesh(spec)
                return None
    if mesh is None or spec is None:
        return None
    ndim = kernel.ndim
    spec = tuple(spec) + (None,) * max(0, ndim - len(spec))
    rows, cols = spec[ndim - 2], spec[ndim - 1]
    sizes = _mesh_sizes(mesh)
    if any(a not in sizes for a in _axes(rows) + _axes(cols)):
        return None
    n0 = math.prod(sizes[a] for a in _axes(rows))
    n1 = math.prod(sizes[a] for a in _axes(cols))
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
    n0 = math.prod(sizes[a] for a in _axes(rows_axes))
    n1 = math.prod(sizes[a] for a in _axes(cols_axes))
    b0, b1 = kernel.shape[0] // n0, kernel.shape[1] // n1
    acc_dtype = scale.dtype

    def local(block: jax.Array, idx: jax.Array, vals: jax.Array, s: jax.Array) -> jax.Array:
        r = idx[0] - _block_index(_axes(rows_axes), sizes) * b0
        c = idx[1] - _block_index(_axes(cols_axes), sizes) * b1
        inside = (r >= 0) & (r < b0) & (c >= 0) & (c < b1)
        r, c = jnp.where(inside, r, b0), jnp.where(inside, c, b1)  # out of range: dropped
        old = block.at[r, c].get(mode="fill", fill_value=0).astype(acc_dtype)
        new = old + s * vals.astype(acc_dtype)
        return block.at[r, c].set(new.astype(block.dtype), mode="drop", unique_indices=True)

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


# ----------------------------------------------------------------------------- whole models


def default_rules(
    model_axis: str | None = "model", fsdp_axis: str | None = None
) -> list[tuple[str, tuple[AxisEntry, ...]]]:
    """Megatron-style rules for transformer weights, as `(regex on the param path, spec)`.

    Column-parallel projections (q/k/v, gate/up, lm_head) split their output over
    `model_axis`; row-parallel ones (o_proj, down_proj) their input; embeddings their vocab.
    With `fsdp_axis` the other kernel dim is split over it too (FSDP x TP). Paths are matched
    with `re.search` after dropping `.base_layer` (so wrapped layers match too).
    """
    col = (fsdp_axis, model_axis)
    row = (model_axis, fsdp_axis)
    return [
        (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|fc1|c_fc)\.kernel$", col),
        (r"(o_proj|down_proj|out_proj|fc2|c_proj)\.kernel$", row),
        (r"lm_head\.kernel$", col),
        (r"(embed_tokens|wte|embed)\.embedding$", row),
    ]


def _fit(spec: Sequence[AxisEntry], shape: Sequence[int], sizes: Mapping[str, int] | None) -> tuple:
    """Pad `spec` with leading Nones to the array's rank; drop axes that do not divide a dim."""
    spec = (None,) * (len(shape) - len(spec)) + tuple(spec)
    if sizes is None:
        return spec
    out: list[AxisEntry] = []
    for entry, dim in zip(spec, shape, strict=True):
        axes = tuple(a for a in _axes(entry) if a in sizes)
        while axes and dim % math.prod(sizes[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def annotate(
    model: nnx.Module,
    rules: Sequence[tuple[str, Sequence[AxisEntry]]] | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """Set `out_sharding` metadata on the model's parameters from `(regex, spec)` rules.

    For models built without sharding annotations (e.g. loaded from HF files). A spec shorter
    than the array gets leading Nones (scan-stacked layer axes); with `mesh`, an axis that
    does not divide its dim is dropped. SHiRA adapters re-derive their metadata from the
    new kernels. Returns the annotated paths. Follow with `shard_model(model, mesh)`.
    """
    from shira_jax.model import shira_layers

    rules = default_rules() if rules is None else rules
    compiled = [(re.compile(p), tuple(spec)) for p, spec in rules]
    sizes = None if mesh is None else _mesh_sizes(mesh)
    done = []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param) or type(var).__name__.startswith("Shira"):
            continue
        name = ".".join(str(p) for p in path).replace(".base_layer.", ".")
        for pattern, spec in compiled:
            if pattern.search(name):
                var.set_metadata(out_sharding=_fit(spec, var.shape, sizes))
                done.append(name)
                break
    for _, layer in shira_layers(model):
        refresh_adapter_metadata(layer)
    return done


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` as its `out_sharding` metadata says, in place.

    The Flax recipe (`nnx.get_partition_spec` -> `NamedSharding` -> `device_put`) for a model
    built or loaded outside the mesh; SHiRA values and indices follow their kernels.
    Unannotated variables are replicated.
    """
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    flat_specs = dict(nnx.to_flat_state(specs))
    placed = []
    for key, var in nnx.to_flat_state(state):
        value = var.get_value()
        if not isinstance(value, (jax.Array, np.ndarray)):
            continue
        spec = flat_specs[key].get_value() if key in flat_specs else PartitionSpec()
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        try:
            target = NamedSharding(mesh, spec)
            placed.append((var, jax.device_put(value, target)))
        except ValueError as err:
            name = ".".join(str(k) for k in key)
            raise ValueError(
                f"Cannot place {name} {tuple(np.shape(value))} on mesh {dict(mesh.shape)} as "
                f"{spec}: {err}. Fix its out_sharding (sharding.annotate(..., mesh=mesh) drops "
                "axes that do not divide)."
            ) from err
    for var, value in placed:
        var.set_value(value)
    return model


# ----------------------------------------------------------------------------- HLO checks

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """`[(op, [(dtype, shape), ...])]` for every collective in compiled HLO text.

    Use with `jax.jit(f).lower(*args).compile().as_text()`; async pairs count once (`-start`).
    """
    out = []
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        for op in _COLLECTIVES:
            for form in (f" {op}(", f" {op}-start("):
                if form in rhs:
                    result = rhs.split(form)[0]
                    shapes = [
                        (dt, tuple(int(d) for d in dims.split(",") if d))
                        for dt, dims in _SHAPE.findall(result)
                    ]
                    out.append((op, shapes))
    return out


def full_kernel_gathers(
    hlo_text: str, kernel_shapes: Iterable[Sequence[int]]
) -> list[tuple[str, tuple[int, ...]]]:
    """All-gathers in `hlo_text` whose result is a whole kernel (either orientation).

    `kernel_shapes` are `[in, out]` (or `[L, in, out]`; then one layer's `[in, out]` and the
    whole stack both count).
    """
    wanted: set[tuple[int, ...]] = set()
    for shape in kernel_shapes:
        shape = tuple(int(d) for d in shape)
        for s in {shape, shape[-2:]}:
            wanted.update({s, s[:-2] + s[-2:][::-1]})
    return [
        (dt, shape)
        for op, shapes in collectives(hlo_text)
        if op == "all-gather"
        for dt, shape in shapes
        if shape in wanted
    ]
