"""Orbax adapter checkpoints: round trip, fresh models, atomic writes, bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP

import shira_jax as sj


def trained(r=2, names=("first",), **kw) -> MLP:
    model = MLP()
    for i, name in enumerate(names):
        cfg = sj.ShiraConfig(
            r=r + i,
            target_modules=["lin1", "lin2", "lin3"][: 2 + i],
            random_seed=56 + i,
            init_weights=False,
            **kw,
        )
        sj.apply_shira(model, cfg, name)
    return model


def test_multiple_adapters_save_load_into_fresh_model(tmp_path, x):
    model = trained(names=("first", "second"))
    outputs = {}
    for name in ("first", "second"):
        sj.set_adapter(model, name)
        outputs[name] = model(x)
        sj.save_adapter(model, tmp_path / name, adapter_name=name)
    assert not np.allclose(outputs["first"], outputs["second"], atol=1e-3)

    fresh = MLP()  # never wrapped
    sj.load_adapter(fresh, tmp_path / "first")
    sj.load_adapter(fresh, tmp_path / "second")
    for name in ("first", "second"):
        sj.set_adapter(fresh, name)
        np.testing.assert_array_equal(fresh(x), outputs[name])
        for path, layer in sj.shira_layers(model):
            if name in layer.adapter_names:
                got = dict(sj.shira_layers(fresh))[path]
                np.testing.assert_array_equal(
                    got.shira_indices[name][...], layer.shira_indices[name][...]
                )
                np.testing.assert_array_equal(
                    got.shira_weight[name][...], layer.shira_weight[name][...]
                )
    assert sj.adapter_configs(fresh)["second"].r == 3


def test_custom_mask_round_trip_and_rename(tmp_path, x):
    def mask_fn(base, r):
        n_in, n_out = base.kernel.shape
        m = np.zeros(n_in * n_out, bool)
        m[::3][: r * (n_in + n_out)] = True
        return m.reshape(n_in, n_out)

    model = trained(mask_type="custom", mask_fn=mask_fn)
    out = model(x)
    sj.save_adapter(model, tmp_path / "ck", adapter_name="first")
    fresh = MLP()
    sj.load_adapter(fresh, tmp_path / "ck", adapter_name="renamed")
    np.testing.assert_array_equal(fresh(x), out)
    assert sj.adapter_configs(fresh)["renamed"].mask_type == "custom"


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path):
    model = trained()
    sj.save_adapter(model, tmp_path / "ck", adapter_name="first")
    model.lin1.shira_weight["first"][...] = model.lin1.shira_weight["first"][...] + 1
    sj.save_adapter(model, tmp_path / "ck", adapter_name="first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    fresh = MLP()
    sj.load_adapter(fresh, tmp_path / "ck")
    np.testing.assert_array_equal(
        fresh.lin1.shira_weight["first"][...], model.lin1.shira_weight["first"][...]
    )


def test_interrupted_save_never_loads(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    model = trained()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        sj.save_adapter(model, tmp_path / "ck", adapter_name="first")
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_leave_model_unchanged(tmp_path):
    model = trained()
    sj.save_adapter(model, tmp_path / "ck", adapter_name="first")
    small = MLP()
    small.lin1 = type(small.lin1)(20, 41, rngs=__import__("flax").nnx.Rngs(0))
    with pytest.raises(ValueError, match="lin1.*20, 40"):
        sj.load_adapter(small, tmp_path / "ck")
    assert sj.shira_layers(small) == []
    with pytest.raises(FileNotFoundError, match="not a shira-jax adapter"):
        sj.load_adapter(MLP(), tmp_path)
    meta = json.loads((tmp_path / "ck" / "shira_adapter.json").read_text())
    meta["layers"]["lin9"] = meta["layers"].pop("lin2")
    (tmp_path / "ck" / "shira_adapter.json").write_text(json.dumps(meta))
    fresh = MLP()
    with pytest.raises(ValueError, match="lin9"):
        sj.load_adapter(fresh, tmp_path / "ck")
    assert sj.shira_layers(fresh) == []


def test_modules_to_save_round_trip(tmp_path, x):
    import optax
    from flax import nnx

    model = MLP()
    sj.apply_shira(model, sj.ShiraConfig(r=2, target_modules=["lin1"], modules_to_save=["lin3"]))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=sj.ShiraParam)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, sj.ShiraParam))(model)
    opt.update(model, grads)
    out = model(x)
    sj.save_adapter(model, tmp_path / "ck")
    fresh = MLP()
    sj.load_adapter(fresh, tmp_path / "ck")
    np.testing.assert_allclose(fresh(x), out, rtol=1e-6, atol=1e-6)


def test_relative_paths(tmp_path, monkeypatch, x):
    monkeypatch.chdir(tmp_path)
    model = trained()
    sj.save_adapter(model, "runs/ck", adapter_name="first")
    fresh = MLP()
    sj.load_adapter(fresh, "runs/ck")
    np.testing.assert_array_equal(fresh(x), model(x))
