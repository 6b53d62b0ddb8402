"""PEFT's own behaviours, done side by side in real PEFT (torch) and in shira_jax (issue 13).

Each test does the same thing to a tiny transformers Llama wrapped by PEFT and to the NNX
Llama of the same shape (`conftest.TINY_LLAMA`), and compares the outcome: the error type,
the warning, which adapter is active. Masks depend only on shapes and the seed, so the two
models need not share weights, except where outputs are compared (then only within JAX).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import file_tensors, peft_model, tiny_hf_llama, tiny_jax_llama
from flax import nnx

import bridge
import shira_jax as sj
from shira_jax.model import named_modules

peft = pytest.importorskip("peft")

BIG_SEED = 2**63 + 5  # torch accepts seeds up to 2**64 - 1; jax.random.key only below 2**63
IDS = jnp.asarray(np.arange(12).reshape(2, 6) % 100)


def torch_pairs(indices) -> set[tuple[int, int]]:
    """(out, in) pairs of PEFT's `[2, nnz]` torch-order indices."""
    idx = np.asarray(indices)
    return set(zip(idx[0].tolist(), idx[1].tolist(), strict=True))


def jax_pairs(indices) -> set[tuple[int, int]]:
    """(out, in) pairs of shira_jax's `[2, nnz]` kernel-order (in, out) indices."""
    idx = np.asarray(indices)
    return set(zip(idx[1].tolist(), idx[0].tolist(), strict=True))


def jax_cfg(**kw) -> sj.ShiraConfig:
    return sj.ShiraConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], **kw})


def recorded(fn, *args):
    """Call `fn(*args)`; return the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ----------------------------------------------------------------------------- seeds >= 2**63


def test_seed_above_2_63_makes_peft_mask_and_loads(tmp_path):
    pm = peft_model(
        tiny_hf_llama(0), r=2, target_modules=["q_proj", "v_proj"], random_seed=BIG_SEED
    )
    pm.save_pretrained(tmp_path)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj.shira_indices["default"]

    model = tiny_jax_llama(0)
    sj.apply_shira(model, jax_cfg(random_seed=BIG_SEED))  # no OverflowError
    assert jax_pairs(model.model.layers[0].self_attn.q_proj.shira_indices["default"][...]) == (
        torch_pairs(q)
    )
    # init_weights=False draws values: the key comes from the seed, folded into jax's range
    sj.apply_shira(model, jax_cfg(random_seed=BIG_SEED, init_weights=False), "drawn")
    drawn = model.model.layers[0].self_attn.q_proj.shira_weight["drawn"][...]
    assert bool(jnp.all(jnp.isfinite(drawn))) and float(jnp.abs(drawn).max()) > 0

    loaded = tiny_jax_llama(0)
    bridge.load_peft_adapter(loaded, tmp_path)  # the PEFT-written folder with that seed
    assert sj.adapter_configs(loaded)["default"].random_seed == BIG_SEED
    layer = loaded.model.layers[0].self_attn.q_proj
    assert jax_pairs(layer.shira_indices["default"][...]) == torch_pairs(q)
    key = "base_model.model.model.layers.0.self_attn.q_proj.shira_indices"
    assert torch_pairs(file_tensors(tmp_path)[key]) == torch_pairs(q)


def test_seed_range_is_torchs():
    import torch

    for seed in (-(2**63), -5, 2**63, 2**64 - 1):
        torch.Generator().manual_seed(seed)
        assert sj.ShiraConfig(random_seed=seed).random_seed == seed
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError):  # torch: "Overflow when unpacking long long"
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match="random_seed"):
            sj.ShiraConfig(random_seed=seed)


# ----------------------------------------------------------------------------- delete_adapter
# Adapter names avoid the letters of PEFT's prefix "shira_" (PEFT warns about such names).


def _three_peft_adapters():
    cfg = lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"])  # noqa: E731
    pm = peft.get_peft_model(tiny_hf_llama(0), cfg(), adapter_name="c")
    pm.add_adapter("d", cfg())
    pm.add_adapter("b", cfg())
    return pm


def _three_jax_adapters():
    model = tiny_jax_llama(0)
    for i, name in enumerate(("c", "d", "b")):  # "c" first: the active one
        sj.apply_shira(model, jax_cfg(random_seed=i, init_weights=False), name)
    return model


def test_deleting_the_active_adapter_activates_the_first_remaining_one():
    """The first in sorted order ("b"), not in the order added ("d")."""
    pm = _three_peft_adapters()
    assert pm.active_adapters == ["c"]
    peft_warns = recorded(pm.delete_adapter, "c")
    assert pm.active_adapters == ["b"]

    model = _three_jax_adapters()
    assert sj.active_adapters(model) == ("c",)
    jax_warns = recorded(sj.delete_adapter, model, "c")
    assert sj.active_adapters(model) == ("b",)
    assert (
        jax_warns
        == peft_warns[:1]
        == ["Adapter c was active which is now deleted. Setting active adapter to b."]
    )
    # the model runs adapter "b" (trainable), not the base model
    out = model(IDS)
    with sj.disable_adapter(model):
        base = model(IDS)
    assert not np.allclose(out, base)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.shira_weight["b"]) is sj.ShiraParam
    assert type(q.shira_weight["d"]) is not sj.ShiraParam
    sj.set_adapter(model, "b")
    np.testing.assert_array_equal(model(IDS), out)


def test_deleting_one_of_several_active_adapters_keeps_the_others():
    pm = _three_peft_adapters()
    pm.base_model.set_adapter(["b", "d"])
    assert recorded(pm.base_model.delete_adapter, "b") == []
    peft_active = pm.base_model.model.model.layers[0].self_attn.q_proj.active_adapters

    model = _three_jax_adapters()
    sj.set_adapter(model, ["b", "d"])
    assert recorded(sj.delete_adapter, model, "b") == []
    assert list(sj.active_adapters(model)) == peft_active == ["d"]


def test_deleting_the_last_adapter_leaves_none_active():
    pm = peft.get_peft_model(tiny_hf_llama(0), peft.ShiraConfig(r=2, target_modules=["q_proj"]))
    assert recorded(pm.delete_adapter, "default") == []
    assert pm.active_adapters == []
    model = tiny_jax_llama(0)
    sj.apply_shira(model, jax_cfg())
    assert recorded(sj.delete_adapter, model, "default") == []
    assert sj.active_adapters(model) == ()


def test_an_adapter_added_after_the_last_was_deleted_is_active_and_trains():
    """PEFT leaves it inactive (and PeftModel's forward then raises KeyError 'default'); here
    it is active, as on a fresh model: the values get gradients and change the output."""
    model = tiny_jax_llama(0)
    base = np.asarray(model(IDS))
    save = dict(modules_to_save=["lm_head"])
    sj.apply_shira(model, jax_cfg(init_weights=False, **save))
    sj.delete_adapter(model, "default")
    sj.apply_shira(model, jax_cfg(init_weights=False, random_seed=7, **save), "c")
    assert sj.active_adapters(model) == ("c",)
    assert model.lm_head.active_adapters == ("c",)  # the modules_to_save wrapper too
    assert np.abs(np.asarray(model(IDS)) - base).max() > 1e-4
    grads = nnx.grad(lambda m: m(IDS).sum(), argnums=nnx.DiffState(0, sj.ShiraParam))(model)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- modules_to_save


def test_two_active_adapters_with_their_own_modules_to_save_copy_are_refused():
    """PEFT raises in `set_adapter` (ModulesToSaveWrapper.check_set_adapter), before the
    forward; so do we, and the model is left as it was."""

    def peft_cfg(save):
        return peft.ShiraConfig(r=2, target_modules=["q_proj"], modules_to_save=save)

    pm = peft.get_peft_model(tiny_hf_llama(0), peft_cfg(["lm_head"]), adapter_name="b")
    pm.add_adapter("c", peft_cfg(["lm_head"]))
    pm.add_adapter("d", peft_cfg(None))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        pm.base_model.set_adapter(["b", "c"])
    pm.base_model.set_adapter(["b", "d"])  # only "b" has a copy: fine

    model = tiny_jax_llama(0)
    for name, save in (("b", ["lm_head"]), ("c", ["lm_head"]), ("d", None)):
        cfg = jax_cfg(target_modules=["q_proj"], modules_to_save=save, init_weights=False)
        sj.apply_shira(model, cfg, name)
    before = model(IDS)
    with pytest.raises(ValueError, match=r"\['b', 'c'\] each have their own copy.*lm_head"):
        sj.set_adapter(model, ["b", "c"])
    assert sj.active_adapters(model) == ("b",)  # nothing changed
    np.testing.assert_array_equal(model(IDS), before)
    sj.set_adapter(model, ["b", "d"])
    assert sj.active_adapters(model) == ("b", "d")
    sj.merge(model, ["b"])
    with pytest.raises(ValueError, match="each have their own copy"):
        sj.switch_adapter(model, "d", "c")  # would make "b" and "c" active together


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "targets", [r".*\.(q_proj|input_layernorm)", ["q_proj", "input_layernorm"], r".*"]
)
def test_targets_that_select_a_norm_are_a_type_error(targets):
    with pytest.raises(TypeError, match="RMSNorm") as peft_err:
        peft_model(tiny_hf_llama(0), r=2, target_modules=targets)
    assert "not supported" in str(peft_err.value)

    model = tiny_jax_llama(0)
    with pytest.raises(TypeError, match=r"Target module model\.\S+ \(\w+\) is selected") as err:
        sj.apply_shira(model, jax_cfg(target_modules=targets))
    assert "linear layers only" in str(err.value)
    assert not sj.shira_layers(model)  # the model is unchanged


@pytest.mark.parametrize(
    "targets", ["all-linear", ["q_proj", "v_proj"], r".*\.(q|v)_proj", r"model\.layers\.0\..*_proj"]
)
def test_targets_that_select_only_linears_work_in_both(targets):
    pm = peft_model(tiny_hf_llama(0), r=2, target_modules=targets)
    peft_paths = {
        name.removeprefix("base_model.model.")
        for name, module in pm.named_modules()
        if isinstance(module, peft.tuners.shira.layer.ShiraLayer)
    }
    model = tiny_jax_llama(0)
    sj.apply_shira(model, jax_cfg(target_modules=targets))
    assert {path for path, _ in sj.shira_layers(model)} == peft_paths


# ----------------------------------------------------------------------------- file vs targets


def _peft_dir_with_targets(tmp_path, targets):
    """A real PEFT adapter on q_proj and v_proj whose config is edited to name `targets`."""
    pm = peft_model(tiny_hf_llama(0), r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    folder = tmp_path / "a"
    pm.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": targets}))
    return folder


def _refused_unchanged(model, load, error, match):
    before = np.asarray(model(IDS))
    with pytest.raises(error, match=match):
        load()
    assert not sj.shira_layers(model)
    np.testing.assert_array_equal(np.asarray(model(IDS)), before)


@pytest.mark.parametrize(
    ("targets", "peft_warns", "match"),
    [
        (["q_proj", "k_proj", "v_proj"], True, r"no keys for, e\.g\. \['model\.layers\.0\.\w+\.k_"),
        (["q_proj"], False, r"does not select, e\.g\. \['model\.layers\.0\.\w+\.v_proj'"),
    ],
)
def test_a_file_whose_layers_are_not_its_targets_is_refused(tmp_path, targets, peft_warns, match):
    """PEFT loads both: it adapts the targeted layers without keys with their initial values
    (warning "Found missing adapter keys") and skips keys of untargeted layers silently; both
    sides of such a file then run different adapters. Refused here, model unchanged."""
    folder = _peft_dir_with_targets(tmp_path, targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(tiny_hf_llama(0), str(folder))
    warned = any("missing adapter keys" in str(w.message) for w in caught)
    assert warned == peft_warns
    model = tiny_jax_llama(0)
    load = lambda: bridge.load_peft_adapter(model, folder)  # noqa: E731
    _refused_unchanged(model, load, sj.AdapterLoadError, match)


def test_an_adapter_of_a_shallower_model_is_refused(tmp_path):
    """Same widths, so every index is in range and every size fits: only the layer count
    tells that this 2-layer adapter is not the 3-layer model's."""
    folder = _peft_dir_with_targets(tmp_path, ["q_proj", "v_proj"])
    model = tiny_jax_llama(0, num_hidden_layers=3)
    load = lambda: bridge.load_peft_adapter(model, folder)  # noqa: E731
    _refused_unchanged(model, load, sj.AdapterLoadError, r"model\.layers\.2\.self_attn\.q_proj")


def test_a_file_whose_targets_select_a_norm_is_refused_as_a_type_error(tmp_path):
    folder = _peft_dir_with_targets(tmp_path, r".*\.(q_proj|v_proj|input_layernorm)")
    with pytest.raises(TypeError, match="RMSNorm"):
        peft.PeftModel.from_pretrained(tiny_hf_llama(0), str(folder))
    model = tiny_jax_llama(0)
    load = lambda: bridge.load_peft_adapter(model, folder)  # noqa: E731
    _refused_unchanged(model, load, TypeError, r"adapter_model\.safetensors: Target module")
    with pytest.raises(sj.AdapterLoadError):  # one error type of ours, too
        bridge.load_peft_adapter(model, folder)


# ----------------------------------------------------------------------------- more replays


def test_modules_to_save_names_match_by_plain_suffix_as_in_peft(tmp_path):
    """PEFT wraps every module whose path ends with a modules_to_save entry (plain
    `endswith`): "norm" picks the layer norms too, and PEFT's file then loads here."""
    pm = peft_model(tiny_hf_llama(0), r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in pm.named_modules()
        if type(module).__name__ == "ModulesToSaveWrapper"
    }
    assert "model.layers.0.input_layernorm" in wrapped and "model.norm" in wrapped
    pm.save_pretrained(str(tmp_path / "a"))

    def held(model):
        return {p for p, m in named_modules(model) if isinstance(m, sj.ModulesToSave)}

    model = tiny_jax_llama(0)
    sj.apply_shira(model, jax_cfg(target_modules=["q_proj"], modules_to_save=["norm"]))
    assert held(model) == wrapped
    fresh = tiny_jax_llama(0)
    bridge.load_peft_adapter(fresh, tmp_path / "a")  # PEFT's own file loads
    assert held(fresh) == wrapped


def test_deleting_adapters_on_disjoint_layers_leaves_no_stale_name_active():
    model = tiny_jax_llama(0)
    sj.apply_shira(model, jax_cfg(target_modules=["q_proj"], init_weights=False), "a")
    sj.apply_shira(model, jax_cfg(target_modules=["v_proj"], init_weights=False), "b")
    base = tiny_jax_llama(0)(IDS)
    recorded(sj.delete_adapter, model, "a")  # PEFT's warning: "b" becomes active
    assert sj.active_adapters(model) == ("b",)
    sj.delete_adapter(model, "b")
    assert sj.active_adapters(model) == () and sj.adapter_names(model) == ()
    assert all(layer.active_adapters == () for _, layer in sj.shira_layers(model))
    sj.apply_shira(model, jax_cfg(target_modules=["v_proj"], init_weights=False), "c")
    assert all(layer.active_adapters == ("c",) for _, layer in sj.shira_layers(model))
    assert np.abs(np.asarray(model(IDS)) - np.asarray(base)).max() > 1e-4  # "c" runs


def test_given_indices_that_repeat_a_position_are_refused():
    """The forward writes each entry once; a repeated position would disagree with
    get_delta_weight's sum (PEFT's readers sum them: masks.canonicalize does that)."""
    model = tiny_jax_llama(0)
    path = "model.layers.0.self_attn.q_proj"
    idx = np.array([[0, 0, 1], [3, 3, 4]])
    with pytest.raises(ValueError, match=r"repeat 1 \(in, out\) position"):
        sj.apply_shira(model, jax_cfg(target_modules=["q_proj"]), indices={path: idx},
                       values={path: np.ones(3, np.float32)})
    assert not sj.shira_layers(model)
