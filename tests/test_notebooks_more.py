"""Notebooks 04-05 execute at tiny size and print what they promise (the second half of
`tests/test_notebooks.py`, split for `--dist loadfile` balance)."""

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
