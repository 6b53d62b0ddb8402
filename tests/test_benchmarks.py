"""The benchmark suite runs (tiny sizes, one round, no timing assertions), and the fast paths it
measures are exact: the recomputing train-step VJP and donated merged-mode switching."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP
from flax import nnx

import shira_jax as sj
from shira_jax import ops


def cfg(seed: int, **kw) -> sj.ShiraConfig:
    kw.setdefault("target_modules", ["lin1", "lin2"])
    return sj.ShiraConfig(r=2, random_seed=seed, init_weights=False, **kw)


def kernels(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam)))
    return {".".join(map(str, k)): np.array(v[...]) for k, v in nnx.to_flat_state(state)}


# --------------------------------------------------------------------------- the suite runs


@pytest.mark.slow
def test_make_bench_quick_writes_every_section(tmp_path):
    from benchmarks import run

    # sparse_modes runs in tests/test_benchmarks_sparse.py (its own file: both halves of the
    # quick suite then run on the two xdist workers side by side)
    out = tmp_path / "BENCHMARKS.md"
    only = "train_step,switching,mask_generation,bridge_load"
    assert run.main(["--quick", "--only", only, "--out", str(out)]) == 0
    text = out.read_text()
    for title in ("1-2. Train step", "3. Switching", "4. Mask generation", "5. Bridge",
                  "## Goals", "GPU: none was lent", "Machine:"):
        assert title in text, title
    assert "same positions as PEFT: yes" in text
    assert "updated in place (donated): yes" in text
    for line in text.splitlines():
        if line.startswith("| ") and "x** |" in line:
            ratio = float(line.split("**")[1].rstrip("x"))
            assert math.isfinite(ratio) and ratio > 0, line


def test_run_rejects_unknown_benchmark():
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.main(["--quick", "--only", "nope"])


# --------------------------------------------------------------------------- train-step VJP


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recomputing_backward_is_bit_identical_to_plain_autodiff(dtype):
    x = jax.random.normal(jax.random.key(1), (3, 5, 10), dtype)
    grads = {}
    for recompute in (True, False):
        model = MLP(param_dtype=dtype)
        sj.apply_shira(model, cfg(0), "a")
        sj.apply_shira(model, cfg(1), "b")
        sj.set_adapter(model, ["a", "b"])
        sj.set_scale(model, "b", 0.5)
        for _, layer in sj.shira_layers(model):
            layer.recompute_in_backward = recompute

        def loss(m, x):
            return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))

        # every Param: SHiRA values and base kernels / biases, and the input
        g = nnx.jit(nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1)))(model, x)
        for name in ("a", "b"):  # the values do get gradients (16-bit kernels included)
            assert float(jnp.abs(g[0]["lin1"]["shira_weight"][name][...]).sum()) > 0
        grads[recompute] = [np.asarray(a, np.float32) for a in jax.tree.leaves(g)]
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_array_equal(a, b)


def test_recomputing_backward_keeps_no_patched_kernel():
    from benchmarks.common import LinearStack  # the stack of benchmarks/train_step.py

    x = jnp.ones((8, 256))

    def temp(recompute: bool) -> int:
        model = LinearStack(256)
        sj.apply_shira(model, sj.ShiraConfig(r=8, target_modules=r"layers\.\d+", random_seed=0))
        for _, layer in sj.shira_layers(model):
            layer.recompute_in_backward = recompute
        graphdef, state = nnx.split(model)

        def f(state):
            m = nnx.merge(graphdef, state)
            grad = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, sj.ShiraParam))
            return grad(m)

        return jax.jit(f).lower(state).compile().memory_analysis().temp_size_in_bytes

    kernel = 256 * 256 * 4
    assert temp(True) <= temp(False) - 2 * kernel  # at least two of four copies gone


def test_extra_call_arguments_reach_the_base_layer():
    class Scaled(nnx.Linear):
        def __call__(self, x, factor=1.0, *, shift=None):
            y = super().__call__(x) * factor
            return y if shift is None else y + shift

    layer = sj.ShiraDense(Scaled(4, 3, rngs=nnx.Rngs(0)))
    layer.add_adapter("a", sj.masks.random_mask(4, 3, r=1, seed=0), r=1, init_weights=False)
    layer.set_adapter("a")
    x, shift = jnp.ones((2, 4)), jnp.arange(3.0)
    kernel = layer.effective_kernel()
    expected = (x @ kernel + layer.base_layer.bias[...]) * 2.0 + shift
    np.testing.assert_allclose(layer(x, 2.0, shift=shift), expected, rtol=1e-6)
    g = jax.grad(lambda s: jnp.sum(layer(x, 2.0, shift=s)))(shift)
    np.testing.assert_allclose(g, jnp.full(3, 2.0))


# --------------------------------------------------------------------------- switching


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_switch_adapter_matches_merge_and_unmerges_bit_exactly(dtype, x):
    model = MLP(param_dtype=dtype)
    for i, name in enumerate(["a", "b"]):
        sj.apply_shira(model, cfg(i), name)
    before = kernels(model)
    sj.merge(model, ["a"])
    sj.switch_adapter(model, "a", "b")
    assert model.lin1.merged_adapters == ("b",) and sj.active_adapters(model) == ("b",)
    assert isinstance(model.lin1.shira_weight["b"], sj.ShiraParam)
    switched = kernels(model)
    sj.unmerge(model)
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v.view(np.uint8), before[k].view(np.uint8), err_msg=k)
    sj.merge(model, ["b"])
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v.view(np.uint8), switched[k].view(np.uint8), err_msg=k)
    for _ in range(50):  # many switches, then back to the base bit for bit
        sj.switch_adapter(model, "b", "a")
        sj.switch_adapter(model, "a", "b")
    sj.switch_adapter(model, "b", None)
    assert not model.lin1.merged
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v.view(np.uint8), before[k].view(np.uint8), err_msg=k)


def test_switch_under_later_merges_and_overlaps_stays_exact():
    model = MLP()
    sj.apply_shira(model, cfg(4), "a")
    sj.apply_shira(model, cfg(4), "b")  # same positions as a
    sj.apply_shira(model, cfg(5), "c")
    before = kernels(model)
    sj.merge(model, ["a"])
    sj.merge(model, ["c"])
    sj.switch_adapter(model, "a", "b")  # a is not the last merged
    assert model.lin1.merged_adapters == ("b", "c")
    reference = MLP()
    for seed, name in [(4, "a"), (4, "b"), (5, "c")]:
        sj.apply_shira(reference, cfg(seed), name)
    sj.merge(reference, ["b"])
    sj.merge(reference, ["c"])
    for k, v in kernels(model).items():
        np.testing.assert_allclose(v, kernels(reference)[k], rtol=1e-6, atol=1e-7)
    sj.unmerge(model)
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_switch_safe_merge_refuses_and_leaves_model():
    model = MLP()
    sj.apply_shira(model, cfg(0), "a")
    sj.apply_shira(model, cfg(1), "b")
    sj.merge(model, ["a"])
    weights = model.lin2.shira_weight["b"]
    weights[...] = weights[...].at[0].set(jnp.nan)
    before = kernels(model)
    with pytest.raises(ValueError, match="non-finite"):
        sj.switch_adapter(model, "a", "b", safe_merge=True)
    assert model.lin1.merged_adapters == ("a",) and sj.active_adapters(model) == ("a",)
    for k, v in kernels(model).items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(KeyError, match="nope"):
        sj.switch_adapter(model, "a", "nope")


def test_switch_donates_only_unshared_kernels():
    model = MLP()
    sj.apply_shira(model, cfg(0), "a")
    sj.apply_shira(model, cfg(1), "b")
    sj.merge(model, ["a"])
    held = model.lin1.base_layer.kernel[...]  # a user's reference: must stay readable
    copy = np.array(held)
    pointer = model.lin2.base_layer.kernel.get_value().unsafe_buffer_pointer()
    sj.switch_adapter(model, "a", "b")
    np.testing.assert_array_equal(np.asarray(held), copy)
    assert model.lin2.base_layer.kernel.get_value().unsafe_buffer_pointer() == pointer


def test_layer_switch_and_ops_writes():
    layer = sj.ShiraDense(nnx.Linear(6, 5, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    for i, name in enumerate(["a", "b"]):
        layer.add_adapter(name, sj.masks.random_mask(6, 5, r=1, seed=i), r=1, init_weights=False,
                          key=jax.random.key(i))
    base = np.array(layer.base_layer.kernel[...])
    layer.switch(None, "a")
    assert layer.merged_adapters == ("a",)
    layer.switch("a", "b")
    layer.unmerge()
    np.testing.assert_array_equal(np.asarray(layer.base_layer.kernel[...]).view(np.uint16),
                                  base.view(np.uint16))
    kernel = jnp.asarray(base)
    idx = layer.shira_indices["b"][...]
    entries = jnp.arange(idx.shape[1], dtype=jnp.float32).astype(jnp.bfloat16)
    expected = kernel.at[idx[0], idx[1]].set(entries)
    np.testing.assert_array_equal(ops.write_entries(kernel, idx, entries), expected)
    np.testing.assert_array_equal(ops.gather_entries(expected, idx), entries)
