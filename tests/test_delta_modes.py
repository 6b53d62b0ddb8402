"""`delta_mode`: the sparse product (`base(x) + x @ S` from the nnz entries) equals the patched
matmul (`x @ (W + S)`) in outputs and gradients, for plain and scan-stacked layers and N-D
kernels (nnx.LinearGeneral, nnx.Einsum, Tunix-style einsum modules).

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
from test_kernel_kinds import TunixEinsum

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


# ----------------------------------------------------------------------------- N-D kernels
# The sparse product on an N-D kernel moves the input to [*tokens, in] (contracted axes last,
# in kernel order), multiplies, and moves [*tokens, out] back to the module's output layout.
# Against the patched path it sums the same products in a different order, so the comparison
# is the same as above: fp32, atol = 1e-5 * the largest magnitude (`close`).

B, T, D, N, H, K = 2, 3, 8, 3, 4, 2

N_D_KINDS = {
    # name: (layer builder, input shape)
    "linear_general": (  # two input axes (given out of order: Flax sorts them), two out
        lambda r: nnx.LinearGeneral((N, H), (K, D), axis=(-1, -2), rngs=r), (B, T, N, H)
    ),
    "linear_general_split_axes": (  # contracts axes 1 and -1 of [B, N, T, H]
        lambda r: nnx.LinearGeneral((N, H), (K, D), axis=(1, -1), rngs=r), (B, N, T, H)
    ),
    "linear_general_front_axis": (  # contracts axis 1 of [B, D, T]: output [B, T, N, H]
        lambda r: nnx.LinearGeneral(D, (N, H), axis=1, rngs=r), (B, D, T)
    ),
    "nnx_einsum_ellipsis_bias": (
        lambda r: nnx.Einsum("...d,dnh->...nh", (D, N, H), (N, H), rngs=r), (B, T, D)
    ),
    "tunix_q": (lambda r: TunixEinsum("BTD,DNH->BTNH", (D, N, H), r), (B, T, D)),
    "tunix_o": (lambda r: TunixEinsum("BTNH,NHD->BTD", (N, H, D), r), (B, T, N, H)),
    "gemma_q": (lambda r: TunixEinsum("BTD,NDH->BTNH", (N, D, H), r), (B, T, D)),
    "gemma_kv": (lambda r: TunixEinsum("BSD,CKDH->CBSKH", (2, K, D, H), r), (B, T, D)),
    "output_transposed": (lambda r: TunixEinsum("BTD,DN->NTB", (D, N), r), (B, T, D)),
}


class One(nnx.Module):
    """One N-D layer, `proj`, as a model."""

    def __init__(self, build):
        self.proj = build(nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


def one_cfg(mode: str, seed: int = 1) -> sj.ShiraConfig:
    return sj.ShiraConfig(
        r=2, target_modules=["proj"], random_seed=seed, init_weights=False, delta_mode=mode
    )


@pytest.mark.parametrize("kind", list(N_D_KINDS))
def test_sparse_equals_patched_on_n_d_kernels(kind):
    build, shape = N_D_KINDS[kind]
    x = jax.random.normal(jax.random.key(3), shape)
    results = {}
    for mode in ("patched", "sparse"):
        model = One(build)
        sj.apply_shira(model, one_cfg(mode))
        assert model.proj.kernel_layout is not None or kind == "output_transposed"
        sj.set_scale(model, "default", 0.7)
        assert model.proj.resolved_mode("default", 10) == mode
        results[mode] = loss_and_grads(model, x)
    (y_p, g_p, gx_p), (y_s, g_s, gx_s) = results["patched"], results["sparse"]
    assert y_s.shape == y_p.shape
    close(y_s, y_p)
    close(gx_s, gx_p)
    assert g_s.keys() == g_p.keys() and g_p
    for k in g_p:
        close(g_s[k], g_p[k])


def test_sparse_on_n_d_kernel_under_jit_with_a_patched_adapter():
    build, shape = N_D_KINDS["gemma_kv"]
    x = jax.random.normal(jax.random.key(4), shape)
    model, ref = One(build), One(build)
    for m, second in ((model, "sparse"), (ref, "patched")):
        sj.apply_shira(m, one_cfg("patched", 1), adapter_name="a")
        sj.apply_shira(m, one_cfg(second, 2), adapter_name="b")
        sj.set_adapter(m, ["a", "b"])
    got = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(got, ref(x), **TOL)


def test_auto_decides_on_n_d_kernels_by_their_matrix(monkeypatch):
    def build(r):  # out [C, B, S, K, H]: the tokens are B * S
        return TunixEinsum("BSD,CKDH->CBSKH", (2, 2, 64, 16), r)

    model, ref = One(build), One(build)
    sj.apply_shira(model, one_cfg("auto").replace(r=1))
    sj.apply_shira(ref, one_cfg("patched").replace(r=1))
    layer = model.proj
    nnz = int(layer.shira_indices["default"].shape[-1])
    assert (layer.in_features, layer.out_features) == (64, 64)
    for tokens in (1, 4, 5, 64):
        want = "sparse" if ops.prefer_sparse(tokens, nnz, 64, 64) else "patched"
        assert layer.resolved_mode("default", tokens) == want
    assert layer.resolved_mode("default", 1) == "sparse"
    assert layer.resolved_mode("default", 64) == "patched"
    calls = []
    product = ops.sparse_product

    def counted(x, *args):
        calls.append(x.shape)
        return product(x, *args)

    monkeypatch.setattr(ops, "sparse_product", counted)
    for shape, rows in (((1, 2, 64), [(1, 2, 64)]), ((4, 16, 64), [])):  # 2 and 64 tokens
        calls.clear()
        x = jax.random.normal(jax.random.key(5), shape)
        np.testing.assert_allclose(model(x), ref(x), **TOL)
        assert calls == rows


class Proj(nnx.Module):
    """A third-party kind: `w` (D, N, H), its own einsum call."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, N, H)))

    def __call__(self, x):
        return jnp.einsum("btd,dnh->btnh", x, self.w[...])


class Refused(nnx.Module):
    def __init__(self):
        self.up = nnx.Linear(D, D, rngs=nnx.Rngs(1))
        self.proj = Proj(nnx.Rngs(0))  # registered by axes: how x meets w is unknown
        self.diag = TunixEinsum("BDD,DN->BN", (D, N), nnx.Rngs(2))  # a diagonal of the input


def test_sparse_refused_only_where_the_input_route_is_unknown_before_any_change():
    sj.register_kernel(Proj, weight="w", in_axes=(0,), out_axes=(1, 2))
    for target, match in (
        ("proj", r"\['proj'\] \(proj: .*register it with einsum="),
        ("diag", r"\['diag'\] \(diag: einsum 'BDD,DN->BN': .*names each axis once"),
    ):
        model = Refused()
        config = sj.ShiraConfig(r=1, target_modules=["up", target], delta_mode="sparse")
        with pytest.raises(ValueError, match=match):
            sj.apply_shira(model, config)
        assert not sj.shira_layers(model)
        sj.apply_shira(model, config.replace(delta_mode="auto"))
        assert getattr(model, target).resolved_mode("default", 1) == "patched"  # auto
        layer = getattr(model, target)
        with pytest.raises(ValueError, match=f"Layer {target}: delta_mode='sparse' cannot run"):
            layer.add_adapter("s", layer.shira_indices["default"][...], r=1, delta_mode="sparse")
        assert layer.adapter_names == ("default",)
