"""Mixed-adapter batches: a different adapter (or none) per example in one forward.

The reference runs each example alone with its adapter active (or under `disable_adapter`).
Tolerance: both scatter `scale * values` into the kernel with the same single fp32 rounding,
so the kernels are identical; only the batched matmul's accumulation order may differ from the
one-example call (fp32, sums over <= 96 products of |x w| <~ 1: rtol 1e-5, atol 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ScanResidual, tiny_jax_llama
from flax import nnx

import shira_jax as sj
from shira_jax import stacked

TOL = {"rtol": 1e-5, "atol": 1e-5}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cfg(seed: int, targets=("q_proj", "v_proj"), **kw) -> sj.ShiraConfig:
    return sj.ShiraConfig(
        r=2, target_modules=list(targets), random_seed=seed, init_weights=False, **kw
    )


@pytest.fixture(scope="module")
def llama():
    """Tiny Llama with three adapters: a (q, v), b (all seven, scaled 0.5), c (q, v, struct
    mask); b adapts layers a lacks, and its nnz differs from a's on the MLP."""
    model = tiny_jax_llama(0)
    sj.apply_shira(model, cfg(1), adapter_name="a")
    sj.apply_shira(model, cfg(2, ALL), adapter_name="b")
    sj.apply_shira(model, cfg(3, mask_type="struct"), adapter_name="c")
    sj.set_scale(model, "b", 0.5)
    return model


def alone(model, name, ids_row):
    if name is None:
        with sj.disable_adapter(model):
            return model(ids_row)
    sj.set_adapter(model, name)
    return model(ids_row)


def tokens(batch: int = 4, length: int = 7) -> jax.Array:
    return jax.random.randint(jax.random.key(0), (batch, length), 3, 128)


def test_mixed_batch_equals_each_example_alone(llama):
    mix = ["a", "b", None, "c"]
    x = tokens(len(mix))
    ids = sj.adapter_index(llama, mix)
    assert ids.tolist() == [0, 1, -1, 2]
    with sj.mixed_adapters(llama, ids):
        got = np.asarray(llama(x))
    for b, name in enumerate(mix):
        np.testing.assert_allclose(got[b], np.asarray(alone(llama, name, x[b : b + 1]))[0], **TOL)
    # the examples really differ by adapter (a mix is not the base model everywhere)
    assert np.abs(got[0] - got[2]).max() > 1e-3 and np.abs(got[1] - got[2]).max() > 1e-3


def test_one_compilation_serves_every_mix(llama):
    traces = []

    @nnx.jit
    def forward(model, x, ids):
        traces.append(1)
        with sj.mixed_adapters(model, ids):
            return model(x)

    x = tokens(4)
    mixes = [["a", "a", "b", None], [None, "c", "a", "b"]]
    outs = [np.asarray(forward(llama, x, sj.adapter_index(llama, m))) for m in mixes]
    assert len(traces) == 1
    for mix, out in zip(mixes, outs):
        for b, name in enumerate(mix):
            ref = np.asarray(alone(llama, name, x[b : b + 1]))[0]
            np.testing.assert_allclose(out[b], ref, **TOL)


def test_merged_adapters_and_bad_ids_are_refused():
    model = tiny_jax_llama(1)
    sj.apply_shira(model, cfg(1), adapter_name="a")
    with pytest.raises(KeyError, match="nope"):
        sj.adapter_index(model, ["a", "nope"])
    x = tokens(2)
    with sj.mixed_adapters(model, sj.adapter_index(model, ["a", None, None])):
        with pytest.raises(ValueError, match="one id per example"):
            model(x)
    sj.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with sj.mixed_adapters(model, sj.adapter_index(model, ["a", None])):
            model(x)




def test_mixed_batch_through_scan_stacked_layers():
    model = ScanResidual()
    for i, name in enumerate(["a", "b"]):
        stacked.apply_shira_stacked(model, cfg(i, ["up", "down"]), adapter_name=name)
    x = jax.random.normal(jax.random.key(1), (3, 5, 16))
    mix = ["b", None, "a"]
    with sj.mixed_adapters(model, sj.adapter_index(model, mix)):
        got = np.asarray(model(x))
    for b, name in enumerate(mix):
        np.testing.assert_allclose(got[b], np.asarray(alone(model, name, x[b : b + 1]))[0], **TOL)


class Heads(nnx.Module):
    """A Tunix-style einsum projection (D, N, H) and an nnx.LinearGeneral back to D."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.q = nnx.Einsum("btd,dnh->btnh", (16, 2, 4), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), 16, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.o(jnp.tanh(self.q(x)))


def test_mixed_batch_on_n_d_kernels():
    model = Heads()
    for i, name in enumerate(["a", "b"]):
        sj.apply_shira(model, cfg(i, ["q", "o"]), adapter_name=name)
    x = jax.random.normal(jax.random.key(2), (3, 5, 16))
    mix = [None, "a", "b"]
    with sj.mixed_adapters(model, sj.adapter_index(model, mix)):
        got = np.asarray(model(x))
    for b, name in enumerate(mix):
        np.testing.assert_allclose(got[b], np.asarray(alone(model, name, x[b : b + 1]))[0], **TOL)


def test_a_block_around_a_jitted_call_is_data_and_ends_with_the_block(llama):
    """Entered around an `nnx.jit` call, the ids are the layers' state: two mixes share one
    trace, and the trace made inside the block is not reused after it."""
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(1)
        return model(x)

    x = tokens(4)
    mixes = [["a", "b", None, "c"], ["c", None, "b", "a"]]
    outs = []
    for mix in mixes:
        with sj.mixed_adapters(llama, sj.adapter_index(llama, mix)):
            outs.append(np.asarray(forward(llama, x)))
    assert len(traces) == 1
    for mix, out in zip(mixes, outs):
        for b, name in enumerate(mix):
            ref = np.asarray(alone(llama, name, x[b : b + 1]))[0]
            np.testing.assert_allclose(out[b], ref, **TOL)
    sj.set_adapter(llama, "a")
    np.testing.assert_allclose(np.asarray(forward(llama, x)), np.asarray(llama(x)), **TOL)
    assert len(traces) == 2  # outside the block: its own trace, with no mix


def test_only_the_given_model_mixes():
    model, other = tiny_jax_llama(0), tiny_jax_llama(0)
    for m in (model, other):
        sj.apply_shira(m, cfg(1), adapter_name="a")
        sj.apply_shira(m, cfg(2), adapter_name="b")
    x = tokens(3)
    want = np.asarray(other(x))  # "a" active, every row
    with sj.mixed_adapters(model, sj.adapter_index(model, [None, "b", "a"])):
        np.testing.assert_array_equal(np.asarray(other(x)), want)
        np.testing.assert_array_equal(np.asarray(other(x[:2])), want[:2])  # any batch size


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([0, 2], ValueError, r"out of range at \(example, id\) \[\(1, 2\)\]"),
        ([-2, 0], ValueError, "ids run from -1"),
        ([0.0, 1.0], ValueError, "1-D integer"),
        ([[0, 1]], ValueError, "1-D integer"),
        (["a", None], TypeError, "adapter_index"),
    ],
)
def test_bad_ids_are_refused_before_the_call(ids, error, match):
    model = tiny_jax_llama(1)
    sj.apply_shira(model, cfg(1), adapter_name="a")
    sj.apply_shira(model, cfg(2), adapter_name="b")
    with pytest.raises(error, match=match):
        with sj.mixed_adapters(model, ids):
            pass
    layer = sj.shira_layers(model)[0][1]
    assert not hasattr(layer, "mixed_ids")  # nothing left behind
    with sj.mixed_adapters(model, [1, -1]):  # a plain list of ints is fine
        assert layer.mixed_ids[...].tolist() == [1, -1]
    assert not hasattr(layer, "mixed_ids")
