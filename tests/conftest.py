"""Shared fixtures: the MLP of PEFT's own SHiRA tests, in Flax NNX."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

# `--doctest-modules` (pyproject.toml) imports every module under tests/; the worker is a script
# that reads its device count from argv before jax starts, so it is never imported here.
collect_ignore = ["sharding_worker.py"]


class MLP(nnx.Module):
    """lin0 10->20, lin1 20->40, lin2 40->30, lin3 30->10, as in PEFT's tests/test_shira.py."""

    def __init__(self, *, bias: bool = True, seed: int = 0, param_dtype=jnp.float32, dtype=None):
        rngs = nnx.Rngs(seed)
        kw = dict(use_bias=bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.lin0 = nnx.Linear(10, 20, **kw)
        self.lin1 = nnx.Linear(20, 40, **kw)
        self.lin2 = nnx.Linear(40, 30, **kw)
        self.lin3 = nnx.Linear(30, 10, **kw)

    def __call__(self, x):
        x = nnx.relu(self.lin0(x))
        x = nnx.relu(self.lin1(x))
        x = nnx.relu(self.lin2(x))
        return nnx.log_softmax(self.lin3(x), axis=-1)


@pytest.fixture
def mlp() -> MLP:
    return MLP()


@pytest.fixture
def x() -> jnp.ndarray:
    import jax

    return jax.random.normal(jax.random.key(1), (5, 10))


def snapshot(model):
    """Everything about a model that a refused load or merge must leave as it was."""
    import numpy as np

    import shira_jax as sj

    flat = nnx.to_flat_state(nnx.state(model))
    return (
        nnx.graphdef(model),
        {k: np.asarray(v[...]).copy() for k, v in flat},
        sj.adapter_names(model),
        dict(sj.adapter_configs(model)),
    )


def assert_unchanged(model, snap):
    import numpy as np

    import shira_jax as sj

    graph, arrays, names, configs = snap
    assert nnx.graphdef(model) == graph
    now = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert now.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(now[k], arrays[k], err_msg=str(k))
    assert sj.adapter_names(model) == names
    assert sj.adapter_configs(model) == configs
