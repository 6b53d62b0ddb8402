"""Every notebook in notebooks/ executes at tiny size and prints what it promises.

Each notebook reads `SHIRA_NB_SIZE` in its first code cell; here it is "tiny" (a tiny random
Llama or Qwen3, a few steps), so they run in a few minutes on 2 CPU cores. The notebooks are
executed in memory (kernel `python3` of this interpreter, cwd `notebooks/`); the committed
files, saved with their full-size outputs, are never overwritten. The executed copies are
written to pytest's tmp_path for inspection.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = {
    "01_quickstart": NB_DIR / "01_quickstart.ipynb",
    "02_peft_roundtrip": NB_DIR / "02_peft_roundtrip.ipynb",
    "03_masks_and_fusion": NB_DIR / "03_masks_and_fusion.ipynb",
    "04_rapid_switching": NB_DIR / "04_rapid_switching.ipynb",
    "05_tunix": NB_DIR / "05_tunix.ipynb",
}
CELL_TIMEOUT_S = 600
LOGIT_TOL = 1e-3  # float32 on both sides; tiny runs agree to ~1e-6


def _stdout(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                out.append(o["text"])
            elif o.get("output_type") in ("execute_result", "display_data"):
                out.append(o.get("data", {}).get("text/plain", ""))
    return "".join(out)


def _n_figures(nb) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def _execute(name: str, tmp_path: Path):
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    for cell in nb.cells:  # start from a clean copy, whatever was saved
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {**os.environ, "SHIRA_NB_SIZE": "tiny", "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",  # jupyter_client runs "python" kernels with sys.executable
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, tmp_path / f"{name}.tiny.ipynb")
    return nb


@pytest.fixture(scope="module", autouse=True)
def _kernel_is_this_python():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    if exe not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        assert Path(exe).resolve() == Path(sys.executable).resolve(), (
            f"kernel python3 runs {exe}, not this interpreter {sys.executable}"
        )


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_committed_notebook_has_full_size_outputs(name):
    """The committed notebooks carry the outputs of a full-size run, and read the size knob."""
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "SHIRA_NB_SIZE" in code[0].source, "the first code cell must read SHIRA_NB_SIZE"
    text = _stdout(nb)
    assert "size=full" in text, f"{name} was not saved from a full-size run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), (
        f"{name} was saved with an error output"
    )
    assert all(c.execution_count for c in code), f"{name} has cells that were not executed"


@pytest.mark.slow
def test_01_quickstart(tmp_path):
    nb = _execute("01_quickstart", tmp_path)
    text = _stdout(nb)
    assert "size=tiny" in text
    assert _n_figures(nb) >= 1, "no loss plot"
    (before,) = _floats(r"eval loss before: ([0-9.]+)", text)
    (after,) = _floats(r"eval loss after:\s+([0-9.]+)", text)
    assert after < before, (before, after)
    (diff,) = _floats(r"PEFT \(torch\) vs shira_jax logits .*max \|diff\| = ([0-9.e+-]+)", text)
    assert diff < LOGIT_TOL
    assert "bit-identical to before: True" in text
    assert "is Linear" in text  # merge_and_unload left a plain nnx.Linear


@pytest.mark.slow
def test_02_peft_roundtrip(tmp_path):
    nb = _execute("02_peft_roundtrip", tmp_path)
    text = _stdout(nb)
    assert "size=tiny" in text
    diffs = _floats(r"max \|logits diff\| = ([0-9.e+-]+)", text)
    assert len(diffs) >= 3, text
    assert max(diffs) < LOGIT_TOL, diffs
    same, total = map(int, re.search(r"(\d+) of (\d+) layers: PEFT's indices", text).groups())
    assert same == total > 0


@pytest.mark.slow
def test_03_masks_and_fusion(tmp_path):
    nb = _execute("03_masks_and_fusion", tmp_path)
    text = _stdout(nb)
    assert "size=tiny" in text
    assert _n_figures(nb) >= 2, "expected the mask and the fusion plots"
    for label in ("SHiRA-random", "SHiRA-weight_magnitude", "SHiRA-snip", "LoRA"):
        assert re.search(rf"{label}\s+[\d,]+ trainable\s+eval loss [0-9.]+", text), label
    assert "Ranking: " in text and "won with held-out loss" in text
    assert "B_overlap: shares 100%" in text and "B_disjoint: shares 0%" in text
    (fused_diff,) = _floats(r"logits\(fused\)\| = ([0-9.e+-]+)", text)
    assert fused_diff < 1e-4
    assert re.search(r"Orthogonality: AWOR .*SHiRA-WM non-overlapping [0-9.]+", text)


@pytest.mark.slow
def test_04_rapid_switching(tmp_path):
    nb = _execute("04_rapid_switching", tmp_path)
    text = _stdout(nb)
    assert "size=tiny" in text
    assert _n_figures(nb) >= 1, "no timing plot"
    assert "base weights bit-identical: True" in text
    assert re.search(r"whole-model switch, jitted: .*SHiRA is [0-9.]+x faster", text)
    assert len(re.findall(r"d =\s+\d+: .* speedup\s+[0-9.]+x", text)) >= 2
    drifts = _floats(r"max \|W - W0\|: SHiRA ([0-9.e+-]+)", text)
    assert drifts and all(d == 0.0 for d in drifts), drifts


@pytest.mark.slow
def test_05_tunix(tmp_path):
    nb = _execute("05_tunix", tmp_path)
    text = _stdout(nb)
    assert "size=tiny" in text
    assert _n_figures(nb) >= 1, "no loss plot"
    (into,) = _floats(r"PEFT -> Tunix: max \|logits diff\| = ([0-9.e+-]+)", text)
    (back,) = _floats(r"Tunix -> PEFT: max \|logits diff\| = ([0-9.e+-]+)", text)
    assert max(into, back) < LOGIT_TOL, (into, back)
    assert "base weights bit-identical after PeftTrainer: True" in text
    hit = re.search(r"SHiRA value arrays changed: (\d+) of (\d+)", text)
    changed, total = map(int, hit.groups())
    assert changed == total == 14
    assert "indices rebuilt from the seed equal the trained model's: True" in text
    (restored,) = _floats(r"restored at step \d+: max \|logits diff\| = ([0-9.e+-]+)", text)
    assert restored == 0.0
