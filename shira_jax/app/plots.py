"""The loss curve of a fine-tuning run (`OUT/loss.png`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from shira_jax.app.plots import plot_losses
    >>> metrics = {"train_loss": [3.0, 2.5, 2.2, 2.0], "eval_loss": [[0, 3.1], [4, 2.1]],
    ...            "eval_accuracy": [[0, 0.25], [4, 0.75]]}
    >>> path = Path(tempfile.mkdtemp()) / "loss.png"
    >>> plot_losses(metrics, path), path.read_bytes()[:4]
    (True, b'\\x89PNG')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shira_jax import atomic


def plot_losses(metrics: dict[str, Any], path: Path) -> bool:
    """Save the loss curve (train per step, its moving average, eval points, and the eval
    exact-match accuracy of `--eval-generate` when present) as a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = np.asarray(metrics.get("train_loss") or [], float)
    if len(train):
        steps = np.arange(1, len(train) + 1)
        ax.plot(steps, train, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        k = max(1, min(10, len(train) // 5))
        if k > 1:
            smooth = np.convolve(train, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=2, label=f"train ({k}-step mean)")
    evals = metrics.get("eval_loss") or []
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="tab:red", lw=1.5, label="eval (held-out text)")
    accuracy = metrics.get("eval_accuracy") or []
    if accuracy:  # --eval-generate: exact match on a second axis
        acc_ax = ax.twinx()
        xs, ys = zip(*accuracy)
        acc_ax.plot(xs, [100 * y for y in ys], "s--", color="tab:green", label="exact match (%)")
        acc_ax.set_ylabel("eval exact match (%)", color="tab:green")
        acc_ax.set_ylim(0, 100)
        acc_ax.legend(loc="center right")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    cfg = metrics.get("config", {})
    ax.set_title(
        f"SHiRA r={cfg.get('r')} {cfg.get('mask')} on {Path(str(cfg.get('data'))).name} "
        f"({Path(str(cfg.get('model'))).name})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    return True
