"""QSHiRA: SHiRA on a qwix-quantized base (weight-only PTQ: int8, int4, nf4).

The forward is qwix's quantized matmul plus the sparse product; the quantized weights never
change. Tolerance of the reference check: qwix's weight-only matmul computes
`x @ dequantize(W)` (FACTS 9), so the quantized model with the adapter equals the float model
whose kernels are `dequantize(W) + delta` up to fp32 summation order (atol 1e-5 for |y| ~ 10).
The quantization error itself (dequantize(W) - W) is not part of the comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

import shira_jax as sj
from shira_jax import state


class Net(nnx.Module):
    def __init__(self, seed: int = 0):
        self.up = nnx.Linear(16, 32, rngs=nnx.Rngs(seed))
        self.down = nnx.Linear(32, 16, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


X = jax.random.normal(jax.random.key(0), (4, 16))
QTYPES = {"int8": {}, "int4": {}, "nf4": {"tile_size": 16}}


def quantized(qtype: str):
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, **QTYPES[qtype])]
    return qwix.quantize_model(Net(), qwix.PtqProvider(rules), X)


def cfg(**kw) -> sj.ShiraConfig:
    kw.setdefault("init_weights", False)
    return sj.ShiraConfig(r=2, target_modules=["up", "down"], random_seed=3, **kw)


def frozen_state(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Not(sj.ShiraParam)))]


def dequantized_reference(model) -> jax.Array:
    ref = Net()
    for name in ("up", "down"):
        layer = getattr(model, name)
        kernel = qwix.dequantize(layer.base_layer.kernel.array)
        getattr(ref, name).kernel[...] = kernel + layer.get_delta_weight("default")
    return ref(X)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_quantized_base_plus_sparse_delta(qtype):
    model = quantized(qtype)
    sj.apply_shira(model, cfg())
    assert all(layer.quantized for _, layer in sj.shira_layers(model))
    np.testing.assert_allclose(model(X), dequantized_reference(model), rtol=1e-5, atol=1e-5)
    # training moves only the SHiRA values; the int / nf4 weights and their scales stay put
    before = frozen_state(model)
    values = np.asarray(model.up.shira_weight["default"][...])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, x):
        def loss(m):
            return jnp.mean((m(x) - 1.0) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer, X)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert all(np.array_equal(a, b) for a, b in zip(before, frozen_state(model)))
    assert not np.array_equal(model.up.shira_weight["default"][...], values)


def test_dense_delta_route_equals_the_sparse_product(monkeypatch):
    """A quantized kernel can't be patched; "patched" (the default) and training-sized "auto"
    calls multiply by the dense delta instead of running the sparse product. Both compute the
    same sums of the same products (fp32, in another order): outputs and gradients agree to
    1e-5 relative."""
    x = jax.random.normal(jax.random.key(1), (64, 16))
    results = {}
    for mode in ("patched", "sparse", "auto"):
        model = quantized("int8")
        sj.apply_shira(model, cfg(delta_mode=mode))

        def loss(m):
            return jnp.mean(m(x) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        results[mode] = (model(x), [np.asarray(g) for g in jax.tree.leaves(grads)])
    for mode in ("sparse", "auto"):
        np.testing.assert_allclose(results[mode][0], results["patched"][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(results[mode][1], results["patched"][1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # which route a call takes: count the calls of each product
    calls = []
    from shira_jax import ops

    for name in ("sparse_product", "dense_delta_product"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    model = quantized("int8")
    sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=["up", "down"], delta_mode="auto"))
    model(X[:1])  # one token: tokens * nnz = 48 <= 0.15 * in * out = 76.8 -> sparse product
    assert set(calls) == {"sparse_product"}
    calls.clear()
    model(x)  # 64 tokens -> the dense delta
    assert set(calls) == {"dense_delta_product"}


def test_merge_and_calibrated_masks_are_refused_on_quantized_kernels():
    model = quantized("int8")
    with pytest.raises(ValueError, match="quantized kernels; mask_type='weight_magnitude'"):
        sj.apply_shira(model, cfg(mask_type="weight_magnitude"))
    assert not sj.shira_layers(model)
    sj.apply_shira(model, cfg())
    before = frozen_state(model)
    with pytest.raises(ValueError, match="quantized .*merging"):
        sj.merge(model)
    assert not any(layer.merged_adapters for _, layer in sj.shira_layers(model))
    assert all(np.array_equal(a, b) for a, b in zip(before, frozen_state(model)))
    with pytest.raises(ValueError, match="quantized"):
        with sj.mixed_adapters(model, sj.adapter_index(model, ["default"] * 4)):
            model(X)


def test_adapter_moves_between_quantized_and_float_models(tmp_path):
    """Trained on the quantized base, saved with orbax, loaded on the float model (and back):
    the same indices and values."""
    model = quantized("int8")
    sj.apply_shira(model, cfg())
    sj.save_adapter(model, tmp_path / "q")
    float_model = Net()
    sj.load_adapter(float_model, tmp_path / "q")
    again = quantized("int8")
    sj.load_adapter(again, tmp_path / "q")
    for a, b in [(model, float_model), (model, again)]:
        sa, sb = state.extract(a, "default"), state.extract(b, "default")
        for path in sa.layers:
            np.testing.assert_array_equal(sa.layers[path].indices, sb.layers[path].indices)
            np.testing.assert_array_equal(sa.layers[path].values, sb.layers[path].values)
    np.testing.assert_array_equal(again(X), model(X))
