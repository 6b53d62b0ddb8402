"""The functional form on plain param pytrees: a Linen model trained with SHiRA."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import shira_jax as sj


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(x)


def setup():
    model = LinenMLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))
    cfg = sj.ShiraConfig(r=2, target_modules=["up", "down"], random_seed=0)
    return model, params, sj.functional.init(params, cfg)


def test_init_paths_shapes_and_peft_mask():
    _, params, adapter = setup()
    assert sorted(adapter.values) == ["params.down.kernel", "params.up.kernel"]
    assert adapter.values["params.up.kernel"].shape == (2 * (16 + 32),)
    np.testing.assert_array_equal(
        adapter.indices["params.up.kernel"], sj.masks.random_mask(16, 32, 2, seed=0)
    )


def test_apply_matches_dense_delta_and_merge_unmerge_exact():
    model, params, adapter = setup()
    values = {
        k: jax.random.normal(jax.random.key(i), v.shape)
        for i, (k, v) in enumerate(adapter.values.items())
    }
    adapter = adapter._replace(values=values)
    patched = sj.functional.apply(params, adapter.values, adapter.indices, scale=0.5)
    k = params["params"]["up"]["kernel"]
    expected = k + sj.functional.delta(params, adapter, "params.up.kernel", 0.5)
    np.testing.assert_allclose(patched["params"]["up"]["kernel"], expected, rtol=1e-6, atol=1e-6)
    merged, backup = sj.functional.merge(params, adapter)
    restored = sj.functional.unmerge(merged, adapter, backup)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_linen_training_through_model_apply():
    model, params, adapter = setup()
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jnp.sin(x[:, :8])
    tx = optax.adam(1e-2)
    values = adapter.values
    opt_state = tx.init(values)

    @jax.jit
    def step(values, opt_state):
        def loss_fn(values):
            patched = sj.functional.apply(params, values, adapter.indices)
            return jnp.mean((model.apply(patched, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(values)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(values, updates), opt_state, loss

    losses = []
    for _ in range(50):
        values, opt_state, loss = step(values, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_bad_targets_and_paths():
    _, params, adapter = setup()
    import pytest

    with pytest.raises(ValueError, match="nothing|matched no kernel"):
        sj.functional.init(params, sj.ShiraConfig(r=1, target_modules=["nope"]))
    with pytest.raises(KeyError, match="params.missing.kernel"):
        sj.functional.apply(
            params,
            {"params.missing.kernel": jnp.zeros(3)},
            {"params.missing.kernel": jnp.zeros((2, 3), jnp.int32)},
        )
