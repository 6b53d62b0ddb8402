"""PEFT <-> shira_jax bridge against real PEFT + torch (no mocks).

Parity means: the same base weights (torch `[out, in]` = Flax kernel transposed), the same
adapter file, and outputs equal in float32 to rtol=1e-5, atol=1e-6 (only matmul summation
order differs between XLA and oneDNN).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import (
    MLP,
    assert_unchanged,
    file_tensors,
    peft_model,
    rel_err,
    snapshot,
    strict_from_pretrained,
    strict_load_adapter,
    tiny_llama_dir,
    torch_logits,
    torch_out,
)
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import shira_jax as sj
from bridge.convert import orbax_to_peft, peft_to_orbax
from bridge.peft import (
    kernel_to_torch_order,
    load_peft_adapter,
    save_peft_adapter,
    torch_to_kernel_order,
)

peft = pytest.importorskip("peft")

RTOL, ATOL = 1e-5, 1e-6
LINEARS = ("lin0", "lin1", "lin2", "lin3")


# --------------------------------------------------------------------------- helpers


class TorchMLP(torch.nn.Module):
    """PEFT's test MLP: lin0 10->20, lin1 20->40, lin2 40->30, lin3 30->10."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 40)
        self.lin2 = torch.nn.Linear(40, 30)
        self.lin3 = torch.nn.Linear(30, 10)

    def forward(self, x):
        x = torch.relu(self.lin0(x))
        x = torch.relu(self.lin1(x))
        x = torch.relu(self.lin2(x))
        return torch.log_softmax(self.lin3(x), dim=-1)


def torch_mlp(seed: int = 0) -> TorchMLP:
    torch.manual_seed(seed)
    return TorchMLP()


def nnx_twin(tmodel: TorchMLP) -> MLP:
    """The NNX MLP with `tmodel`'s base weights (kernel = weight.T)."""
    model = MLP()
    for name in LINEARS:
        src = getattr(tmodel, name)
        if isinstance(src, torch.nn.Module) and hasattr(src, "get_base_layer"):
            src = src.get_base_layer()
        if hasattr(src, "original_module"):
            src = src.original_module
        dst = getattr(model, name)
        dst.kernel[...] = jnp.asarray(src.weight.detach().numpy().T)
        dst.bias[...] = jnp.asarray(src.bias.detach().numpy())
    return model


@pytest.fixture(scope="module")
def xs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)


def j_out(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x)))


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def file_meta(folder) -> dict:
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "np") as fh:
        return fh.metadata()


def magnitude_mask(base_layer, r, **kwargs):
    """A custom PEFT mask: top r*(in+out) |W| entries, shape [out, in], 0/1 in W's dtype."""
    w = base_layer.weight
    k = r * sum(w.shape)
    flat = torch.zeros(w.numel(), dtype=w.dtype)
    flat[torch.topk(w.abs().flatten(), k).indices] = 1.0
    return flat.view_as(w)


def train_jax(model, x: np.ndarray, steps: int = 3) -> None:
    """A few adam steps on the active adapter (and modules_to_save copies)."""
    opt = nnx.Optimizer(model, optax.adam(5e-2), wrt=sj.ShiraParam)
    target = jax.nn.one_hot(jnp.arange(x.shape[0]) % 10, 10)

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return -jnp.mean(jnp.sum(target * m(jnp.asarray(x)), -1))

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
        opt.update(model, grads)

    for _ in range(steps):
        step(model, opt)


# --------------------------------------------------------------------------- index order


def test_index_order_conversions_roundtrip_and_match_torch_layout():
    rng = np.random.default_rng(1)
    n_in, n_out, nnz = 7, 5, 13
    flat = np.sort(rng.choice(n_in * n_out, nnz, replace=False))
    kidx = np.stack(np.divmod(flat, n_out)).astype(np.int32)  # kernel layout, sorted
    vals = rng.standard_normal(nnz).astype(np.float32)
    tidx, tvals = kernel_to_torch_order(kidx, vals, (n_in, n_out))
    assert tidx.dtype == np.int32
    keys = tidx[0].astype(np.int64) * n_in + tidx[1]
    assert np.all(np.diff(keys) > 0)  # PEFT's torch.where order
    dense_k = np.zeros((n_in, n_out), np.float32)
    dense_k[kidx[0], kidx[1]] = vals
    dense_t = np.zeros((n_out, n_in), np.float32)
    dense_t[tidx[0], tidx[1]] = tvals
    np.testing.assert_array_equal(dense_t, dense_k.T)
    back_idx, back_vals = torch_to_kernel_order(tidx, tvals, (n_in, n_out))
    np.testing.assert_array_equal(back_idx, kidx)
    np.testing.assert_array_equal(back_vals, vals)
    # Float indices and duplicates (summed) are accepted; the result is canonical.
    dup_idx = np.concatenate([tidx, tidx[:, :2]], axis=1).astype(np.float32)
    dup_vals = np.concatenate([tvals, [1.0, 2.0]]).astype(np.float32)
    c_idx, c_vals = torch_to_kernel_order(dup_idx, dup_vals, (n_in, n_out))
    expect = dense_k.T.copy()
    expect[tidx[0, 0], tidx[1, 0]] += 1.0
    expect[tidx[0, 1], tidx[1, 1]] += 2.0
    got = np.zeros((n_in, n_out), np.float32)
    got[c_idx[0], c_idx[1]] = c_vals
    np.testing.assert_allclose(got.T, expect, rtol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        torch_to_kernel_order(np.array([[n_out], [0]]), np.ones(1, np.float32), (n_in, n_out))


# --------------------------------------------------------------------------- PEFT -> JAX

CONFIGS = {
    "seeded": dict(r=2, target_modules=["lin1", "lin2"], random_seed=3, init_weights=False),
    "unseeded": dict(r=2, target_modules=["lin1", "lin2"], random_seed=None, init_weights=False),
    "regex": dict(r=1, target_modules=r"lin[0-2]", random_seed=11, init_weights=False),
    "custom_mask": dict(
        r=2, target_modules=["lin0", "lin2"], init_weights=False, mask_fn=magnitude_mask
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_peft_adapter_loads_into_jax_with_equal_outputs(case, tmp_path, xs):
    kw = dict(CONFIGS[case])
    pm = peft_model(torch_mlp(), **kw)
    pm.save_pretrained(str(tmp_path))
    model = nnx_twin(pm)
    load_peft_adapter(model, tmp_path)
    assert_close(j_out(model, xs), torch_out(pm, xs))
    # The adapter changes the output (init_weights=False), so the comparison is meaningful.
    with sj.disable_adapter(model):
        assert not np.allclose(j_out(model, xs), torch_out(pm, xs), atol=1e-3)
    # Indices are PEFT's exactly; for random masks our own replay gives the same ones.
    for path, layer in sj.shira_layers(model):
        torch_layer = getattr(pm.base_model.model, path)
        tidx, _ = kernel_to_torch_order(
            layer.shira_indices["default"][...],
            layer.shira_weight["default"][...],
            tuple(layer.base_layer.kernel.shape),
        )
        np.testing.assert_array_equal(tidx, torch_layer.shira_indices["default"].numpy())
        if case != "custom_mask":
            mine = sj.masks.random_mask(
                layer.in_features, layer.out_features, kw["r"], seed=kw["random_seed"]
            )
            np.testing.assert_array_equal(layer.shira_indices["default"][...], mine)
    config = sj.adapter_configs(model)["default"]
    assert config.r == kw["r"]
    assert config.mask_type == "random"  # PEFT keeps "random" even with a custom mask_fn


def test_two_peft_adapters_in_subfolders(tmp_path, xs):
    pm = peft_model(
        torch_mlp(), r=2, target_modules=["lin1", "lin2"], random_seed=1, init_weights=False
    )
    pm.add_adapter(
        "other",
        peft.ShiraConfig(r=1, target_modules=["lin0", "lin1"], random_seed=2, init_weights=False),
    )
    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model = nnx_twin(pm)
    load_peft_adapter(model, tmp_path, "default")
    load_peft_adapter(model, tmp_path, "other")  # found in the subfolder, like PEFT saved it
    assert sj.active_adapters(model) == ("default",)
    for name in ("default", "other"):
        pm.set_adapter(name)
        sj.set_adapter(model, name)
        assert_close(j_out(model, xs), torch_out(pm, xs))


def test_dtype_option_and_float_indices(tmp_path, xs):
    pm = peft_model(torch_mlp(), r=2, target_modules=["lin1"], random_seed=0, init_weights=False)
    pm.save_pretrained(str(tmp_path))
    tensors = file_tensors(tmp_path)
    key = "base_model.model.lin1.shira_indices"
    tensors[key] = tensors[key].astype(np.float32)  # what PEFT writes on Windows
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = nnx_twin(pm)
    load_peft_adapter(model, tmp_path)
    assert model.lin1.shira_indices["default"][...].dtype == jnp.int32
    assert_close(j_out(model, xs), torch_out(pm, xs))
    other = nnx_twin(pm)
    load_peft_adapter(other, tmp_path, dtype=jnp.bfloat16)
    assert other.lin1.shira_weight["default"][...].dtype == jnp.bfloat16


def test_duplicate_positions_are_summed_like_peft(tmp_path, xs):
    pm = peft_model(torch_mlp(), r=2, target_modules=["lin1"], random_seed=0, init_weights=False)
    pm.save_pretrained(str(tmp_path))
    tensors = file_tensors(tmp_path)
    wk, ik = "base_model.model.lin1.shira_weight", "base_model.model.lin1.shira_indices"
    # PEFT's shira_weight has a fixed size, so keep nnz: entries 0 and 7 land on one position.
    tensors[ik][:, 7] = tensors[ik][:, 0]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, tmp_path)
    nnz = 2 * (20 + 40)
    assert model.lin1.shira_weight["default"].shape == (nnz - 1,)  # canonical: unique positions
    reference = strict_from_pretrained(torch_mlp(), tmp_path)  # PEFT scatter-adds duplicates
    assert_close(j_out(model, xs), torch_out(reference, xs))
    delta = np.asarray(model.lin1.get_delta_weight("default")).T  # torch layout [out, in]
    o, i = tensors[ik][:, 0]
    np.testing.assert_allclose(delta[o, i], tensors[wk][0] + tensors[wk][7], rtol=1e-6)
    # PEFT cannot load nnz != r * (in + out): saving such an adapter is refused, clearly.
    with pytest.raises(ValueError, match=r"r \* \(in \+ out\)"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_stray_keys_of_other_adapters_are_warned_and_ignored(tmp_path, xs):
    pm = peft_model(torch_mlp(), r=2, target_modules=["lin1"], random_seed=0, init_weights=False)
    pm.save_pretrained(str(tmp_path))
    tensors = file_tensors(tmp_path)
    tensors["base_model.model.lin1.shira_indices.old_adapter"] = np.zeros((2, 3), np.int32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = nnx_twin(pm)
    with pytest.warns(UserWarning, match=r"shira_indices\.old_adapter"):
        load_peft_adapter(model, tmp_path)
    assert sj.adapter_names(model) == ("default",)
    assert_close(j_out(model, xs), torch_out(pm, xs))


# --------------------------------------------------------------------------- JAX -> PEFT


def test_jax_adapter_saves_as_peft_file_identical_in_layout(tmp_path, xs):
    kw = dict(r=2, target_modules=["lin1", "lin2"], random_seed=5)
    base = torch_mlp()
    model = nnx_twin(base)
    sj.apply_shira(model, sj.ShiraConfig(**kw))
    train_jax(model, xs)
    assert float(jnp.abs(model.lin1.shira_weight["default"][...]).max()) > 0
    save_peft_adapter(model, tmp_path / "ours")
    peft_model(torch_mlp(), **kw).save_pretrained(str(tmp_path / "theirs"))

    ours, theirs = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)  # FACTS 2: PEFT would silently regenerate indices
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        if key.endswith("shira_indices"):
            np.testing.assert_array_equal(ours[key], theirs[key])  # same seed, same mask
    assert file_meta(tmp_path / "ours") == {"format": "pt"}
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("auto_mapping", "peft_version"):
        our_cfg.pop(field), their_cfg.pop(field)
    their_cfg["target_modules"] = sorted(their_cfg["target_modules"])  # PEFT writes a set's order
    assert our_cfg == their_cfg

    pm = strict_from_pretrained(base, tmp_path / "ours")
    assert_close(torch_out(pm, xs), j_out(model, xs))
    with sj.disable_adapter(model):
        assert not np.allclose(torch_out(pm, xs), j_out(model, xs), atol=1e-4)


def test_two_jax_adapters_round_trip_through_peft(tmp_path, xs):
    base = torch_mlp()
    model = nnx_twin(base)
    sj.apply_shira(
        model, sj.ShiraConfig(r=2, target_modules=["lin1"], random_seed=1, init_weights=False)
    )
    sj.apply_shira(
        model,
        sj.ShiraConfig(r=1, target_modules=r"lin[23]", random_seed=2, init_weights=False),
        "other",
    )
    save_peft_adapter(model, tmp_path)
    save_peft_adapter(model, tmp_path, "other")
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    pm = strict_from_pretrained(base, tmp_path)
    strict_load_adapter(pm, tmp_path / "other", "other")
    back = nnx_twin(torch_mlp())
    load_peft_adapter(back, tmp_path)
    load_peft_adapter(back, tmp_path, "other")
    for name in ("default", "other"):
        pm.set_adapter(name)
        sj.set_adapter(model, name)
        sj.set_adapter(back, name)
        assert_close(torch_out(pm, xs), j_out(model, xs))
        np.testing.assert_array_equal(j_out(back, xs), j_out(model, xs))


@pytest.mark.parametrize("mask_type", ["struct", "weight_magnitude"])
def test_jax_only_masks_load_in_peft_from_the_file_indices(mask_type, tmp_path, xs):
    """PEFT has no such mask_fn: it must take the indices from the file (no warning)."""
    base = torch_mlp()
    model = nnx_twin(base)
    cfg = sj.ShiraConfig(
        r=2, target_modules=["lin1", "lin2"], mask_type=mask_type, init_weights=False
    )
    sj.apply_shira(model, cfg)
    save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["mask_type"] == mask_type
    pm = strict_from_pretrained(base, tmp_path)
    assert_close(torch_out(pm, xs), j_out(model, xs))


# --------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_peft_to_jax_to_peft(tmp_path, xs):
    kw = dict(
        r=2, target_modules=["lin1"], random_seed=4, init_weights=False, modules_to_save=["lin3"]
    )
    pm = peft_model(torch_mlp(), **kw)
    with torch.no_grad():
        copy = pm.base_model.model.lin3.modules_to_save["default"]
        copy.weight.add_(0.3 * torch.randn_like(copy.weight))
        copy.bias.add_(0.3)
    pm.save_pretrained(str(tmp_path / "theirs"))
    keys = sorted(file_tensors(tmp_path / "theirs"))
    assert keys == [  # PEFT's own names: the module path + torch param name, no adapter name
        "base_model.model.lin1.shira_indices",
        "base_model.model.lin1.shira_weight",
        "base_model.model.lin3.bias",
        "base_model.model.lin3.weight",
    ]
    model = nnx_twin(pm)
    original_kernel = np.asarray(model.lin3.kernel[...]).copy()
    load_peft_adapter(model, tmp_path / "theirs")
    assert isinstance(model.lin3, sj.ModulesToSave)
    assert_close(j_out(model, xs), torch_out(pm, xs))
    np.testing.assert_array_equal(model.lin3.original_module.kernel[...], original_kernel)

    train_jax(model, xs)  # trains the SHiRA values and the lin3 copy
    save_peft_adapter(model, tmp_path / "ours")
    ours = file_tensors(tmp_path / "ours")
    assert sorted(ours) == keys
    assert ours["base_model.model.lin3.weight"].shape == (10, 30)
    reloaded = strict_from_pretrained(torch_mlp(), tmp_path / "ours")
    assert_close(torch_out(reloaded, xs), j_out(model, xs))
    # training did move
    assert not np.allclose(torch_out(reloaded, xs), torch_out(pm, xs), atol=1e-4)


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    pm = peft_model(
        torch_mlp(),
        r=2,
        target_modules=["lin1", "lin2"],
        random_seed=3,
        init_weights=False,
        modules_to_save=["lin3"],
    )
    pm.save_pretrained(str(folder))
    return folder


def _edit_tensors(fn):
    def edit(folder: Path) -> None:
        tensors = file_tensors(folder)
        fn(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    return edit


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _rename(t, old, new):
    t[new] = t.pop(old)


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _to_pickle(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.rename(folder / "adapter_model.bin")


W1, I1 = "base_model.model.lin1.shira_weight", "base_model.model.lin1.shira_indices"

BAD = {
    "no_config": (
        lambda f: (f / "adapter_config.json").unlink(),
        FileNotFoundError,
        "adapter_config.json",
    ),
    "lora": (_edit_config(peft_type="LORA"), ValueError, "not 'SHIRA'"),
    "pickle": (_to_pickle, ValueError, "pickle"),
    "no_weights": (
        lambda f: (f / "adapter_model.safetensors").unlink(),
        FileNotFoundError,
        "adapter_model.safetensors",
    ),
    "truncated": (_truncate, ValueError, "safetensors"),
    "junk": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
        ValueError,
        "safetensors",
    ),
    "unknown_module": (
        _edit_tensors(
            lambda t: (
                _rename(t, W1, W1.replace("lin1", "lin9")),
                _rename(t, I1, I1.replace("lin1", "lin9")),
            )
        ),
        KeyError,
        "lin9",
    ),
    "weight_without_indices": (_edit_tensors(lambda t: t.pop(I1)), ValueError, "regenerate"),
    "indices_without_weight": (_edit_tensors(lambda t: t.pop(W1)), ValueError, "lin1"),
    "output_index_out_of_range": (
        _edit_tensors(lambda t: t[I1].__setitem__((0, 0), 40)),
        ValueError,
        "out of range",
    ),
    "input_index_out_of_range": (
        _edit_tensors(lambda t: t[I1].__setitem__((1, -1), 20)),
        ValueError,
        "out of range",
    ),
    "negative_index": (
        _edit_tensors(lambda t: t[I1].__setitem__((1, 3), -1)),
        ValueError,
        "out of range",
    ),
    "length_mismatch": (
        _edit_tensors(lambda t: t.__setitem__(W1, t[W1][:-1])),
        ValueError,
        "same length",
    ),
    "indices_ndim": (
        _edit_tensors(lambda t: t.__setitem__(I1, t[I1].reshape(-1))),
        ValueError,
        r"\[2, nnz\]",
    ),
    "weight_ndim": (
        _edit_tensors(lambda t: t.__setitem__(W1, t[W1].reshape(-1, 1)[:, [0, 0]])),
        ValueError,
        r"\[nnz\]",
    ),
    "fractional_indices": (
        _edit_tensors(lambda t: t.__setitem__(I1, t[I1].astype(np.float32) + 0.5)),
        ValueError,
        "integ",
    ),
    "module_to_save_shape": (
        _edit_tensors(
            lambda t: t.__setitem__("base_model.model.lin3.weight", np.zeros((10, 29), np.float32))
        ),
        ValueError,
        "lin3.weight",
    ),
    "module_to_save_missing": (
        _edit_tensors(lambda t: t.pop("base_model.model.lin3.bias")),
        ValueError,
        "lin3.bias",
    ),
    "unexpected_key": (
        _edit_tensors(
            lambda t: t.__setitem__("base_model.model.lin0.weight", np.zeros((20, 10), np.float32))
        ),
        ValueError,
        "lin0.weight",
    ),
    "no_prefix": (
        _edit_tensors(lambda t: _rename(t, W1, "lin1.shira_weight")),
        ValueError,
        "base_model.model",
    ),
    "bad_r": (_edit_config(r=0), ValueError, "r must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_refused_and_model_unchanged(case, good_dir, tmp_path, xs):
    edit, error, match = BAD[case]
    folder = tmp_path / "adapter"
    shutil.copytree(good_dir, folder)
    edit(folder)
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir, "first")  # a loaded adapter the failure must not touch
    before = snapshot(model)
    out_before = j_out(model, xs)
    with pytest.raises(error, match=match):
        load_peft_adapter(model, folder, "second")
    assert_unchanged(model, before)
    np.testing.assert_array_equal(j_out(model, xs), out_before)


def test_loading_the_same_adapter_name_twice_is_refused(good_dir):
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir)
    before = snapshot(model)
    with pytest.raises(KeyError, match="already has an adapter"):
        load_peft_adapter(model, good_dir)
    assert_unchanged(model, before)
    other = nnx_twin(torch_mlp())  # the name exists on other layers only: still refused
    sj.apply_shira(other, sj.ShiraConfig(r=1, target_modules=["lin0"], random_seed=0))
    before = snapshot(other)
    with pytest.raises(KeyError, match="already has an adapter"):
        load_peft_adapter(other, good_dir)
    assert_unchanged(other, before)


def test_missing_folder_and_file_path():
    with pytest.raises(FileNotFoundError):
        load_peft_adapter(MLP(), "/nonexistent/adapter")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x\\y", ""])
def test_path_traversal_adapter_names_are_refused(name, tmp_path, good_dir):
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="adapter name"):
        save_peft_adapter(model, out, name)
    with pytest.raises(ValueError, match="adapter name"):
        load_peft_adapter(model, good_dir, name)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, good_dir):
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir)
    save_peft_adapter(model, tmp_path)
    save_peft_adapter(model, tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


# --------------------------------------------------------------------------- convert


def test_orbax_to_peft_equals_save_peft_adapter(tmp_path, good_dir, xs):
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir)
    train_jax(model, xs, steps=2)
    sj.save_adapter(model, tmp_path / "ckpt")
    save_peft_adapter(model, tmp_path / "direct")
    folder = orbax_to_peft(tmp_path / "ckpt", tmp_path / "converted")
    assert folder == tmp_path / "converted"
    direct, converted = file_tensors(tmp_path / "direct"), file_tensors(folder)
    assert sorted(direct) == sorted(converted)
    for key in direct:
        assert direct[key].dtype == converted[key].dtype
        np.testing.assert_array_equal(direct[key], converted[key])
    assert json.loads((folder / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "direct" / "adapter_config.json").read_text()
    )
    pm = strict_from_pretrained(torch_mlp(), folder)
    assert_close(torch_out(pm, xs), j_out(model, xs))


def test_orbax_to_peft_named_adapter_goes_to_subfolder(tmp_path, xs):
    base = torch_mlp()
    model = nnx_twin(base)
    cfg = sj.ShiraConfig(r=1, target_modules=["lin0", "lin2"], random_seed=2, init_weights=False)
    sj.apply_shira(model, cfg, "math")
    sj.save_adapter(model, tmp_path / "ckpt", adapter_name="math")
    folder = orbax_to_peft(tmp_path / "ckpt", tmp_path / "peft")
    assert folder == tmp_path / "peft" / "math"
    pm = strict_from_pretrained(base, folder, adapter_name="math")
    assert_close(torch_out(pm, xs), j_out(model, xs))


def test_symlinked_adapter_subfolder_is_refused(tmp_path, good_dir):
    model = nnx_twin(torch_mlp())
    load_peft_adapter(model, good_dir, "other")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other").symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        save_peft_adapter(model, tmp_path / "out", "other")
    assert list(outside.iterdir()) == []


def test_peft_to_orbax_needs_shapes_and_loads_back(tmp_path, good_dir, xs):
    with pytest.raises(ValueError, match="kernel_shapes"):
        peft_to_orbax(good_dir, tmp_path / "x")
    with pytest.raises(ValueError, match="model="):  # modules_to_save needs the model
        peft_to_orbax(good_dir, tmp_path / "x", kernel_shapes={"lin1": (20, 40), "lin2": (40, 30)})
    assert not (tmp_path / "x").exists()

    reference = strict_from_pretrained(torch_mlp(), good_dir)
    peft_to_orbax(good_dir, tmp_path / "ckpt", model=MLP())
    model = nnx_twin(torch_mlp())
    sj.load_adapter(model, tmp_path / "ckpt")
    assert_close(j_out(model, xs), torch_out(reference, xs))

    # Without modules_to_save, kernel shapes alone are enough.
    pm = peft_model(
        torch_mlp(), r=2, target_modules=["lin1", "lin2"], random_seed=3, init_weights=False
    )
    pm.save_pretrained(str(tmp_path / "plain"))
    peft_to_orbax(
        tmp_path / "plain", tmp_path / "ckpt2", kernel_shapes={"lin1": (20, 40), "lin2": (40, 30)}
    )
    model = nnx_twin(torch_mlp())
    sj.load_adapter(model, tmp_path / "ckpt2")
    assert_close(j_out(model, xs), torch_out(pm, xs))
    with pytest.raises(ValueError, match="out of range"):  # wrong shapes are caught
        peft_to_orbax(
            tmp_path / "plain",
            tmp_path / "ckpt3",
            kernel_shapes={"lin1": (20, 30), "lin2": (40, 30)},
        )


# --------------------------------------------------------------------------- Llama parity

LLAMA_IDS = np.random.default_rng(3).integers(3, 96, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random transformers Llama (fp32, untied lm_head) saved with save_pretrained."""
    pytest.importorskip("transformers")
    return tiny_llama_dir(tmp_path_factory.mktemp("llama"), tie_word_embeddings=False)


def hf_llama(path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def jax_logits(model) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(LLAMA_IDS)))


def test_llama_peft_adapter_to_jax_logits_equal(llama_dir, tmp_path):
    import bridge

    pm = peft.get_peft_model(
        hf_llama(llama_dir),
        peft.ShiraConfig(
            r=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            random_seed=0,
            init_weights=False,
            modules_to_save=["lm_head"],
        ),
    )
    with torch.no_grad():
        head = pm.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(0.05 * torch.randn_like(head.weight))
    pm.save_pretrained(str(tmp_path))
    model = bridge.from_pretrained(llama_dir)
    base_logits = jax_logits(model)
    load_peft_adapter(model, tmp_path)
    assert len(sj.shira_layers(model)) == 6
    ref, got = torch_logits(pm, LLAMA_IDS), jax_logits(model)
    diff = float(np.abs(got - ref).max())
    print(f"\nPEFT -> JAX llama: max |logit diff| {diff:.2e}, rel {rel_err(got, ref):.2e}")
    assert rel_err(got, ref) < 1e-5
    assert float(np.abs(got - base_logits).max()) > 1e-2  # the adapter matters


def test_llama_jax_adapter_to_peft_logits_equal(llama_dir, tmp_path):
    import bridge

    model = bridge.from_pretrained(llama_dir)
    cfg = sj.ShiraConfig(r=4, random_seed=7, modules_to_save=["lm_head"])  # q_proj, v_proj
    sj.apply_shira(model, cfg)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=sj.ShiraParam)
    ids = jnp.asarray(LLAMA_IDS)

    @nnx.jit
    def step(model, opt):
        def loss(m):
            logp = jax.nn.log_softmax(m(ids[:, :-1]), -1)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, sj.ShiraParam))(model)
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt)
    save_peft_adapter(model, tmp_path / "ours")
    peft.get_peft_model(
        hf_llama(llama_dir), peft.ShiraConfig(r=4, random_seed=7, modules_to_save=["lm_head"])
    ).save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.model.layers.1.self_attn.v_proj.shira_indices" in ours
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert our_cfg["target_modules"] is None  # PEFT's default for llama, like PEFT wrote
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        if key.endswith("shira_indices"):
            np.testing.assert_array_equal(ours[key], theirs[key])

    pm = strict_from_pretrained(hf_llama(llama_dir), tmp_path / "ours")
    ref, got = jax_logits(model), torch_logits(pm, LLAMA_IDS)
    diff = float(np.abs(got - ref).max())
    print(f"\nJAX -> PEFT llama: max |logit diff| {diff:.2e}, rel {rel_err(got, ref):.2e}")
    assert rel_err(got, ref) < 1e-5
    assert float(np.abs(got - torch_logits(hf_llama(llama_dir), LLAMA_IDS)).max()) > 1e-2
