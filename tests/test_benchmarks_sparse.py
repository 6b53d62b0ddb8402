"""`make bench --quick`'s sparse-path and quantized-base sections run (tiny sizes, one round,
no timing assertions); the other sections run in tests/test_benchmarks.py."""

from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_bench_quick_writes_the_sparse_path_section(tmp_path):
    from benchmarks import run

    out = tmp_path / "BENCHMARKS.md"
    assert run.main(["--quick", "--only", "sparse_modes,quantized", "--out", str(out)]) == 0
    text = out.read_text()
    for title in ("6. The sparse path", "## Goals", "Crossover, one layer's forward",
                  "mixed batch", "int8 base + SHiRA adapter bytes", "train step q+v: auto",
                  "7. Quantized bases", "int8 QSHiRA sparse product", "QSHiRA / qwix QLoRA"):
        assert title in text, title
    for line in text.splitlines():
        if line.startswith("| ") and "x** |" in line:
            ratio = float(line.split("**")[1].rstrip("x"))
            assert math.isfinite(ratio) and ratio > 0, line
