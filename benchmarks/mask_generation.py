"""Benchmark 4: the PEFT-exact random mask (no torch, O(nnz)) vs PEFT's own `random_mask`.

shira-jax reproduces `torch.randperm(out * in, generator=seeded)[:nnz]` from the MT19937 stream
without materialising the permutation; PEFT builds the whole permutation (int64, in*out) and a
dense 0/1 mask. Both run in the same run, interleaved (PEFT in the torch child process), and
the masks are checked to be the same positions. Memory: Python's tracemalloc peak for ours
(NumPy allocations are traced), the child's peak-RSS (VmHWM) growth for PEFT.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from typing import Any

import numpy as np

import shira_jax as sj
from benchmarks.common import Figure, Section, paired, ratio_figure, torch_threads
from benchmarks.torch_worker import TorchWorker

SEED = 42


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM; unlike getrusage's ru_maxrss it is not
    inherited from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peft_mask_fns(n_in: int, n_out: int, r: int) -> dict[str, Any]:
    """In the torch child: PEFT's random_mask on a Linear(n_in, n_out) (weight [out, in])."""
    import torch
    from peft.tuners.shira.mask_functions import random_mask

    torch_threads()
    layer = torch.nn.Linear(n_in, n_out, bias=False, device="cpu")
    state: dict[str, Any] = {}

    def run() -> None:
        state.pop("mask", None)
        before = _peak_rss_kib()
        mask = random_mask(layer, r, random_seed=SEED)
        state.setdefault("rss_kib", _peak_rss_kib() - before)
        state["mask"] = mask

    def positions() -> np.ndarray:
        out_idx, in_idx = torch.where(state["mask"])
        return np.stack([in_idx.numpy(), out_idx.numpy()]).astype(np.int32)

    return {"PEFT random_mask": run, "positions": positions,
            "rss": lambda: state.get("rss_kib", 0)}


def run(quick: bool = False) -> Section:
    n_in, n_out, r = (256, 512, 4) if quick else (4096, 14336, 32)
    section = Section(
        f"4. Mask generation: PEFT-exact random mask, {n_in} x {n_out}, r={r}",
        "python -m benchmarks.run --only mask_generation" + (" --quick" if quick else ""),
    )
    t0 = time.perf_counter()
    tracemalloc.start()
    ours = sj.masks.random_mask(n_in, n_out, r, seed=SEED)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with TorchWorker("benchmarks.mask_generation:peft_mask_fns",
                     dict(n_in=n_in, n_out=n_out, r=r)) as worker:
        times = paired(
            {"shira-jax random_mask": lambda: sj.masks.random_mask(n_in, n_out, r, seed=SEED),
             "PEFT random_mask": worker.fn("PEFT random_mask")},
            reps=1 if quick else 5, warmup=1,
        )
        # kernel layout [in, out] sorted row-major; PEFT's mask is torch's [out, in]
        theirs = worker.call("positions")
        order = np.lexsort((theirs[1], theirs[0]))
        same = bool(np.array_equal(np.asarray(ours), theirs[:, order]))
        peft_rss = worker.call("rss") * 1024
    nnz = r * (n_in + n_out)
    fig = ratio_figure(f"random mask {n_in}x{n_out} r={r}: shira-jax / PEFT random_mask", times,
                       "shira-jax random_mask", "PEFT random_mask",
                       note=f"same positions as PEFT: {'yes' if same else 'NO'}")
    section.figures.append(fig)
    section.figures.append(
        Figure(f"random mask {n_in}x{n_out} r={r}: shira-jax time (goal on the absolute time)",
               fig.contender / 500.0, fig.contender, 500.0, "ms", "<= 1.0",
               note="ratio to the issue's 0.5 s budget")
    )
    mib = 2.0**20
    section.figures.append(
        Figure(f"random mask {n_in}x{n_out} r={r}: peak memory, shira-jax / PEFT",
               peak / max(peft_rss, 1), peak / mib, peft_rss / mib, "MiB",
               note="ours: tracemalloc peak; PEFT: peak-RSS growth of its process")
    )
    section.text = (
        f"- nnz = r * (in + out) = {nnz:,}; in * out = {n_in * n_out:,}. PEFT draws a full "
        f"`randperm(in * out)` (int64: {8 * n_in * n_out / mib:.0f} MiB) and a dense mask; "
        f"shira-jax walks only the first nnz Fisher-Yates steps, so time and memory grow with "
        f"nnz ({peak / mib:.1f} MiB traced at peak, about {peak / nnz:.0f} bytes per entry)."
    )
    section.seconds = time.perf_counter() - t0
    return section


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv).markdown())
