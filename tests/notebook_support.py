"""Running notebooks in the tests (`tests/test_notebooks*.py`): every notebook in notebooks/
executes at tiny size and prints what it promises.

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


