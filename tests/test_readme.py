"""The README's quickstart runs as written, and the demo command does real work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("/tmp/shira_ckpt", str(tmp_path / "ckpt"))
    exec(compile(code, "README.md", "exec"), {})
    loss = float(re.search(r"loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert loss < 0.3
    assert (tmp_path / "ckpt" / "shira_adapter.json").exists()


def test_cli_demo_trains(capsys):
    from shira_jax.app.cli import main

    assert main(["demo", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "merged: MSE" in out and "rank of the learned delta" in out
