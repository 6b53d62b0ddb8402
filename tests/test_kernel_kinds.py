"""SHiRA on every kernel kind: nnx.LinearGeneral, nnx.Einsum, Tunix-style einsum modules and
kinds taught by `sj.register_kernel`; refusals for what cannot be adapted (quantized kernels,
batch axes, non-linear targets); `ShiraParam` as an `nnx.LoRAParam` for LoRA-only trainers;
`delta_mode="sparse"` on each (tests/test_delta_modes.py compares it with the patched path).

Tolerances: the patched forward adds `scale * values` to the kernel entries in fp32 exactly as
the reference adds the dense delta, so outputs agree to fp32 rounding of the einsum's
accumulation order (rtol 1e-6, atol 1e-6 for |y| ~ 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shira_jax as sj
from shira_jax import kernels

TOL = {"rtol": 1e-6, "atol": 1e-6}
D, N, H, K = 8, 3, 4, 2


class TunixEinsum(nnx.Module):
    """Tunix's einsum module, in miniature: a weight `w` and an `einsum_str`."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.3)

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class Attention(nnx.Module):
    """Every layout a model brings: Tunix q/o, Gemma's q (N, D, H) and fused kv (2, K, D, H),
    nnx.Einsum, nnx.LinearGeneral over two input axes, and a plain nnx.Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = TunixEinsum("BTD,DNH->BTNH", (D, N, H), rngs)
        self.q_einsum = TunixEinsum("BTD,NDH->BTNH", (N, D, H), rngs)
        self.kv_einsum = TunixEinsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs)
        self.o_proj = TunixEinsum("BTNH,NHD->BTD", (N, H, D), rngs)
        self.mix = nnx.Einsum("btd,dnh->btnh", (D, N, H), (N, H), rngs=rngs)
        self.out = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=rngs)
        self.gate = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        q = self.q_proj(x) + self.q_einsum(x) + self.mix(x)
        kv = self.kv_einsum(x)
        kv = kv.mean(axis=3, keepdims=True)  # (2, B, T, 1, H): one head, broadcast over N
        y = self.o_proj(q * kv[0] + kv[1]) + self.out(q)
        return self.gate(jnp.tanh(y))


TARGETS = ["q_proj", "q_einsum", "kv_einsum", "o_proj", "mix", "out", "gate"]


def make(seed: int = 0) -> Attention:
    return Attention(nnx.Rngs(seed))


def x_in() -> jax.Array:
    return jax.random.normal(jax.random.key(5), (2, 5, D))


def cfg(seed: int = 3, **kw) -> sj.ShiraConfig:
    kw.setdefault("init_weights", False)
    return sj.ShiraConfig(r=1, target_modules=TARGETS, random_seed=seed, **kw)


def base_weights(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def native_delta(layer: sj.ShiraDense, name: str) -> np.ndarray:
    """The dense `[in, out]` delta put back into the kernel's own N-D layout (the reference)."""
    delta = np.asarray(layer.get_delta_weight(name))
    layout = layer.kernel_layout
    if layout is None:
        return delta
    shape = [layout.shape[a] for a in (*layout.in_axes, *layout.out_axes)]
    order = np.argsort([*layout.in_axes, *layout.out_axes])
    return delta.reshape(shape).transpose(order)


def reference(model, name: str = "default") -> jax.Array:
    """The base model with every kernel replaced by kernel + dense delta."""
    plain = make()
    for path, layer in sj.shira_layers(model):
        variable = getattr(getattr(plain, path), layer.weight_attr)
        variable[...] = layer.kernel_variable[...] + native_delta(layer, name)
    return plain(x_in())


# ----------------------------------------------------------------------------- views


def test_views_see_each_kernel_as_in_out_matrix():
    model = make()
    shapes = {t: kernels.kernel_view(getattr(model, t)).shape for t in TARGETS}
    assert shapes == {
        "q_proj": (D, N * H), "q_einsum": (D, N * H), "kv_einsum": (D, 2 * K * H),
        "o_proj": (N * H, D), "mix": (D, N * H), "out": (N * H, D), "gate": (D, D),
    }
    # HF's q_proj.weight [N*H, D] is Tunix's (D, N, H): matrix entry (d, n*H + h) is w[d, n, h]
    view = kernels.kernel_view(model.q_proj)
    np.testing.assert_array_equal(view.array(), np.asarray(model.q_proj.w[...]).reshape(D, N * H))


def test_einsum_axes_and_bad_einsums():
    assert kernels.einsum_axes("...TM,MD->...TD", 2) == ((0,), (1,), (), ())
    assert kernels.einsum_axes("BTNH,NHD->BTD", 3) == ((0, 1), (2,), (), ())
    with pytest.raises(ValueError, match="exactly 'input,weight->output'"):
        kernels.einsum_axes("BTD,DF,FG->BTG", 2)


def test_forward_equals_kernel_plus_dense_delta():
    model = make()
    sj.apply_shira(model, cfg())
    assert {p for p, _ in sj.shira_layers(model)} == set(TARGETS)
    np.testing.assert_allclose(model(x_in()), reference(model), **TOL)
    # and under jit, with the weights as traced data
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x_in()), reference(model), **TOL)


def test_values_gradient_is_kernel_gradient_at_the_indices():
    model = make()
    sj.apply_shira(model, cfg())
    x = x_in()

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
    kgrads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam))))(
        model
    )
    for path, layer in sj.shira_layers(model):
        got = np.asarray(getattr(grads, path).shira_weight["default"][...])
        kgrad = getattr(getattr(kgrads, path).base_layer, layer.weight_attr)[...]
        view = kernels.kernel_view(layer.base_layer)
        matrix = np.asarray(kgrad if view.layout is None else view.layout.to_matrix(kgrad))
        idx = np.asarray(layer.shira_indices["default"][...])
        np.testing.assert_allclose(got, matrix[idx[0], idx[1]], rtol=1e-5, atol=1e-6)


def test_sparse_delta_mode_on_every_kind_matches_the_reference_under_jit():
    """delta_mode="sparse" on every layout above (N-D and einsum kernels move the input to
    `[*tokens, in]` and the product back): the same delta, summed in another order than the
    reference's one einsum (rtol/atol 1e-5, the tolerance of tests/test_delta_modes.py)."""
    model = make()
    sj.apply_shira(model, cfg(delta_mode="sparse"))
    assert {layer.resolved_mode("default", 10) for _, layer in sj.shira_layers(model)} == {
        "sparse"
    }
    got = nnx.jit(lambda m, x: m(x))(model, x_in())
    np.testing.assert_allclose(got, reference(model), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_switch_are_bit_exact():
    model = make()
    sj.apply_shira(model, cfg())
    sj.apply_shira(model, cfg(seed=9), adapter_name="b")
    base = base_weights(model)
    y = model(x_in())
    sj.merge(model)
    np.testing.assert_allclose(model(x_in()), y, **TOL)
    sj.switch_adapter(model, "default", "b")
    sj.set_adapter(model, "b")
    assert all(layer.merged_adapters == ("b",) for _, layer in sj.shira_layers(model))
    sj.unmerge(model)
    np.testing.assert_allclose(model(x_in()), reference(model, "b"), **TOL)
    after = base_weights(model)
    assert all(np.array_equal(after[k], base[k]) for k in base)
    sj.merge_and_unload(model)
    assert not sj.shira_layers(model)


def test_orbax_save_load_round_trip(tmp_path):
    model = make()
    sj.apply_shira(model, cfg())
    sj.save_adapter(model, tmp_path / "ckpt")
    fresh = make()
    sj.load_adapter(fresh, tmp_path / "ckpt")
    np.testing.assert_array_equal(fresh(x_in()), model(x_in()))


def test_weight_magnitude_and_gradient_masks_read_the_matrix():
    model = make()
    sj.apply_shira(model, cfg(mask_type="weight_magnitude"))
    layer = model.kv_einsum
    matrix = np.abs(np.asarray(kernels.kernel_view(layer.base_layer).array()))
    idx = np.asarray(layer.shira_indices["default"][...])
    picked = matrix[idx[0], idx[1]]
    assert picked.min() >= np.sort(matrix.ravel())[-idx.shape[1]]  # the largest entries

    model = make()
    x = x_in()
    sj.apply_shira(
        model, cfg(mask_type="gradient"), loss_fn=lambda m, b: jnp.sum(m(b) ** 2),
        calibration_data=[x],
    )
    assert model.o_proj.shira_indices["default"].shape == (2, N * H + D)


def test_lora_only_trainer_trains_exactly_the_shira_values():
    assert issubclass(sj.ShiraParam, nnx.LoRAParam)
    model = make()
    sj.apply_shira(model, cfg())
    before = base_weights(model)
    values = {p: np.asarray(m.shira_weight["default"][...]) for p, m in sj.shira_layers(model)}
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.sum(m(x_in()) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model
    )
    opt.update(model, grads)
    after = base_weights(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    for path, layer in sj.shira_layers(model):
        assert not np.array_equal(layer.shira_weight["default"][...], values[path]), path


def test_indices_come_back_from_the_seed_after_a_lora_only_restore():
    """A trainer that checkpoints only LoRAParam: re-apply the same config, restore values."""
    model = make()
    sj.apply_shira(model, cfg())
    saved = nnx.state(model, nnx.LoRAParam)
    fresh = make()
    sj.apply_shira(fresh, cfg())
    nnx.update(fresh, saved)
    np.testing.assert_array_equal(fresh(x_in()), model(x_in()))


# ----------------------------------------------------------------------------- registration


class Packed(nnx.Module):
    """A third-party module: weight `(out, in)` under another name, its own call."""

    def __init__(self, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (6, D)))

    def __call__(self, x):
        return x @ self.weight[...].T


class WithPacked(nnx.Module):
    def __init__(self):
        self.proj = Packed(nnx.Rngs(1))

    def __call__(self, x):
        return self.proj(x)


def test_register_kernel_teaches_a_new_kind():
    with pytest.raises(TypeError, match="Packed"):
        sj.apply_shira(WithPacked(), sj.ShiraConfig(r=1, target_modules=["proj"]))
    sj.register_kernel(Packed, weight="weight", in_axes=(1,), out_axes=(0,))
    model = WithPacked()
    sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=["proj"], init_weights=False))
    layer = model.proj
    x = x_in()[0]
    delta = np.asarray(layer.get_delta_weight("default"))  # [in, out]
    expected = x @ (np.asarray(layer.kernel_variable[...]).T + delta)
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_axes and out_axes"):
        sj.register_kernel(Packed, weight="weight")


# ----------------------------------------------------------------------------- refusals


class Batched(nnx.Module):
    def __init__(self):
        self.experts = TunixEinsum("ETD,EDF->ETF", (2, D, 4), nnx.Rngs(0))
        self.norm = nnx.RMSNorm(D, rngs=nnx.Rngs(0))


def test_targets_that_cannot_be_adapted_are_type_errors_and_change_nothing():
    model = Batched()
    before = nnx.state(model)
    with pytest.raises(TypeError, match=r"experts .*batch axes"):
        sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=["experts"]))
    with pytest.raises(TypeError, match=r"norm \(RMSNorm\)"):
        sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=".*"))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert not sj.shira_layers(model)


def test_quantized_n_d_kernel_is_refused_before_anything_changes():
    """qwix-quantized nnx.Linear kernels are adapted (tests/test_qshira.py); quantized N-D
    kernels are not (the sparse product needs an [in, out] input), and nothing changes."""
    import qwix  # the `tunix` extra brings it; `make test` installs it

    class Net(nnx.Module):
        def __init__(self):
            self.up = nnx.Linear(D, 16, rngs=nnx.Rngs(0))
            self.q = nnx.Einsum("btd,dnh->btnh", (16, N, H), rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.q(self.up(x))

    rules = [qwix.QuantizationRule(module_path="q", weight_qtype=jnp.int8)]
    model = qwix.quantize_model(Net(), qwix.PtqProvider(rules), jnp.ones((1, 2, D)))
    with pytest.raises(TypeError, match=r"q is a Einsum .*quantized"):
        sj.apply_shira(model, sj.ShiraConfig(r=1, target_modules=["up", "q"]))
    assert not sj.shira_layers(model)
    assert not isinstance(model.up, sj.ShiraDense)
