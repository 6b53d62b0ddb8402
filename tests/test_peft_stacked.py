"""PEFT <-> shira_jax bridge for scan-stacked layers, against real PEFT + torch (no mocks).

The NNX model creates its blocks once under `nnx.vmap` (kernels `[L, in, out]`) and runs them
with `nnx.scan`; its torch twin holds the same blocks in `layers = nn.ModuleList([...])`, so
PEFT names them `layers.N.up` / `layers.N.down`. A PEFT export unstacks the `[L, nnz]`
adapter into those per-layer keys and an import restacks them. Parity: the same base weights
(torch `[out, in]` = kernel[i] transposed), outputs equal in float32 up to rounding (the
tolerance is derived at `ROUNDINGS` below).
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    assert_unchanged,
    file_tensors,
    peft_model,
    scan_blocks,
    snapshot,
    stacked_blocks,
    strict_from_pretrained,
    torch_out,
)
from flax import nnx
from safetensors.numpy import save_file

import shira_jax as sj
from bridge.peft import load_peft_adapter, save_peft_adapter
from shira_jax import stacked

peft = pytest.importorskip("peft")

L, D, H, C = 3, 6, 10, 4
PREFIX = "base_model.model."


# --------------------------------------------------------------------------- models


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.relu(self.up(x)))


class StackNet(nnx.Module):
    """MaxText-style: L blocks created once under nnx.vmap, applied with nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = stacked_blocks(Block, L, rngs)
        self.head = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, x):
        return self.head(scan_blocks(self.layers, x))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(D, H)
        self.down = torch.nn.Linear(H, D)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
        self.head = torch.nn.Linear(D, C)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def torch_net(seed: int = 0) -> TorchNet:
    torch.manual_seed(seed)
    return TorchNet()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def nnx_twin(tmodel: TorchNet) -> StackNet:
    """The stacked NNX net with `tmodel`'s base weights (kernel[i] = layers[i].weight.T)."""
    model = StackNet(nnx.Rngs(1))
    for name in ("up", "down"):
        dst = getattr(model.layers, name)
        srcs = [getattr(block, name) for block in tmodel.layers]
        dst.kernel[...] = jnp.asarray(np.stack([_np(s.weight).T for s in srcs]))
        dst.bias[...] = jnp.asarray(np.stack([_np(s.bias) for s in srcs]))
    model.head.kernel[...] = jnp.asarray(_np(tmodel.head.weight).T)
    model.head.bias[...] = jnp.asarray(_np(tmodel.head.bias))
    return model


@pytest.fixture(scope="module")
def xs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)


@nnx.jit  # compiled once per model structure: the scan is traced once, not every call
def _forward(model, x):
    return model(x)


def j_out(model, x):
    return np.asarray(_forward(model, jnp.asarray(x)))


# Tolerance. Each output is a chain of fp32 roundings: per block, `up` sums D products + a bias
# and its kernel takes the adapter entries (scale * value, kernel + delta: 2 more), `down` the
# same with H, then the residual add; the head sums D products + a bias.
ROUNDINGS = L * ((D + 1 + 2) + (H + 1 + 2) + 1) + (D + 1)  # = 76
# Each rounding is off by at most u = 2**-24 of the running sum, so each framework is within
# ROUNDINGS * u * (size of the sums) of the exact result and the two within twice that:
# ROUNDINGS * 2**-23 ~ 9e-6 of the size of the sums, which we take as the largest |output| (the
# logits scale; the outputs reach ~50 here with PEFT's random adapter values). Observed: ~2e-7
# of it, so a 50x margin for other BLAS / XLA summation orders; a misplaced adapter entry or a
# transposed kernel is off by 1e-2 or more of it. (A fixed rtol=1e-5 per element failed at
# 3e-5 / 4e-5 on an output that cancels to ~0.14 while its neighbours are ~50.)
LOGITS_SCALE_TOL = ROUNDINGS * 2.0**-23


def assert_close(ours, theirs):
    atol = LOGITS_SCALE_TOL * float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


def layer_keys(names=("down", "up")) -> list[str]:
    return sorted(
        f"{PREFIX}layers.{i}.{m}.shira_{k}"
        for i in range(L)
        for m in names
        for k in ("weight", "indices")
    )


# --------------------------------------------------------------------------- JAX -> PEFT


def test_stacked_jax_adapter_exports_per_layer_keys_that_peft_loads(tmp_path, xs):
    kw = dict(r=1, target_modules=["up", "down"], random_seed=5, init_weights=False)
    base = torch_net()
    model = nnx_twin(base)
    stacked.apply_shira_stacked(model, sj.ShiraConfig(**kw))
    assert stacked.is_stacked(model.layers.up)
    nnz = D + H
    assert model.layers.up.shira_weight["default"][...].shape == (L, nnz)
    save_peft_adapter(model, tmp_path / "ours")
    peft_model(torch_net(), **kw).save_pretrained(str(tmp_path / "theirs"))

    ours, theirs = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs) == layer_keys()
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key
        if key.endswith("shira_indices"):  # same seed: PEFT's random mask, in torch order
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # each layer's own values (not layer 0's everywhere)
    w = [ours[f"{PREFIX}layers.{i}.up.shira_weight"] for i in range(L)]
    assert not np.allclose(w[0], w[1])
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("auto_mapping", "peft_version"):
        our_cfg.pop(field), their_cfg.pop(field)
    their_cfg["target_modules"] = sorted(their_cfg["target_modules"])
    assert our_cfg == their_cfg

    pm = strict_from_pretrained(base, tmp_path / "ours")
    assert_close(j_out(model, xs), torch_out(pm, xs))
    with sj.disable_adapter(model):
        assert not np.allclose(torch_out(pm, xs), j_out(model, xs), atol=1e-4)


def test_modules_to_save_holding_a_target_is_refused_before_any_change():
    model = StackNet(nnx.Rngs(0))
    cfg = sj.ShiraConfig(r=1, target_modules=["up"], modules_to_save=["layers"])
    with pytest.raises(ValueError, match="overlaps the SHiRA target"):
        stacked.apply_shira_stacked(model, cfg)
    assert sj.shira_layers(model) == []


@pytest.mark.parametrize("saved", ["down"])
def test_modules_to_save_inside_the_stack_is_refused(saved, tmp_path):
    model = StackNet(nnx.Rngs(0))
    cfg = sj.ShiraConfig(r=1, target_modules=["up"], modules_to_save=[saved])
    stacked.apply_shira_stacked(model, cfg)
    with pytest.raises(ValueError, match="overlaps the scan-stacked blocks"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- PEFT -> JAX


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT-made adapter on the torch net (random values, a trained-looking head copy)."""
    folder = tmp_path_factory.mktemp("peft_stacked")
    pm = peft_model(
        torch_net(),
        r=2,
        target_modules=["up", "down"],
        random_seed=3,
        init_weights=False,
        modules_to_save=["head"],
    )
    with torch.no_grad():
        copy = pm.base_model.model.head.modules_to_save["default"]
        copy.weight.add_(0.3 * torch.randn_like(copy.weight))
        copy.bias.add_(0.3)
    pm.save_pretrained(str(folder))
    return folder, pm


def test_peft_adapter_restacks_into_stacked_jax_model(peft_dir, tmp_path, xs):
    folder, pm = peft_dir
    theirs = file_tensors(folder)
    assert sorted(theirs) == sorted([*layer_keys(), f"{PREFIX}head.bias", f"{PREFIX}head.weight"])
    model = nnx_twin(torch_net())
    load_peft_adapter(model, folder)
    assert stacked.is_stacked(model.layers.down)
    assert model.layers.down.shira_weight["default"][...].shape == (L, 2 * (D + H))
    assert model.layers.down.shira_indices["default"][...].shape == (L, 2, 2 * (D + H))
    assert isinstance(model.head, sj.ModulesToSave)
    assert_close(j_out(model, xs), torch_out(pm, xs))

    # and back: the export equals PEFT's own file, bit for bit
    save_peft_adapter(model, tmp_path / "again")
    again = file_tensors(tmp_path / "again")
    assert sorted(again) == sorted(theirs)
    for key in theirs:
        assert again[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(again[key], theirs[key], err_msg=key)

    other = nnx_twin(torch_net())
    load_peft_adapter(other, folder, dtype=jnp.bfloat16)
    assert other.layers.up.shira_weight["default"][...].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- bad files


def _key(i, m, leaf):
    return f"{PREFIX}layers.{i}.{m}.shira_{leaf}"


def _trim(t, i, m):
    t[_key(i, m, "weight")] = t[_key(i, m, "weight")][:-1]
    t[_key(i, m, "indices")] = np.ascontiguousarray(t[_key(i, m, "indices")][:, :-1])


def _duplicate(t, i, m):  # a repeated position: summed on load, so one entry fewer
    t[_key(i, m, "indices")][:, 1] = t[_key(i, m, "indices")][:, 0]


def _drop(t, i, m):
    del t[_key(i, m, "weight")], t[_key(i, m, "indices")]


def _extra_layer(t):
    for leaf in ("weight", "indices"):
        t[_key(L, "up", leaf)] = t[_key(0, "up", leaf)]


def _stacked_name(t):
    for leaf in ("weight", "indices"):
        t[f"{PREFIX}layers.up.shira_{leaf}"] = t.pop(_key(0, "up", leaf))


def _out_of_range(t):
    t[_key(1, "down", "indices")][0, 0] = D  # output index of a torch weight [D, H]


BAD = {
    "nnz_differs": (lambda t: _trim(t, 1, "up"), ValueError, "different numbers of SHiRA"),
    "duplicates_shrink_a_layer": (
        lambda t: _duplicate(t, 2, "down"),
        ValueError,
        "different numbers of SHiRA",
    ),
    "missing_layer": (lambda t: _drop(t, 2, "up"), ValueError, r"no SHiRA keys for layers \[2\]"),
    "layer_out_of_range": (_extra_layer, KeyError, "has 3 layers"),
    "stacked_path_key": (_stacked_name, ValueError, "scan-stacked"),
    "index_out_of_range": (_out_of_range, ValueError, "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stacked_files_are_refused_and_model_unchanged(case, peft_dir, tmp_path, xs):
    edit, error, match = BAD[case]
    good, _ = peft_dir
    folder = tmp_path / "adapter"
    shutil.copytree(good, folder)
    tensors = file_tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    model = nnx_twin(torch_net())
    load_peft_adapter(model, good, "first")  # a stacked adapter the failure must not touch
    before = snapshot(model)
    out_before = j_out(model, xs)
    with pytest.raises(error, match=match):
        load_peft_adapter(model, folder, "second")
    assert_unchanged(model, before)
    np.testing.assert_array_equal(j_out(model, xs), out_before)


def test_only_canonical_layer_numbers_name_a_stacked_layer():
    """`layers.00` (or a non-ASCII digit) is not layer 0: a file with such a key next to
    `layers.0` would otherwise replace layer 0's adapter silently."""
    from shira_jax.stacked import stacked_path

    assert stacked_path("model.layers.12.self_attn.q_proj") == ("model.layers.self_attn.q_proj", 12)
    for path in ("model.layers.00.self_attn.q_proj", "model.layers.\u0663.q_proj", "layers.+1.q"):
        assert stacked_path(path) is None, path
