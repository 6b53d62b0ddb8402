"""ShiraDense and the model-level API: PEFT's SHiRA behaviour in NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP
from flax import nnx

import shira_jax as sj


def cfg(**kw) -> sj.ShiraConfig:
    kw.setdefault("target_modules", ["lin1", "lin2"])
    kw.setdefault("r", 2)
    return sj.ShiraConfig(**kw)


def kernels(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, k)): np.asarray(v[...])
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam))))
    }


# --------------------------------------------------------------------------- shapes (PEFT port)


def test_single_adapter_shapes(mlp):
    sj.apply_shira(mlp, cfg())
    for name, (n_in, n_out) in {"lin1": (20, 40), "lin2": (40, 30)}.items():
        layer = getattr(mlp, name)
        assert isinstance(layer, sj.ShiraDense)
        nnz = 2 * (n_in + n_out)
        assert layer.shira_weight["default"].shape == (nnz,)
        assert layer.shira_indices["default"].shape == (2, nnz)
        assert layer.shira_indices["default"][...].dtype == jnp.int32
        assert layer.get_delta_weight("default").shape == layer.base_layer.kernel.shape
        assert isinstance(layer.shira_weight["default"], sj.ShiraParam)
    assert isinstance(mlp.lin0, nnx.Linear) and isinstance(mlp.lin3, nnx.Linear)


def test_zero_init_is_identity_and_normal_init_is_not(mlp, x):
    before = mlp(x)
    sj.apply_shira(mlp, cfg(random_seed=3))
    np.testing.assert_array_equal(mlp(x), before)
    other = MLP()
    sj.apply_shira(other, cfg(random_seed=3, init_weights=False))
    assert float(jnp.std(other.lin1.shira_weight["default"][...])) > 0.5
    assert not np.allclose(other(x), before, atol=1e-3)


def test_forward_matches_hand_computed(x):
    model = MLP()
    sj.apply_shira(model, cfg(init_weights=False, random_seed=5))
    layer = model.lin1
    sj.set_scale(model, "default", 0.7)
    w = np.asarray(layer.base_layer.kernel[...], np.float64)
    b = np.asarray(layer.base_layer.bias[...], np.float64)
    idx = np.asarray(layer.shira_indices["default"][...])
    vals = np.asarray(layer.shira_weight["default"][...], np.float64)
    delta = np.zeros_like(w)
    np.add.at(delta, (idx[0], idx[1]), 0.7 * vals)
    h = np.random.default_rng(0).normal(size=(3, 20))
    expected = h @ (w + delta) + b
    np.testing.assert_allclose(layer(jnp.asarray(h, jnp.float32)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.get_delta_weight("default"), delta, rtol=1e-6, atol=1e-7)


def test_seeded_random_mask_is_reproducible_and_seed_dependent():
    a, b, c = MLP(), MLP(), MLP()
    sj.apply_shira(a, cfg(random_seed=56))
    sj.apply_shira(b, cfg(random_seed=56))
    sj.apply_shira(c, cfg(random_seed=57))
    ia, ib, ic = (m.lin1.shira_indices["default"][...] for m in (a, b, c))
    np.testing.assert_array_equal(ia, ib)
    assert not np.array_equal(ia, ic)
    np.testing.assert_array_equal(ia, sj.masks.random_mask(20, 40, 2, seed=56))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_dtypes(dtype):
    model = MLP(param_dtype=dtype)
    sj.apply_shira(model, cfg(init_weights=False))
    out = model(jnp.ones((5, 10), dtype))
    assert out.dtype == dtype
    assert model.lin1.shira_weight["default"][...].dtype == jnp.float32
    assert model.lin1.effective_kernel().dtype == dtype


# --------------------------------------------------------------------------- several adapters


def test_second_adapter_inactive_until_set(mlp, x):
    sj.apply_shira(mlp, cfg(random_seed=1, init_weights=False), "first")
    out_first = mlp(x)
    sj.apply_shira(
        mlp,
        cfg(r=3, target_modules=["lin1", "lin2", "lin3"], random_seed=2, init_weights=False),
        "second",
    )
    assert mlp.lin1.active_adapters == ("first",)
    assert isinstance(mlp.lin3, sj.ShiraDense) and mlp.lin3.active_adapters == ("first",)
    assert isinstance(mlp.lin1.shira_weight["second"], sj.ShiraFrozenValues)
    np.testing.assert_array_equal(mlp(x), out_first)
    sj.set_adapter(mlp, "second")
    assert isinstance(mlp.lin1.shira_weight["second"], sj.ShiraParam)
    assert isinstance(mlp.lin1.shira_weight["first"], sj.ShiraFrozenValues)
    out_second = mlp(x)
    assert not np.allclose(out_first, out_second, atol=1e-3)
    sj.set_adapter(mlp, ["first", "second"])
    k = mlp.lin1.base_layer.kernel[...]
    fused = mlp.lin1.get_delta_weight("first") + mlp.lin1.get_delta_weight("second")
    np.testing.assert_allclose(mlp.lin1.effective_kernel(), k + fused, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="third"):
        sj.set_adapter(mlp, "third")


def test_disable_adapter_restores_merge(mlp, x):
    base = mlp(x)
    sj.apply_shira(mlp, cfg(init_weights=False))
    adapted = mlp(x)
    sj.merge(mlp)
    with sj.disable_adapter(mlp):
        np.testing.assert_allclose(mlp(x), base, rtol=1e-6, atol=1e-6)
    assert mlp.lin1.merged_adapters == ("default",)
    np.testing.assert_allclose(mlp(x), adapted, rtol=1e-5, atol=1e-5)


def test_delete_adapter(mlp):
    sj.apply_shira(mlp, cfg(), "a")
    sj.apply_shira(mlp, cfg(), "b")
    sj.delete_adapter(mlp, "b")
    assert mlp.lin1.adapter_names == ("a",)
    assert "b" not in sj.adapter_configs(mlp)
    sj.merge(mlp)
    with pytest.raises(ValueError, match="merged"):
        sj.delete_adapter(mlp, "a")


# --------------------------------------------------------------------------- merge / unmerge


def test_merge_unmerge_and_merge_and_unload(mlp, x):
    sj.apply_shira(mlp, cfg(init_weights=False))
    before = kernels(mlp)
    adapted = mlp(x)
    sj.merge(mlp)
    assert mlp.lin1.merged and mlp.lin1._live_adapters() == ()
    np.testing.assert_allclose(mlp(x), adapted, rtol=1e-5, atol=1e-5)
    sj.unmerge(mlp)
    for k, v in kernels(mlp).items():
        np.testing.assert_array_equal(v, before[k])
    sj.merge_and_unload(mlp)
    assert type(mlp.lin1) is nnx.Linear and sj.shira_layers(mlp) == []
    np.testing.assert_allclose(mlp(x), adapted, rtol=1e-5, atol=1e-5)


def test_thousand_bf16_merge_cycles_are_bit_exact():
    model = MLP(param_dtype=jnp.bfloat16)
    sj.apply_shira(model, cfg(init_weights=False, random_seed=0), "a")
    sj.apply_shira(model, cfg(init_weights=False, random_seed=1), "b")
    before = kernels(model)
    for i in range(1000):
        sj.merge(model, ["a", "b"] if i % 2 else ["b"])
        sj.unmerge(model)
    for k, v in kernels(model).items():
        assert v.dtype == before[k].dtype
        np.testing.assert_array_equal(v.view(np.uint16), before[k].view(np.uint16), err_msg=k)


def test_overlapping_merges_unmerge_exactly():
    model = MLP()
    # The same seed twice: both adapters sit on exactly the same entries.
    sj.apply_shira(model, cfg(init_weights=False, random_seed=4), "a")
    sj.apply_shira(model, cfg(init_weights=False, random_seed=4), "b")
    before = kernels(model)
    sj.merge(model, ["a"])
    sj.merge(model, ["b"])
    sj.unmerge(model)
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_safe_merge_refuses_non_finite_and_leaves_model(mlp):
    sj.apply_shira(mlp, cfg(init_weights=False))
    mlp.lin2.shira_weight["default"][...] = mlp.lin2.shira_weight["default"][...].at[0].set(jnp.inf)
    before = kernels(mlp)
    with pytest.raises(ValueError, match="lin2"):
        sj.merge(mlp, safe_merge=True)
    assert not mlp.lin1.merged and not mlp.lin2.merged
    for k, v in kernels(mlp).items():
        np.testing.assert_array_equal(v, before[k])


# --------------------------------------------------------------------------- training


def test_jitted_training_moves_only_shira_values(mlp, x):
    sj.apply_shira(mlp, cfg(random_seed=0))
    frozen = nnx.All(nnx.Not(sj.ShiraParam))
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(mlp, frozen))}
    optimizer = nnx.Optimizer(mlp, optax.adamw(1e-2), wrt=sj.ShiraParam)
    y = jax.nn.one_hot(jnp.arange(5) % 10, 10)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return -jnp.mean(jnp.sum(model(x) * y, axis=-1))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(mlp, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.05
    after = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(mlp, frozen))}
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=str(k))
    assert float(jnp.abs(mlp.lin1.shira_weight["default"][...]).sum()) > 0


def test_grad_through_jit_matches_finite_difference():
    model = MLP()
    sj.apply_shira(model, cfg(init_weights=False))
    x = jnp.ones((2, 10))

    def loss(model):
        return jnp.sum(model(x))

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, sj.ShiraParam)))(model)
    g = grads["lin1"]["shira_weight"]["default"][...]
    eps = 1e-2
    i = int(jnp.argmax(jnp.abs(g)))
    values = model.lin1.shira_weight["default"]
    base = values[...]
    values[...] = base.at[i].add(eps)
    up = float(loss(model))
    values[...] = base.at[i].add(-eps)
    down = float(loss(model))
    values[...] = base
    np.testing.assert_allclose((up - down) / (2 * eps), float(g[i]), rtol=2e-2)


# --------------------------------------------------------------------------- masks via the API


def test_mask_types_through_apply_shira(mlp, x):
    y = jax.nn.one_hot(jnp.arange(5) % 10, 10)

    def loss_fn(model, batch):
        bx, by = batch
        return -jnp.mean(jnp.sum(model(bx) * by, axis=-1))

    batches = [(x, y), (x * 0.5, y)]
    for i, mask_type in enumerate(["struct", "weight_magnitude", "gradient", "snip"]):
        extra = {"loss_fn": loss_fn, "calibration_data": batches} if i >= 2 else {}
        sj.apply_shira(mlp, cfg(mask_type=mask_type), mask_type, **extra)
        idx = np.asarray(mlp.lin1.shira_indices[mask_type][...])
        assert idx.shape == (2, 2 * 60)
        flat = idx[0] * 40 + idx[1]
        assert np.all(np.diff(flat) > 0)
    wm = np.asarray(mlp.lin1.shira_indices["weight_magnitude"][...])
    k = np.abs(np.asarray(mlp.lin1.base_layer.kernel[...]))
    assert k[wm[0], wm[1]].min() >= np.sort(k.ravel())[-120]


def test_non_overlapping_weight_magnitude(mlp):
    sj.apply_shira(mlp, cfg(mask_type="weight_magnitude"), "a")
    sj.apply_shira(mlp, cfg(mask_type="weight_magnitude", exclude_adapters=["a"]), "b")
    a = np.asarray(mlp.lin1.shira_indices["a"][...])
    b = np.asarray(mlp.lin1.shira_indices["b"][...])
    assert not set(zip(*a)) & set(zip(*b))
    k = np.abs(np.asarray(mlp.lin1.base_layer.kernel[...]))
    assert k[b[0], b[1]].max() <= k[a[0], a[1]].min()


def test_custom_mask_fn_dense_and_indices(mlp):
    def dense_mask(base, r):  # the first nnz entries in row-major order
        n_in, n_out = base.kernel.shape
        out = np.zeros(n_in * n_out, bool)
        out[: r * (n_in + n_out)] = True
        return out.reshape(n_in, n_out)

    def index_mask(base, r):  # the same positions as [2, nnz] indices, shuffled
        idx = sj.masks.mask_from_dense(dense_mask(base, r))
        return idx[:, np.random.default_rng(0).permutation(idx.shape[1])]

    sj.apply_shira(mlp, cfg(mask_type="custom", mask_fn=dense_mask), "dense")
    idx = np.asarray(mlp.lin1.shira_indices["dense"][...])
    np.testing.assert_array_equal(idx, sj.masks.mask_from_dense(dense_mask(mlp.lin1.base_layer, 2)))
    sj.apply_shira(mlp, cfg(mask_type="custom", mask_fn=index_mask), "indices")
    np.testing.assert_array_equal(mlp.lin1.shira_indices["indices"][...], idx)
    with pytest.raises(ValueError, match="lin1"):
        sj.apply_shira(mlp, cfg(mask_type="custom", mask_fn=lambda b, r: dense_mask(b, r + 1)))


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors(mlp):
    with pytest.raises(ValueError, match="positive"):
        sj.ShiraConfig(r=0)
    with pytest.raises(ValueError, match="mask_type"):
        sj.ShiraConfig(mask_type="bogus")
    with pytest.raises(ValueError, match="mask_fn"):
        sj.ShiraConfig(mask_type="custom")
    with pytest.raises(ValueError, match="nope.*lin0"):
        sj.apply_shira(mlp, cfg(target_modules=["nope"]))
    with pytest.raises(ValueError, match="lin1"):
        sj.apply_shira(mlp, cfg(r=50))
    with pytest.raises(ValueError, match="adapter name"):
        sj.apply_shira(mlp, cfg(), "../evil")
    with pytest.raises(ValueError, match="calibration"):
        sj.apply_shira(mlp, cfg(mask_type="snip"))
    assert sj.shira_layers(mlp) == []  # every failure above left the model untouched
    sj.apply_shira(mlp, cfg())
    with pytest.raises(ValueError, match="already exists"):
        sj.apply_shira(mlp, cfg())


def test_regex_targets_fullmatch(mlp):
    sj.apply_shira(mlp, cfg(target_modules=r"lin[02]"))
    assert [p for p, _ in sj.shira_layers(mlp)] == ["lin0", "lin2"]


def test_modules_to_save_train_and_switch(x):
    model = MLP()
    sj.apply_shira(model, cfg(modules_to_save=["lin3"]))
    assert isinstance(model.lin3, sj.ModulesToSave)
    copy = model.lin3.modules_to_save["default"]
    assert isinstance(copy.kernel, sj.ShiraModuleParam)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=sj.ShiraParam)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, sj.ShiraParam))(model)
    optimizer.update(model, grads)
    orig = model.lin3.original_module.kernel[...]
    assert not np.allclose(copy.kernel[...], orig)
    with sj.disable_adapter(model):
        np.testing.assert_allclose(model(x), MLP()(x), rtol=1e-6, atol=1e-6)
    sj.merge_and_unload(model)
    assert type(model.lin3) is nnx.Linear


def test_second_all_linear_adapter_wraps_each_layer_once(mlp):
    sj.apply_shira(mlp, cfg(target_modules="all-linear", random_seed=0), "a")
    sj.apply_shira(mlp, cfg(target_modules="all-linear", random_seed=1), "b")
    layers = sj.shira_layers(mlp)
    assert [p for p, _ in layers] == ["lin0", "lin1", "lin2", "lin3"]
    assert all(layer.adapter_names == ("a", "b") for _, layer in layers)
    assert all(type(layer.base_layer) is nnx.Linear for _, layer in layers)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_get_gradients_for_every_kernel_dtype(dtype):
    model = MLP(param_dtype=dtype)
    sj.apply_shira(model, cfg(init_weights=False))
    x = jnp.ones((4, 10), dtype)
    loss = lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
    for name in ("lin1", "lin2"):
        g = grads[name]["shira_weight"]["default"][...]
        assert float(jnp.abs(g).sum()) > 0, f"{name}: zero gradient for {dtype.__name__} kernel"
    scatter = lambda v: sj.ops.scatter_delta(  # noqa: E731
        jnp.eye(2, dtype=dtype), jnp.array([[0, 1], [1, 0]]), v
    )
    g = jax.grad(lambda v: scatter(v).astype(jnp.float32).sum())(jnp.zeros(2))
    np.testing.assert_allclose(g, [1.0, 1.0])
