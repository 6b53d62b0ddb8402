"""SHiRA on a device mesh (issue 6): sharding metadata, shard-local scatter, stacked layers,
sharded checkpoints.

The mesh runs happen in subprocesses with 8 and 4 simulated CPU devices
(`tests/sharding_worker.py`); this process keeps its single device and computes the reference
with the very same code (`tests/sharding_cases.py`, on a 1x1 mesh).

Tolerances, 8 devices vs 1: losses and trained values rtol 1e-5 / atol 1e-6 (the only
difference is the order of float32 sums: batch split over `data`, the values' gradient summed
over `model`); forward outputs rtol 1e-5 / atol 1e-5. Observed: values differ by <= 2.3e-7,
losses by <= 1.5e-6 (relative 6e-7), outputs by <= 1.2e-5 on entries of magnitude ~10.
Checkpoint restores are exact; unmerge is bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_cases as cases
from flax import nnx
from xla_flags import SLOW_COLLECTIVES

import shira_jax as sj
from shira_jax import sharding, stacked

WORKER = Path(__file__).with_name("sharding_worker.py")
TOL = {"rtol": 1e-5, "atol": 1e-6}  # losses, trained values (|values| ~ 3e-2)
TOL_Y = {"rtol": 1e-5, "atol": 1e-5}  # forward outputs


# ----------------------------------------------------------------------------- mesh runs


def _start(n: int, out: Path, modes: str, ckpt: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(n), str(out), modes, str(ckpt)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, out: Path) -> dict[str, np.ndarray]:
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"mesh worker failed:\n{log[-6000:]}"
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-device reference, 8-device results, 4-device restore, 1-device restore)."""
    work = tmp_path_factory.mktemp("mesh")
    ckpt = work / "ckpt"
    ckpt.mkdir()
    p8 = _start(8, work / "r8.npz", "train", ckpt)
    mesh = cases.mesh_for(1)
    ref = {f"train/{k}": v for k, v in cases.train_case("tp", mesh).items()}
    ref.update({f"stacked/{k}": v for k, v in cases.stacked_case(mesh).items()})
    ref.update({f"nd/{k}": v for k, v in cases.nd_case(mesh).items()})
    ref.update({f"sparse/{k}": v for k, v in cases.sparse_case(mesh).items()})
    r8 = _finish(p8, work / "r8.npz")
    p4 = _start(4, work / "r4.npz", "restore", ckpt)
    r1 = cases.restore_case(mesh, ckpt)
    r4 = _finish(p4, work / "r4.npz")
    return ref, r8, r4, r1, ckpt


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


def test_this_process_keeps_one_device():
    assert jax.device_count() == 1


@pytest.mark.parametrize("layout", ["dp", "tp", "fsdp"])
def test_training_step_matches_one_device(runs, layout):
    ref, r8, *_ = runs
    for k in [k for k in ref if k.startswith("train/init_kernel/")]:  # same starting point
        np.testing.assert_array_equal(r8[k.replace("train/", f"{layout}/")], ref[k])
    _close(r8[f"{layout}/losses"], ref["train/losses"])
    for path in ("up", "mid", "down"):
        _close(r8[f"{layout}/values/{path}"], ref[f"train/values/{path}"])
    assert r8[f"{layout}/value_sharding_ok"]
    # the shard-local scatter is used exactly when a kernel is split
    assert bool(r8[f"{layout}/uses_shard_map"]) == (layout != "dp")


@pytest.mark.parametrize("layout", ["tp", "fsdp", "stacked"])
def test_no_full_kernel_all_gather(runs, layout):
    _, r8, *_ = runs
    assert int(r8[f"{layout}/full_gathers"]) == 0


def test_nd_kernels_on_the_mesh_match_one_device_without_full_gathers(runs):
    """Einsum (D, N, H) / (N, H, D) and LinearGeneral kernels split over "model": each device
    scatters into its own block (shard_map), the step equals one device, merge is exact."""
    ref, r8, *_ = runs
    assert int(r8["nd/full_gathers"]) == 0
    assert bool(r8["nd/uses_shard_map"])
    _close(r8["nd/losses"], ref["nd/losses"])
    for key in [k for k in ref if k.startswith("nd/values/")]:
        _close(r8[key], ref[key])
    for flag in ("merge_close", "unmerge_exact", "merge_sharding_kept", "unmerge_sharding_kept"):
        assert bool(r8[f"nd/{flag}"]), flag


def test_sparse_delta_on_the_mesh_matches_one_device_without_full_gathers(runs):
    ref, r8, *_ = runs
    assert int(r8["sparse/full_gathers"]) == 0
    _close(r8["sparse/losses"], ref["sparse/losses"])
    # the same training as the patched path (the sparse product is the same delta)
    _close(ref["sparse/losses"], ref["train/losses"])
    for key in [k for k in ref if k.startswith("sparse/values/")]:
        _close(r8[key], ref[key])


def test_full_kernel_gather_detector_has_teeth(runs):
    # pure FSDP over all 8 devices: the base matmul itself gathers whole kernels; found.
    _, r8, *_ = runs
    assert int(r8["fsdp_full/full_gathers"]) > 0


def test_shard_local_scatter_is_bit_exact(runs):
    _, r8, *_ = runs
    checks = {k: bool(v) for k, v in r8.items() if k.startswith("scatter/")}
    assert len(checks) == 8 and all(checks.values()), checks


@pytest.mark.parametrize("layout", ["tp", "fsdp", "stacked"])
def test_merge_unmerge_on_mesh(runs, layout):
    ref, r8, *_ = runs
    prefix = "stacked" if layout == "stacked" else "train"
    for flag in ("merge_close", "merge_sharding_kept", "unmerge_exact"):
        assert r8[f"{layout}/{flag}"], flag
    if layout != "stacked":
        assert r8[f"{layout}/unmerge_sharding_kept"]
    _close(r8[f"{layout}/y_merged"], ref[f"{prefix}/y_merged"], **TOL_Y)


@pytest.mark.parametrize("layout", ["tp", "fsdp"])
def test_switching_matches_one_device(runs, layout):
    ref, r8, *_ = runs
    for key in ("y_default", "y_b", "y_fused", "y_switched"):
        _close(r8[f"{layout}/{key}"], ref[f"train/{key}"], **TOL_Y)
    _close(ref["train/y_switched"], ref["train/y_b"], **TOL_Y)  # merged b == unmerged b
    assert r8[f"{layout}/switch_sharding_kept"] and r8[f"{layout}/switch_unmerge_exact"]
    assert not np.allclose(ref["train/y_b"], ref["train/y_default"], atol=1e-3)


def test_stacked_training_matches_one_device(runs):
    ref, r8, *_ = runs
    _close(r8["stacked/losses"], ref["stacked/losses"])
    for path in ("layers.q_proj", "layers.o_proj"):
        _close(r8[f"stacked/values/{path}"], ref[f"stacked/values/{path}"])
    assert ref["stacked/values/layers.q_proj"].shape == (cases.L, 2 * (cases.D + cases.H))
    assert list(r8["stacked/unstacked_paths"]) == [
        f"layers.{i}.{p}" for i in range(cases.L) for p in ("o_proj", "q_proj")
    ]


@pytest.mark.parametrize("restored", ["4-devices", "1-device"])
def test_checkpoint_saved_on_8_restores_elsewhere(runs, restored):
    ref, r8, r4, r1, _ = runs
    got = r4 if restored == "4-devices" else {f"restore/{k}": v for k, v in r1.items()}
    for path in ("up", "mid", "down"):
        np.testing.assert_array_equal(got[f"restore/tp_values/{path}"], r8[f"tp/values/{path}"])
    for path in ("layers.q_proj", "layers.o_proj"):
        np.testing.assert_array_equal(
            got[f"restore/stacked_values/{path}"], r8[f"stacked/values/{path}"]
        )
    _close(got["restore/tp_y"], ref["train/y_default"], **TOL_Y)
    _close(got["restore/stacked_y"], ref["stacked/y"], **TOL_Y)
    if restored == "4-devices":
        assert r4["restore/tp_value_on_mesh"]


def test_plain_load_adapter_reads_a_mesh_checkpoint(runs):
    *_, r8_ckpt = runs
    _, r8, *_ = runs
    model = cases.MLP(cases.LAYOUTS["dp"][0], nnx.Rngs(0))
    sj.load_adapter(model, r8_ckpt / "tp")
    np.testing.assert_array_equal(model.up.shira_weight["default"][...], r8["tp/values/up"])


# ----------------------------------------------------------------------------- one device


def test_parse_and_make_mesh():
    assert sharding.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh(" fsdp=-1 ") == {"fsdp": -1}
    for bad in ("", "data", "data=x", "data=2,data=2", "a=-1,b=-1", "data=0"):
        with pytest.raises(ValueError, match="mesh"):
            sharding.parse_mesh(bad)
    mesh = sharding.make_mesh("data=-1,model=1")
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert mesh.axis_types[0] == jax.sharding.AxisType.Auto
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh("data=2,model=4")


def test_mesh_rules_and_shard_batch():
    mesh = sharding.make_mesh("data=1,model=1")
    rules, batch_axes = sharding.mesh_rules(mesh)
    assert batch_axes == ("data",)
    assert dict(rules)[r"lm_head\.kernel$"] == (None, "model")
    rules, _ = sharding.mesh_rules(sharding.make_mesh("fsdp=1,tensor=1"))
    assert dict(rules)[r"lm_head\.kernel$"] == ("fsdp", "tensor")
    batch = sharding.shard_batch({"x": np.ones((4, 3))}, mesh, batch_axes)
    assert batch["x"].sharding.spec == jax.P("data", None)


def _annotated_mlp():
    with nnx.use_eager_sharding(False):
        return cases.MLP(cases.LAYOUTS["fsdp"][0], nnx.Rngs(0))


def test_adapter_metadata_follows_the_kernel():
    model = _annotated_mlp()
    sj.apply_shira(model, cases.cfg())
    specs = nnx.get_partition_spec(nnx.state(model))
    assert specs["up"]["base_layer"]["kernel"].get_value() == jax.P("data", "model")
    assert specs["up"]["shira_weight"]["default"].get_value() == jax.P(None)
    assert specs["up"]["shira_indices"]["default"].get_value() == jax.P(None, None)
    # switching the active adapter (ShiraParam <-> ShiraFrozenValues) keeps the metadata
    sj.apply_shira(model, cases.cfg(seed=3), adapter_name="b")
    sj.set_adapter(model, "b")
    assert type(model.up.shira_weight["default"]) is sj.ShiraFrozenValues
    assert model.up.shira_weight["default"].get_metadata()["out_sharding"] == (None,)
    # an unannotated kernel gives unannotated adapters
    plain = cases.MLP((None, None, None), nnx.Rngs(0))
    sj.apply_shira(plain, cases.cfg())
    assert "out_sharding" not in plain.up.shira_weight["default"].get_metadata()


def test_stacked_adapter_metadata_keeps_the_layer_axis():
    class Net(nnx.Module):
        def __init__(self, rngs):
            meta = {"out_sharding": ("embed", "mlp")}
            make = nnx.vmap(
                lambda r: nnx.Linear(8, 8, rngs=r, kernel_metadata=meta),
                in_axes=0,
                out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            self.proj = nnx.split_rngs(splits=2)(make)(rngs)

    with nnx.use_eager_sharding(False):
        net = Net(nnx.Rngs(0))
    assert net.proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    stacked.apply_shira_stacked(net, sj.ShiraConfig(r=1, target_modules=["proj"]))
    layer = net.proj
    assert layer.shira_weight["default"].get_metadata()["out_sharding"] == ("layers", None)
    assert layer.shira_indices["default"].get_metadata()["out_sharding"] == ("layers", None, None)
    assert layer.base_layer.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    stacked.merge(net)  # per-layer operations keep the layer axis name too
    stacked.unmerge(net)
    assert layer.shira_weight["default"].get_metadata()["out_sharding"] == ("layers", None)


def test_annotate_default_rules_and_divisibility():
    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(8, 12, rngs=rngs)
            self.o_proj = nnx.Linear(12, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)

    model = Attn(nnx.Rngs(0))
    sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=["q_proj"]))
    done = sharding.annotate(model, sharding.default_rules(fsdp_axis="data"))
    assert done == ["o_proj.kernel", "q_proj.kernel"] or sorted(done) == [
        "o_proj.kernel",
        "q_proj.kernel",
    ]
    assert model.q_proj.base_layer.kernel.get_metadata()["out_sharding"] == ("data", "model")
    assert model.q_proj.shira_weight["default"].get_metadata()["out_sharding"] == (None,)

    class FakeMesh:
        shape = {"data": 2, "model": 8}

    assert sharding._fit(("data", "model"), (8, 12), FakeMesh.shape) == ("data", None)
    assert sharding._fit((None, ("data", "model")), (3, 8, 32), FakeMesh.shape) == (
        None,
        None,
        ("data", "model"),
    )


def test_hlo_collective_parsing():
    hlo = "\n".join(
        [
            "  %all-gather.1 = f32[64,128]{1,0} all-gather(f32[64,32]{1,0} %p), dimensions={1}",
            "  %ag = (bf16[128,64]{1,0}, f32[4]{0}) all-gather-start(%a, %b), dimensions={0}",
            "  %all-reduce = f32[384]{0} all-reduce(f32[384]{0} %x), to_apply=%add",
        ]
    )
    ops = [op for op, _ in sharding.collectives(hlo)]
    assert ops == ["all-gather", "all-gather", "all-reduce"]
    assert sharding.full_kernel_gathers(hlo, [(64, 128)]) == [
        ("f32", (64, 128)),
        ("bf16", (128, 64)),
    ]
    assert sharding.full_kernel_gathers(hlo, [(3, 32, 16)]) == []


def _scan_net():
    with nnx.use_eager_sharding(False):
        return cases.ScanNet(nnx.Rngs(0))


def test_stacked_forward_equals_unrolled_layers():
    net = _scan_net()
    stacked.apply_shira_stacked(net, cases.cfg(mask_type="weight_magnitude"))
    layer = net.layers.q_proj
    x, _ = cases.data()
    want = x
    for i in range(cases.L):
        h = x_i = want
        for name in ("q_proj", "o_proj"):
            m = getattr(net.layers, name)
            k = sj.ops.scatter_delta(
                m.base_layer.kernel[...][i],
                m.shira_indices["default"][...][i],
                m.shira_weight["default"][...][i],
            )
            h = h @ k + m.base_layer.bias[...][i]
            if name == "q_proj":
                h = nnx.relu(h)
        want = x_i + h
    np.testing.assert_allclose(net(x), want, **TOL_Y)
    # weight-magnitude masks differ per layer; per-layer delta has [L, in, out]
    idx = np.asarray(layer.shira_indices["default"][...])
    assert not np.array_equal(idx[0], idx[1])
    assert stacked.delta_weight(layer, "default").shape == (cases.L, cases.D, cases.H)


def test_stacked_merge_unmerge_switch_and_delete():
    net = _scan_net()
    stacked.apply_shira_stacked(net, cases.cfg())
    stacked.apply_shira_stacked(net, cases.cfg(seed=5), adapter_name="b")
    x, _ = cases.data()
    kernels = cases.kernels(net)
    y = net(x)
    stacked.merge(net)
    assert net.layers.q_proj.merged_adapters == ("default",)
    np.testing.assert_allclose(net(x), y, **TOL_Y)
    stacked.unmerge(net)
    after = cases.kernels(net)
    assert all(np.array_equal(after[k], kernels[k]) for k in kernels)
    sj.set_adapter(net, "b")
    y_b = net(x)
    assert not np.allclose(y_b, y, atol=1e-4)
    stacked.merge(net, adapter_names=["b"])
    np.testing.assert_allclose(net(x), y_b, **TOL_Y)
    stacked.unmerge(net)
    sj.delete_adapter(net, "default")
    assert net.layers.q_proj.adapter_names == ("b",)


def test_unstack_restack_round_trip_and_import():
    net = _scan_net()
    stacked.apply_shira_stacked(net, cases.cfg())
    flat = stacked.unstack_adapter(net, "default")
    assert set(flat) == {f"layers.{i}.{p}" for i in range(cases.L) for p in ("q_proj", "o_proj")}
    idx0, vals0 = flat["layers.0.q_proj"]
    assert idx0.shape == (2, 2 * (cases.D + cases.H)) and idx0.dtype == np.int32
    back = stacked.restack_adapter(flat, net)
    np.testing.assert_array_equal(
        back["layers.q_proj"][0], net.layers.q_proj.shira_indices["default"][...]
    )
    # a PEFT-style import keyed by per-layer paths restacks into a fresh model
    fresh = _scan_net()
    stacked.apply_shira_stacked(
        fresh,
        cases.cfg(),
        "imported",
        indices={p: i for p, (i, _) in flat.items()},
        values={p: v for p, (_, v) in flat.items()},
    )
    np.testing.assert_array_equal(
        fresh.layers.o_proj.shira_weight["imported"][...],
        net.layers.o_proj.shira_weight["default"][...],
    )
    # a list-based model keeps its layers.N paths
    assert stacked.restack_adapter(flat, set()).keys() == flat.keys()
    with pytest.raises(ValueError, match="layers \\[1\\]"):
        stacked.restack_adapter({k: v for k, v in flat.items() if ".1." not in k}, net)


def test_apply_shira_stacked_on_plain_model_is_apply_shira():
    a, b = cases.MLP((None,) * 3, nnx.Rngs(0)), cases.MLP((None,) * 3, nnx.Rngs(0))
    sj.apply_shira(a, cases.cfg())
    stacked.apply_shira_stacked(b, cases.cfg())
    for name in ("up", "mid", "down"):
        np.testing.assert_array_equal(
            getattr(a, name).shira_weight["default"][...],
            getattr(b, name).shira_weight["default"][...],
        )
    assert sj.adapter_configs(b)["default"] == cases.cfg()


def test_sharded_checkpoint_round_trip_one_device(tmp_path):
    net = _scan_net()
    stacked.apply_shira_stacked(net, cases.cfg())
    sj.save_adapter(net, tmp_path / "ckpt")
    sj.save_adapter(net, tmp_path / "ckpt")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    fresh = _scan_net()
    sj.load_adapter(fresh, tmp_path / "ckpt")
    x, _ = cases.data()
    np.testing.assert_array_equal(fresh(x), net(x))
    with pytest.raises(ValueError, match="does not exist"):
        sj.load_adapter(cases.MLP((None,) * 3, nnx.Rngs(0)), tmp_path / "ckpt")


def test_no_mesh_falls_back_to_plain_scatter():
    model = _annotated_mlp()
    sj.apply_shira(model, cases.cfg())
    kernel = model.up.base_layer.kernel
    assert sharding.scatter_fn(kernel, kernel[...]) is sj.ops.scatter_delta
    x, _ = cases.data()
    y = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.shape == (cases.BATCH, cases.D) and bool(jnp.isfinite(y).all())


def test_docstring_examples():
    import doctest

    for module in (sharding, stacked):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ----------------------------------------------------------------------------- finetune CLI


def test_finetune_cli_mesh_matches_single_device(tmp_path):
    """`shira-jax finetune --mesh data=2,model=4` on 8 CPU devices: the same losses as no mesh."""
    from conftest import make_text, make_tiny_model_dir

    text = make_text(200, seed=1)
    (tmp_path / "corpus.txt").write_text(text)
    model_dir = make_tiny_model_dir(tmp_path / "model", text=text)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8" + SLOW_COLLECTIVES,
        "JAX_PLATFORMS": "cpu",
    }
    flags = ["--model", str(model_dir), "--data", str(tmp_path / "corpus.txt"), "--r", "4"]
    flags += ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1"]
    flags += ["--no-progress", "--dtype", "float32", "--no-peft"]
    losses = {}
    # the mesh run in its own process (8 devices); the run without a mesh uses one device, so it
    # runs here (this process keeps one device), through the same `main`, without starting jax
    # a second time
    from shira_jax.app.cli import main

    for name, extra in (("mesh", ["--mesh", "data=2,model=4"]), ("plain", [])):
        out = tmp_path / name
        argv = ["finetune", *flags, "--out", str(out), *extra]
        if extra:
            cmd = [sys.executable, "-m", "shira_jax.app.cli", *argv]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        else:
            assert jax.device_count() == 1
            assert main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps_done"] == 3
        losses[name] = metrics["train_loss"]
    assert json.loads((tmp_path / "mesh" / "metrics.json").read_text())["mesh"] == {
        "data": 2,
        "model": 4,
    }
    np.testing.assert_allclose(losses["mesh"], losses["plain"], rtol=1e-4)
