"""Notebooks 01-03 execute at tiny size and print what they promise; every committed notebook
carries full-size outputs (helpers: `tests/notebook_support.py`; 04-05 in
`tests/test_notebooks_more.py`, a second file so that `--dist loadfile` runs both halves in
parallel)."""

from __future__ import annotations

import re

import pytest
from notebook_support import (  # noqa: F401 - the autouse fixture applies where imported
    LOGIT_TOL,
    NOTEBOOKS,
    _execute,
    _floats,
    _kernel_is_this_python,
    _n_figures,
    _stdout,
    nbformat,
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
    # section 4 shows the committed `make quality` study: its main plot and its verdict
    assert _n_figures(nb) >= 3
    assert re.search(r"Study \(make quality\): On q\+v after \d+ steps", text)
