"""Tunix models (`bridge.tunix`): HF checkpoints in, PEFT SHiRA adapters both ways, training.

Each family is a tiny random transformers model (2 layers, hidden 64, 4 heads, 2 KV heads,
head_dim 16) saved as safetensors and loaded by Tunix's own loader through
`bridge.from_pretrained`; its PEFT SHiRA adapter covers all seven projections with random
values (`init_weights=False`). Gemma3 runs twice: with 2 KV heads its k/v projections are one
fused `kv_einsum`, with 4 (= heads) q/k/v are one `qkv_einsum`.

Tolerance: logits are compared at `LOGIT_TOL = 1e-4` of their largest magnitude (the issue's
bound). Both sides compute in float32; they differ only in summation order (matmuls over at
most 96 terms, softmax over 10 keys) and in RoPE's sin/cos, which gives about 1e-6 here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    assert_unchanged,
    file_tensors,
    rel_err,
    snapshot,
    strict_from_pretrained,
    torch_logits,
)
from flax import nnx

import bridge
import shira_jax as sj
from bridge import tunix
from shira_jax.app import lm

LOGIT_TOL = 1e-4
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, SEED = 2, 3
IDS = np.array([[3, 5, 7, 9, 11, 2, 4, 6, 8, 10], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]])
SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
# family -> (transformers config class, model class, config overrides, Tunix modules per layer)
_LLAMA_LIKE = tuple(f"attn.{p}_proj" for p in "qkvo")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FAMILIES: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    # Tunix's Qwen3 and Llama3 apply RoPE with theta 1e6 whatever config.json says.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6), _LLAMA_LIKE + _MLP),
    "qwen2": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e4, tie_word_embeddings=True),
        _LLAMA_LIKE + _MLP,
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=1e6), _LLAMA_LIKE + _MLP),
    # sliding_window 4 < 10 tokens: the local attention mask matters.
    "gemma3-kv": (
        "Gemma3TextConfig", "Gemma3ForCausalLM", dict(query_pre_attn_scalar=16, sliding_window=4),
        ("attn.q_einsum", "attn.kv_einsum", "attn.attn_vec_einsum") + _MLP,
    ),
    "gemma3-qkv": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(query_pre_attn_scalar=16, sliding_window=4, num_key_value_heads=4),
        ("attn.qkv_einsum", "attn.attn_vec_einsum") + _MLP,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _restore_flax_flag():
    """Importing Tunix's models sets flax's `flax_always_shard_variable` to False for the
    whole process; put it back for the test files that share this worker."""
    import flax

    before = flax.config.flax_always_shard_variable
    yield
    flax.config.update("flax_always_shard_variable", before)


def tunix_logits(model: nnx.Module, ids: np.ndarray = IDS) -> np.ndarray:
    return np.asarray(lm.forward(model, jnp.asarray(ids)))


def hf_model(family: str, seed: int = 0):
    """The family's tiny transformers model, weights + N(0, 0.1^2) so logits are spread."""
    import torch
    import transformers

    config_cls, model_cls, overrides, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**SHAPE, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def peft_adapter(base, folder: Path, targets=SEVEN, seed: int = SEED):
    """A PEFT SHiRA adapter with random values on `base` (wrapped in place), saved to `folder`."""
    import peft

    cfg = peft.ShiraConfig(r=R, target_modules=list(targets), init_weights=False, random_seed=seed)
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(str(folder))
    return pm


def load_tunix(path: Path, family: str) -> nnx.Module:
    return bridge.from_pretrained(path, implementation="tunix" if family == "llama" else None)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> dict[str, Any]:
    """HF dir, PEFT adapter dir, reference logits (base and with the adapter), the Tunix model
    with the adapter loaded through the bridge."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = hf_model(family)
    hf.save_pretrained(str(root / "hf"))
    base_logits = torch_logits(hf, IDS)
    pm = peft_adapter(hf, root / "peft")
    model = load_tunix(root / "hf", family)
    before = tunix_logits(model)
    bridge.load_peft_adapter(model, root / "peft")
    return dict(
        family=family, root=root, pm=pm, model=model, base_logits=base_logits,
        peft_logits=torch_logits(pm, IDS), tunix_before=before,
    )


# ----------------------------------------------------------------------------- PEFT -> Tunix


def test_peft_adapter_on_tunix_model_gives_peft_logits(case):
    model = case["model"]
    assert tunix.is_tunix_model(model)
    assert rel_err(case["tunix_before"], case["base_logits"]) <= LOGIT_TOL  # the base agrees
    assert rel_err(case["peft_logits"], case["base_logits"]) > 100 * LOGIT_TOL  # adapter matters
    assert rel_err(tunix_logits(model), case["peft_logits"]) <= LOGIT_TOL
    per_layer = FAMILIES[case["family"]][3]
    want = {f"layers.{i}.{name}" for i in range(2) for name in per_layer}
    assert {path for path, _ in sj.shira_layers(model)} == want


def test_each_tunix_delta_is_its_hf_linears_deltas_side_by_side(case):
    """A Tunix layer's [in, out] delta is the transposed PEFT delta of every HF linear it
    holds, at its column block: the index layout of fused and N-D kernels, checked whole."""
    model, pm = case["model"], case["pm"]
    modules = dict(pm.base_model.model.named_modules())
    rules = tunix.family_of(model).model_rules(model)
    for path, layer in sj.shira_layers(model):
        held = tunix.match_tunix(rules, path)
        parts = [
            modules[hf].get_delta_weight("default").detach().to_dense().numpy().T
            for hf, _ in held
        ]
        np.testing.assert_array_equal(
            np.asarray(layer.get_delta_weight("default")), np.concatenate(parts, axis=1),
            err_msg=path,
        )


# ----------------------------------------------------------------------------- Tunix -> PEFT


def test_export_is_peft_file_and_loads_in_peft(case, tmp_path):
    out = tmp_path / "out"
    bridge.save_peft_adapter(case["model"], out)
    theirs, ours = file_tensors(case["root"] / "peft"), file_tensors(out)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == R and config["random_seed"] == SEED
    assert sorted(config["target_modules"]) == sorted(SEVEN)
    again = strict_from_pretrained(load_hf(case["root"] / "hf"), out)
    assert rel_err(torch_logits(again, IDS), case["peft_logits"]) <= 1e-6  # the same file


def test_orbax_round_trip_keeps_fused_parts(case, tmp_path):
    """sj.save_adapter / load_adapter on a Tunix model: same logits, and a fused kernel keeps
    its per-part budget (LayerState.parts), so the reload still exports per HF linear."""
    sj.save_adapter(case["model"], tmp_path / "ckpt")
    fresh = load_tunix(case["root"] / "hf", case["family"])
    sj.load_adapter(fresh, tmp_path / "ckpt")
    np.testing.assert_array_equal(tunix_logits(fresh), tunix_logits(case["model"]))
    bridge.save_peft_adapter(fresh, tmp_path / "out")
    assert sorted(file_tensors(tmp_path / "out")) == sorted(file_tensors(case["root"] / "peft"))



def test_convert_maps_tunix_paths_both_ways(case, tmp_path):
    """`bridge.peft_to_orbax` / `orbax_to_peft` with a Tunix model: the orbax side holds what
    `sj.save_adapter` writes for that model (same logits after `sj.load_adapter`), the PEFT
    side PEFT's own tensors, bit for bit. `shira-jax convert --model` does the same."""
    from shira_jax.app.cli import main

    family, root = case["family"], case["root"]
    shapes_only = load_tunix(root / "hf", family)  # weights unused: only paths and shapes
    bridge.peft_to_orbax(root / "peft", tmp_path / "ckpt", model=shapes_only)
    fresh = load_tunix(root / "hf", family)
    sj.load_adapter(fresh, tmp_path / "ckpt")
    np.testing.assert_array_equal(tunix_logits(fresh), tunix_logits(case["model"]))
    bridge.orbax_to_peft(tmp_path / "ckpt", tmp_path / "back", model=shapes_only)
    theirs, back = file_tensors(root / "peft"), file_tensors(tmp_path / "back")
    assert sorted(back) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(back[key], theirs[key], err_msg=key)
    if family == "llama":  # the CLI reads a "llama" config.json as shira-jax's Llama
        return
    hf = str(root / "hf")
    assert main(["convert", str(root / "peft"), str(tmp_path / "cli"), "--model", hf]) == 0
    cli = load_tunix(root / "hf", family)
    sj.load_adapter(cli, tmp_path / "cli")
    np.testing.assert_array_equal(tunix_logits(cli), tunix_logits(case["model"]))
    assert main(["convert", str(tmp_path / "cli"), str(tmp_path / "cli_peft"), "--model", hf]) == 0
    assert sorted(file_tensors(tmp_path / "cli_peft")) == sorted(theirs)


# ----------------------------------------------------------------------------- fused kernels


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma") / "hf"
    hf_model("gemma3-kv").save_pretrained(str(path))
    return path


def test_one_part_of_a_fused_kernel(gemma_dir, tmp_path):
    """A PEFT adapter on v_proj only: kv_einsum gets entries in its v block only, and the
    export writes v_proj alone."""
    pm = peft_adapter(load_hf(gemma_dir), tmp_path / "peft", targets=["v_proj"])
    model = load_tunix(gemma_dir, "gemma3")
    bridge.load_peft_adapter(model, tmp_path / "peft")
    kv = model.layers[0].attn.kv_einsum
    cols = np.asarray(kv.shira_indices["default"][...])[1]
    assert cols.size == R * (64 + 2 * 16) and cols.min() >= 2 * 16  # v block: K*H = 32 on
    assert rel_err(tunix_logits(model), torch_logits(pm, IDS)) <= LOGIT_TOL
    bridge.save_peft_adapter(model, tmp_path / "out")
    ours, theirs = file_tensors(tmp_path / "out"), file_tensors(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs) and all("v_proj" in k for k in ours)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_adapter_made_on_a_fused_kernel_is_refused_by_peft_export(gemma_dir, tmp_path):
    model = load_tunix(gemma_dir, "gemma3")
    sj.apply_shira(model, sj.ShiraConfig(r=R, target_modules=["kv_einsum"], random_seed=SEED))
    with pytest.raises(ValueError, match="fused kernel itself"):
        bridge.save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_failed_loads_leave_the_model_unchanged(gemma_dir, tmp_path):
    """Bad files are refused before anything changes: a fused kernel whose second part is
    bad keeps no trace of the good first part."""
    peft_adapter(load_hf(gemma_dir), tmp_path / "good")
    model = load_tunix(gemma_dir, "gemma3")
    snap = snapshot(model)

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        tensors = file_tensors(folder)
        edit(tensors)
        from safetensors.numpy import save_file

        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder

    v_key = "base_model.model.model.layers.1.self_attn.v_proj.shira_indices"

    def out_of_range(t):
        t[v_key] = t[v_key].copy()
        t[v_key][0, -1] = 10_000

    def too_short(t):
        for leaf in ("shira_indices", "shira_weight"):
            key = v_key.replace("shira_indices", leaf)
            t[key] = t[key][..., :-1].copy()

    def unknown_layer(t):
        for key in [k for k in t if ".layers.1." in k]:
            t[key.replace(".layers.1.", ".layers.7.")] = t.pop(key)

    for name, edit, match in (
        ("range", out_of_range, "out of range"),
        ("size", too_short, r"r \* \(in \+ out\)"),
        ("unknown", unknown_layer, "no kernel shape for layer 'model.layers.7"),
    ):
        with pytest.raises(sj.AdapterLoadError, match=match):
            bridge.load_peft_adapter(model, broken(name, edit))
        assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen3")
    hf = hf_model("qwen3")
    hf.save_pretrained(str(root / "hf"))
    peft_adapter(hf, root / "peft")
    return root


def test_apply_shira_wraps_seven_modules_per_layer_with_peft_masks(qwen3_dir, tmp_path):
    """The seven HF names wrap q/k/v/o (Tunix Einsum, N-D kernels) and the MLP; the random
    masks are PEFT's own, index for index (same seed and r), through the [in, out] layout."""
    model = load_tunix(qwen3_dir / "hf", "qwen3")
    sj.apply_shira(model, sj.ShiraConfig(r=R, target_modules=SEVEN, random_seed=SEED))
    for i in range(2):
        names = sorted(p.split(f"layers.{i}.")[1] for p, _ in sj.shira_layers(model)
                       if p.startswith(f"layers.{i}."))
        assert names == sorted(FAMILIES["qwen3"][3])
    bridge.save_peft_adapter(model, tmp_path / "out")
    ours, theirs = file_tensors(tmp_path / "out"), file_tensors(qwen3_dir / "peft")
    assert sorted(ours) == sorted(theirs)
    indices = [k for k in theirs if k.endswith("shira_indices")]
    assert len(indices) == 14
    for key in indices:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_peft_trainer_step_trains_only_shira_values(qwen3_dir):
    """Tunix's PeftTrainer sees ShiraParam as nnx.LoRAParam: one SGD step changes every SHiRA
    value array and leaves every base weight bit-identical."""
    from tunix.sft import peft_trainer, utils

    model = load_tunix(qwen3_dir / "hf", "qwen3")
    bridge.load_peft_adapter(model, qwen3_dir / "peft")
    assert utils.is_lora_enabled(model)
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

    def arrays(filt) -> dict:
        return {k: np.asarray(v[...]).copy() for k, v in nnx.to_flat_state(nnx.state(model, filt))}

    base_before, values_before = arrays(base), arrays(nnx.LoRAParam)

    def model_input(x: peft_trainer.TrainingInput) -> dict:
        b, t = x.input_tokens.shape
        return dict(
            input_tokens=x.input_tokens, input_mask=x.input_mask,
            positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
            attention_mask=lm.attention_mask(jnp.ones((b, t), jnp.int32)),
        )

    config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=1, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optax.sgd(0.1), config)
    trainer.with_gen_model_input_fn(model_input)
    batch = peft_trainer.TrainingInput(input_tokens=IDS.astype(np.int32),
                                       input_mask=np.ones(IDS.shape, bool))
    trainer.train([batch])
    assert trainer.train_steps == 1
    base_after, values_after = arrays(base), arrays(nnx.LoRAParam)
    assert len(values_after) == 14 and len(base_after) > 14
    for key in base_before:
        np.testing.assert_array_equal(base_after[key], base_before[key], err_msg=str(key))
    assert all(not np.array_equal(values_after[k], values_before[k]) for k in values_before)


# ----------------------------------------------------------------------------- models, app


def test_models_build_after_someone_restored_flax_flags(qwen3_dir):
    """Tunix's import turns `flax_always_shard_variable` off once; a test (or user) that turns
    it back on must not break later loads (an xdist order seen in a full run)."""
    import flax

    with flax.config.temp_flip_flag("always_shard_variable", True):
        assert tunix.abstract_model(qwen3_dir / "hf") is not None
    with flax.config.temp_flip_flag("always_shard_variable", True):
        assert tunix.is_tunix_model(bridge.from_pretrained(qwen3_dir / "hf"))


def test_from_pretrained_picks_the_model_by_model_type(qwen3_dir, tmp_path):
    from shira_jax.models import LlamaForCausalLM

    llama = tmp_path / "llama"
    hf_model("llama").save_pretrained(str(llama))
    assert isinstance(bridge.from_pretrained(llama), LlamaForCausalLM)  # ours by default
    assert type(bridge.from_pretrained(llama, implementation="tunix")).__name__ == "Llama3"
    assert type(bridge.from_pretrained(qwen3_dir / "hf")).__name__ == "Qwen3"
    with pytest.raises(ValueError, match="has no shira-jax model"):
        bridge.from_pretrained(qwen3_dir / "hf", implementation="shira")
    from safetensors.numpy import load_file, save_file

    lacking = tmp_path / "no_lm_head"
    shutil.copytree(qwen3_dir / "hf", lacking)
    tensors = load_file(str(lacking / "model.safetensors"))
    del tensors["lm_head.weight"]  # config.json says untied
    save_file(tensors, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"loader failed .*lm_head"):
        bridge.from_pretrained(lacking)
    other = tmp_path / "phi"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    with pytest.raises(ValueError, match="'phi3'.*supported: llama.*qwen3, qwen2, gemma3_text"):
        bridge.from_pretrained(other)


def test_bridge_and_core_import_without_tunix(qwen3_dir):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["tunix"] = None  # any `import tunix...` now fails
        import shira_jax, bridge
        from bridge import tunix
        assert tunix.family_for("gemma3_text").name == "gemma3"
        try:
            bridge.from_pretrained({str(qwen3_dir / "hf")!r})
        except ImportError:
            print("needs tunix")
        print(sorted(m for m in sys.modules if m.startswith(("tunix", "qwix"))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["needs", "tunix", "['tunix']"]  # only our None placeholder
