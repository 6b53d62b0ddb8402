"""SHiRA scenarios run identically on 1 device (in the pytest process) and on a simulated mesh.

`tests/sharding_worker.py` runs them in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; `tests/test_sharding.py` runs them on
the single device of the test process and compares. Every scenario returns a flat dict of
numpy arrays (and 0-d flags), so results travel as one `.npz`.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import scan_blocks, stacked_blocks
from flax import nnx

import shira_jax as sj
from shira_jax import sharding, stacked

D, H, BATCH, L = 32, 64, 16, 3
STEPS = 3

# kernel out_sharding per layout: (up, mid, down); batch axes
LAYOUTS = {
    "dp": ((None, None, None), ("data", "model")),
    "tp": (((None, "model"), ("model", None), (None, "model")), ("data",)),
    "fsdp": ((("data", "model"), ("model", "data"), ("data", "model")), ("data",)),
    # control: pure FSDP over every device; the base matmul itself gathers whole kernels
    "fsdp_full": (((("data", "model"), None), (("data", "model"), None), None), ("data",)),
}


def mesh_for(n_devices: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(
        "data=2,model=4"
        if n_devices == 8
        else "data=1,model=4"
        if n_devices == 4
        else "data=1,model=1"
    )


def _meta(spec):
    return {} if spec is None else {"out_sharding": spec}


class MLP(nnx.Module):
    def __init__(self, specs, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, H, rngs=rngs, kernel_metadata=_meta(specs[0]))
        self.mid = nnx.Linear(H, H, rngs=rngs, kernel_metadata=_meta(specs[1]))
        self.down = nnx.Linear(H, D, rngs=rngs, kernel_metadata=_meta(specs[2]))

    def __call__(self, x):
        return self.down(nnx.relu(self.mid(nnx.relu(self.up(x)))))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, H, rngs=rngs, kernel_metadata=_meta((None, "model")))
        self.o_proj = nnx.Linear(H, D, rngs=rngs, kernel_metadata=_meta(("model", None)))

    def __call__(self, x):
        return x + self.o_proj(nnx.relu(self.q_proj(x)))


class ScanNet(nnx.Module):
    """MaxText-style: blocks created once under nnx.vmap, applied with nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = stacked_blocks(Block, L, rngs)

    def __call__(self, x):
        return scan_blocks(self.layers, x)


class ShardedEinsum(nnx.Module):
    """Tunix's einsum module in miniature: weight `w` with sharding metadata, an einsum."""

    def __init__(self, einsum_str, shape, spec, rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.2, **_meta(spec))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


NH, HD = 4, 8  # heads, head dim of the N-D kernels


class NDNet(nnx.Module):
    """N-D kernels split over "model" as tensor parallelism splits heads: Tunix-style q
    (D, N, H) and o (N, H, D), and an nnx.LinearGeneral D -> (N, H)."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = ShardedEinsum("BD,DNH->BNH", (D, NH, HD), (None, "model", None), rngs)
        self.o_proj = ShardedEinsum("BNH,NHD->BD", (NH, HD, D), ("model", None, None), rngs)
        self.gate = nnx.LinearGeneral(
            D, (NH, HD), rngs=rngs, kernel_metadata=_meta((None, "model", None))
        )

    def __call__(self, x):
        return x + self.o_proj(nnx.relu(self.q_proj(x)) * self.gate(x))


def build(make, mesh):
    """Build on the host (annotated, not yet placed), then place on the mesh: the path of a
    model loaded from files. Eager init compiles once per shape, whatever the mesh."""
    with nnx.use_eager_sharding(False):
        model = nnx.jit(make)()
    return sharding.shard_model(model, mesh)


def data():
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    y = jnp.sin(2.0 * x)
    return x, y


def cfg(seed=7, **kw):
    kw.setdefault("target_modules", ["up", "mid", "down", "q_proj", "o_proj"])
    kw.setdefault("init_weights", False)
    return sj.ShiraConfig(r=2, random_seed=seed, **kw)


def compiled_step(model, optimizer, x, y):
    """One compile of the training step: (compiled HLO text, run() -> loss)."""
    graphdef, state = nnx.split((model, optimizer))

    def pure(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    compiled = jax.jit(pure).lower(state, x, y).compile()

    def run():
        loss, new_state = compiled(nnx.state((model, optimizer)), x, y)
        nnx.update((model, optimizer), new_state)
        return loss

    return compiled.as_text(), run


forward = nnx.jit(lambda model, x: model(x))


def kernels(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam)))
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def kernel_shardings(model) -> dict[str, str]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam)))
    return {
        ".".join(map(str, k)): str(getattr(v.get_value(), "sharding", None))
        for k, v in nnx.to_flat_state(state)
    }


def values(model, name="default") -> dict[str, np.ndarray]:
    return {p: np.asarray(m.shira_weight[name][...]) for p, m in sj.shira_layers(model)}


def _put(out: dict, prefix: str, arrays: dict) -> None:
    for k, v in arrays.items():
        out[f"{prefix}/{k}"] = np.asarray(v)


def _merge_round_trip(out: dict, model, x) -> tuple[dict, dict, np.ndarray]:
    """merge / unmerge: output unchanged, kernels restored bit for bit, shardings kept.
    Returns the kernels, their shardings and the output before the merge."""
    before_k, before_s = kernels(model), kernel_shardings(model)
    y_unmerged = np.asarray(forward(model, x))
    sj.merge(model)
    out["y_merged"] = np.asarray(forward(model, x))
    out["merge_close"] = np.array(np.allclose(out["y_merged"], y_unmerged, atol=1e-5))
    out["merge_sharding_kept"] = np.array(kernel_shardings(model) == before_s)
    sj.unmerge(model)
    after = kernels(model)
    out["unmerge_exact"] = np.array(all(np.array_equal(after[k], before_k[k]) for k in after))
    out["unmerge_sharding_kept"] = np.array(kernel_shardings(model) == before_s)
    return before_k, before_s, y_unmerged


def train_case(layout: str, mesh, ckpt_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Train, inspect HLO, merge / unmerge, switch adapters; optionally save a checkpoint."""
    specs, batch_axes = LAYOUTS[layout]
    out: dict[str, np.ndarray] = {}
    model = build(lambda: MLP(specs, nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        sj.apply_shira(model, cfg(init_weights=True))
        x, y = data()
        x = jax.device_put(x, sharding.batch_sharding(mesh, batch_axes))
        y = jax.device_put(y, sharding.batch_sharding(mesh, batch_axes))
        _put(out, "init_kernel", kernels(model))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=sj.ShiraParam)
        hlo, step = compiled_step(model, opt, x, y)
        shapes = [m.kernel_variable.shape for _, m in sj.shira_layers(model)]
        out["full_gathers"] = np.array(len(sharding.full_kernel_gathers(hlo, shapes)))
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
        out["uses_shard_map"] = np.array("shard_map" in jaxpr)
        if layout == "fsdp_full":  # compiled only: the HLO control
            return out
        losses = [float(step()) for _ in range(STEPS)]
        out["losses"] = np.array(losses)
        _put(out, "values", values(model))
        out["value_sharding_ok"] = np.array(
            all(
                m.shira_weight["default"].get_value().sharding.is_fully_replicated
                for _, m in sj.shira_layers(model)
            )
        )
        if ckpt_dir is not None:
            sj.save_adapter(model, ckpt_dir / layout)
        if layout == "dp":  # replicated kernels: nothing more to learn from merge / switch
            return out

        before_k, before_s, _ = _merge_round_trip(out, model, x)

        # switching: a second adapter, alone and fused
        sj.apply_shira(model, cfg(seed=11), adapter_name="b")
        out["y_default"] = np.asarray(forward(model, x))
        sj.set_adapter(model, "b")
        out["y_b"] = np.asarray(forward(model, x))
        sj.set_adapter(model, ["default", "b"])
        out["y_fused"] = np.asarray(forward(model, x))
        # merged-mode switching: merge default, swap it for b in place, unmerge
        sj.set_adapter(model, "default")
        sj.merge(model)
        sj.switch_adapter(model, "default", "b")
        out["y_switched"] = np.asarray(forward(model, x))
        out["switch_sharding_kept"] = np.array(kernel_shardings(model) == before_s)
        sj.unmerge(model)
        after = kernels(model)
        out["switch_unmerge_exact"] = np.array(
            all(np.array_equal(after[k], before_k[k]) for k in after)
        )
    return out


def stacked_case(mesh, ckpt_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Scan-stacked layers: train, HLO, per-layer merge, PEFT-style unstack, checkpoint."""
    out: dict[str, np.ndarray] = {}
    model = build(lambda: ScanNet(nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        stacked.apply_shira_stacked(model, cfg(mask_type="weight_magnitude", init_weights=True))
        x, y = data()
        x = jax.device_put(x, sharding.batch_sharding(mesh, "data"))
        y = jax.device_put(y, sharding.batch_sharding(mesh, "data"))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=sj.ShiraParam)
        hlo, step = compiled_step(model, opt, x, y)
        shapes = [m.kernel_variable.shape for _, m in sj.shira_layers(model)]
        out["full_gathers"] = np.array(len(sharding.full_kernel_gathers(hlo, shapes)))
        out["losses"] = np.array([float(step()) for _ in range(STEPS)])
        _put(out, "values", values(model))
        if ckpt_dir is not None:
            sj.save_adapter(model, ckpt_dir / "stacked")
        _, _, out["y"] = _merge_round_trip(out, model, x)  # sj.merge routes stacked layers
        flat = stacked.unstack_adapter(model, "default")
        out["unstacked_paths"] = np.array(sorted(flat))
    return out


def nd_case(mesh) -> dict[str, np.ndarray]:
    """N-D kernels (einsum, LinearGeneral) on a mesh: train, HLO, merge / unmerge."""
    out: dict[str, np.ndarray] = {}
    model = build(lambda: NDNet(nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        sj.apply_shira(model, cfg(target_modules=["q_proj", "o_proj", "gate"]))
        x, y = data()
        x = jax.device_put(x, sharding.batch_sharding(mesh, "data"))
        y = jax.device_put(y, sharding.batch_sharding(mesh, "data"))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=sj.ShiraParam)
        hlo, step = compiled_step(model, opt, x, y)
        shapes = [m.kernel_variable.shape for _, m in sj.shira_layers(model)]
        out["full_gathers"] = np.array(len(sharding.full_kernel_gathers(hlo, shapes)))
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
        out["uses_shard_map"] = np.array("shard_map" in jaxpr)
        out["losses"] = np.array([float(step()) for _ in range(STEPS)])
        _put(out, "values", values(model))
        _merge_round_trip(out, model, x)
    return out


def sparse_case(mesh) -> dict[str, np.ndarray]:
    """delta_mode="sparse" on tensor-parallel kernels: the sparse product adds into outputs
    split like the kernels' columns; no kernel is gathered (none is even read)."""
    out: dict[str, np.ndarray] = {}
    model = build(lambda: MLP(LAYOUTS["tp"][0], nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        sj.apply_shira(model, cfg(init_weights=True, delta_mode="sparse"))
        x, y = data()
        x = jax.device_put(x, sharding.batch_sharding(mesh, "data"))
        y = jax.device_put(y, sharding.batch_sharding(mesh, "data"))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=sj.ShiraParam)
        hlo, step = compiled_step(model, opt, x, y)
        shapes = [m.kernel_variable.shape for _, m in sj.shira_layers(model)]
        out["full_gathers"] = np.array(len(sharding.full_kernel_gathers(hlo, shapes)))
        out["losses"] = np.array([float(step()) for _ in range(STEPS)])
        _put(out, "values", values(model))
    return out


def restore_case(mesh, ckpt_dir: Path) -> dict[str, np.ndarray]:
    """Fresh models on `mesh` load the checkpoints another mesh saved."""
    out: dict[str, np.ndarray] = {}
    with jax.set_mesh(mesh):
        x, _ = data()
        x = jax.device_put(x, sharding.batch_sharding(mesh, "data"))
        model = build(lambda: MLP(LAYOUTS["tp"][0], nnx.Rngs(0)), mesh)
        sj.load_adapter(model, ckpt_dir / "tp")
        _put(out, "tp_values", values(model))
        out["tp_y"] = np.asarray(forward(model, x))
        out["tp_value_on_mesh"] = np.array(
            model.up.shira_weight["default"].get_value().sharding.mesh.size == mesh.size
        )
        model = build(lambda: ScanNet(nnx.Rngs(0)), mesh)
        sj.load_adapter(model, ckpt_dir / "stacked")
        _put(out, "stacked_values", values(model))
        out["stacked_y"] = np.asarray(forward(model, x))
    return out


def scatter_case(mesh) -> dict[str, np.ndarray]:
    """The shard-local scatter equals ops.scatter_delta bit for bit, fp32 and bf16 kernels."""
    out = {}
    idx = jnp.asarray(sj.masks.random_mask(D, H, 3, seed=0))
    vals = jax.random.normal(jax.random.key(2), (idx.shape[1],))
    base = jax.random.normal(jax.random.key(3), (D, H))
    for spec in [(None, "model"), ("model", None), ("data", "model"), (("data", "model"), None)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            kernel = base.astype(dtype)
            want = sj.ops.scatter_delta(kernel, idx, vals, 0.5)
            placed = jax.device_put(
                kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
            )
            layout = sharding.kernel_layout(None, placed)
            if layout is None:  # one device: nothing to split
                got = sj.ops.scatter_delta(placed, idx, vals, 0.5)
            else:
                got = sharding.scatter_delta(placed, idx, vals, 0.5, mesh=layout[0], spec=layout[1])
            name = f"{spec}/{jnp.dtype(dtype).name}"
            out[name] = np.array(
                np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
                and got.sharding == placed.sharding
            )
    return out


def bench(mesh, layout: str = "tp", dim: int = 512, steps: int = 10) -> dict[str, float]:
    """Seconds per training step of a wider MLP (compile excluded)."""
    global D, H
    D, H = dim, 2 * dim
    specs, batch_axes = LAYOUTS[layout]
    model = build(lambda: MLP(specs, nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        sj.apply_shira(model, sj.ShiraConfig(r=32, target_modules=["up", "mid", "down"]))
        x = jax.random.normal(jax.random.key(1), (256, D))
        x = jax.device_put(x, sharding.batch_sharding(mesh, batch_axes))
        y = jnp.sin(x)
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=sj.ShiraParam)
        _, step = compiled_step(model, opt, x, y)
        step().block_until_ready()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.block_until_ready()
        return {"step_s": (time.perf_counter() - t0) / steps}
