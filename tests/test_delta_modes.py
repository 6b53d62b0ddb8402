"""`delta_mode`: the sparse product (`base(x) + x @ S` from the nnz entries) equals the patched
matmul (`x @ (W + S)`) in outputs and gradients, for plain and scan-stacked layers.

Tolerance: the two paths sum the same products in a different order (the patched one inside
one matmul over `in` terms, the sparse one as a separate fp32 sum added to the base output).
fp32 rounding of such sums is relative to the size of the terms, not of the (possibly
cancelling) result, and three stacked residual blocks compound it: each array is compared
with atol = 1e-5 * its largest magnitude (about 100 fp32 ulps of the largest term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ResidualBlock, ScanResidual
from flax import nnx

import shira_jax as sj
from shira_jax import ops, stacked

TOL = {"rtol": 1e-5, "atol": 1e-5}


def close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())




def cfg(mode: str, seed: int = 1) -> sj.ShiraConfig:
    return sj.ShiraConfig(
        r=2, target_modules=["up", "down"], random_seed=seed, init_weights=False,
        delta_mode=mode,
    )


def loss_and_grads(model, x):
    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    (y, (g_model, g_x)) = (
        model(x),
        nnx.grad(loss, argnums=(nnx.DiffState(0, sj.ShiraParam), 1))(model, x),
    )
    values = {
        ".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(g_model)
    }
    return np.asarray(y), values, np.asarray(g_x)


@pytest.mark.parametrize(
    "make", [lambda: ResidualBlock(nnx.Rngs(0)), ScanResidual], ids=["plain", "stacked"]
)
def test_sparse_equals_patched_outputs_and_gradients(make):
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    results = {}
    for mode in ("patched", "sparse"):
        model = make()
        apply = stacked.apply_shira_stacked if isinstance(model, ScanResidual) else sj.apply_shira
        apply(model, cfg(mode))
        sj.set_scale(model, "default", 0.7)
        modes = {layer.resolved_mode("default", 10) for _, layer in sj.shira_layers(model)}
        assert modes == {mode}
        results[mode] = loss_and_grads(model, x)
    (y_p, g_p, gx_p), (y_s, g_s, gx_s) = results["patched"], results["sparse"]
    close(y_s, y_p)
    close(gx_s, gx_p)
    assert g_s.keys() == g_p.keys() and g_p
    for k in g_p:
        close(g_s[k], g_p[k])


def test_two_adapters_one_sparse_one_patched():
    x = jax.random.normal(jax.random.key(4), (3, 16))
    model = ResidualBlock(nnx.Rngs(0))
    sj.apply_shira(model, cfg("patched", 1), adapter_name="a")
    sj.apply_shira(model, cfg("sparse", 2), adapter_name="b")
    sj.set_adapter(model, ["a", "b"])
    mixed = np.asarray(model(x))
    ref = ResidualBlock(nnx.Rngs(0))
    sj.apply_shira(ref, cfg("patched", 1), adapter_name="a")
    sj.apply_shira(ref, cfg("patched", 2), adapter_name="b")
    sj.set_adapter(ref, ["a", "b"])
    np.testing.assert_allclose(mixed, np.asarray(ref(x)), **TOL)


def test_sparse_product_backward_is_the_sampled_product():
    idx = jnp.asarray(sj.masks.random_mask(16, 8, 2, seed=0))
    v = jax.random.normal(jax.random.key(1), (idx.shape[1],))
    x = jax.random.normal(jax.random.key(2), (4, 16))
    g = jax.random.normal(jax.random.key(3), (4, 8))
    _, vjp = jax.vjp(lambda v, x: ops.sparse_product(x, idx, v, 8, 0.5), v, x)
    d_v, d_x = vjp(g)
    dense = ops.dense_delta((16, 8), idx, jnp.ones_like(v))
    np.testing.assert_allclose(d_v, 0.5 * (x.T @ g)[idx[0], idx[1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        d_x, g @ (0.5 * ops.dense_delta((16, 8), idx, v)).T, rtol=1e-5, atol=1e-6
    )
    assert dense.sum() == idx.shape[1]  # unique positions: the reference is the same delta


def test_delta_mode_is_ours_not_peft():
    config = cfg("sparse")
    data = config.to_dict()
    assert "delta_mode" not in data and data["shira_jax"]["delta_mode"] == "sparse"
    assert sj.ShiraConfig.from_dict(data).delta_mode == "sparse"
    peft_only = {k: v for k, v in data.items() if k != "shira_jax"}
    assert sj.ShiraConfig.from_dict(peft_only).delta_mode == "patched"
    with pytest.raises(ValueError, match="delta_mode must be one of"):
        sj.ShiraConfig(delta_mode="dense")


def test_sparse_refused_on_n_d_kernels_before_any_change():
    class Heads(nnx.Module):
        def __init__(self):
            self.q = nnx.Einsum("btd,dnh->btnh", (16, 2, 4), rngs=nnx.Rngs(0))
            self.up = nnx.Linear(16, 16, rngs=nnx.Rngs(1))

    model = Heads()
    config = sj.ShiraConfig(r=1, target_modules=["up", "q"], delta_mode="sparse")
    with pytest.raises(ValueError, match=r"delta_mode='sparse' needs \[in, out\] kernels"):
        sj.apply_shira(model, config)
    assert not sj.shira_layers(model)
    sj.apply_shira(model, config.replace(delta_mode="auto"))
    assert model.q.resolved_mode("default", 1) == "patched"
