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

Scan-stacked layers: see `shira_jax.stacked`. Kernel placement itself (adapter metadata,
shard-local scatter) lives in `shira_jax.kernels`; its public names are re-exported here.

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

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shira_jax.kernels import (
    AxisEntry,
    adapter_metadata,
    axis_names,
    kernel_layout,
    place_like_kernel,
    scatter_delta,
    scatter_fn,
)
from shira_jax.layer import ShiraParam
from shira_jax.model import shira_layers

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
        axes = tuple(a for a in axis_names(entry) if a in sizes)
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
    rules = default_rules() if rules is None else rules
    compiled = [(re.compile(p), tuple(spec)) for p, spec in rules]
    sizes = None if mesh is None else dict(mesh.shape)
    done = []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param) or isinstance(var, ShiraParam):
            continue
        name = ".".join(str(p) for p in path).replace(".base_layer.", ".")
        for pattern, spec in compiled:
            if pattern.search(name):
                var.set_metadata(out_sharding=_fit(spec, var.shape, sizes))
                done.append(name)
                break
    for _, layer in shira_layers(model):
        layer.refresh_placement()
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
