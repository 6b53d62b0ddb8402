"""Fusion (weighted sums, AWOM/AWOR) and ShiraConfig's PEFT fields."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP

import shira_jax as sj


def two_adapters(**kw):
    model = MLP()
    for i, name in enumerate("ab"):
        sj.apply_shira(
            model,
            sj.ShiraConfig(
                r=2, target_modules=["lin1", "lin2"], random_seed=i, init_weights=False, **kw
            ),
            name,
        )
    return model


def test_fused_adapter_equals_weighted_sum_and_active_sum(x):
    model = two_adapters()
    sj.fuse_adapters(model, {"a": 1.0, "b": 0.5}, "ab")
    layer = model.lin1
    np.testing.assert_allclose(
        layer.get_delta_weight("ab"),
        layer.get_delta_weight("a") + 0.5 * layer.get_delta_weight("b"),
        rtol=1e-6,
        atol=1e-6,
    )
    sj.set_adapter(model, ["a", "b"])
    sj.set_scale(model, "b", 0.5)
    both = model(x)
    sj.set_adapter(model, "ab")
    np.testing.assert_allclose(model(x), both, rtol=1e-5, atol=1e-5)
    nnz = layer.shira_weight["ab"].shape[0]
    assert nnz <= 2 * layer.shira_weight["a"].shape[0]
    with pytest.raises(ValueError, match="already exists"):
        sj.fuse_adapters(model, {"a": 1.0}, "ab")


def test_awom_awor():
    a = jnp.zeros((4, 4)).at[0, 0].set(1.0)
    b = jnp.zeros((4, 4)).at[1, 1].set(1.0)
    assert sj.awom(a, b) == 0.0 and sj.awor(a, b) == 1.0
    c = jnp.zeros((4, 4)).at[0, 2].set(2.0)
    assert sj.awom(a, c) == pytest.approx(2.0)
    assert sj.awor(a, c) == pytest.approx(1 - 1 / 16)
    model = two_adapters(mask_type="weight_magnitude")
    disjoint = MLP()
    sj.apply_shira(
        disjoint,
        sj.ShiraConfig(
            r=2, target_modules=["lin1"], init_weights=False, mask_type="weight_magnitude"
        ),
        "a",
    )
    sj.apply_shira(
        disjoint,
        sj.ShiraConfig(
            r=2,
            target_modules=["lin1"],
            init_weights=False,
            mask_type="weight_magnitude",
            exclude_adapters=["a"],
        ),
        "b",
    )
    same = sj.adapter_orthogonality(model, "a", "b")
    apart = sj.adapter_orthogonality(disjoint, "a", "b")
    assert set(same) == {"lin1", "lin2", "mean"}
    assert 0.0 <= apart["mean"]["awor"] <= 1.0 and same["mean"]["awom"] > 0


def test_config_dict_round_trip_and_peft_fields():
    cfg = sj.ShiraConfig(
        r=4,
        target_modules=["v_proj", "q_proj"],
        random_seed=7,
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    d = cfg.to_dict()
    for field in (
        "r",
        "mask_type",
        "random_seed",
        "target_modules",
        "fan_in_fan_out",
        "init_weights",
        "modules_to_save",
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    ):
        assert field in d
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["peft_type"] == "SHIRA"
    assert sj.ShiraConfig.from_dict(d) == cfg
    peft_like = {
        "peft_type": "SHIRA",
        "r": 2,
        "mask_type": "my_custom_mask",
        "target_modules": ["lin1"],
        "unknown_future_field": 1,
    }
    loaded = sj.ShiraConfig.from_dict(peft_like)
    assert loaded.mask_type == "custom"
    with pytest.raises(ValueError, match="LORA"):
        sj.ShiraConfig.from_dict({"peft_type": "LORA"})


def test_config_defaults_match_peft():
    from peft import ShiraConfig as PeftShiraConfig

    ours, theirs = sj.ShiraConfig(), PeftShiraConfig()
    for field in (
        "r",
        "mask_type",
        "random_seed",
        "target_modules",
        "fan_in_fan_out",
        "init_weights",
        "modules_to_save",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_default_targets_by_model_type():
    from flax import nnx

    class Attn(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)
            self.k_proj = nnx.Linear(8, 8, rngs=rngs)
            self.v_proj = nnx.Linear(8, 8, rngs=rngs)

    m = Attn()
    sj.apply_shira(m, sj.ShiraConfig(r=1), model_type="llama")
    assert [p for p, _ in sj.shira_layers(m)] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        sj.apply_shira(Attn(), sj.ShiraConfig(r=1))
