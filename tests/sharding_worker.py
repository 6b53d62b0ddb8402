"""Run the scenarios of `sharding_cases` on N simulated CPU devices (its own process).

    python tests/sharding_worker.py N OUT.npz MODE[,MODE...] [CKPT_DIR]

MODE: train (dp, tp, fsdp, fsdp_full + stacked + N-D kernels; saves checkpoints to
CKPT_DIR), restore (loads them), bench. The device count must be fixed before jax is
imported, hence a process.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xla_flags import SLOW_COLLECTIVES  # noqa: E402

n_devices = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={n_devices}"
    + SLOW_COLLECTIVES
)
os.environ["JAX_PLATFORMS"] = "cpu"

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sharding_cases as cases  # noqa: E402


def main() -> None:
    out_path, modes = sys.argv[2], sys.argv[3].split(",")
    ckpt = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    assert jax.device_count() == n_devices, jax.devices()
    mesh = cases.mesh_for(n_devices)
    results: dict[str, np.ndarray] = {}
    if "train" in modes:
        for layout in cases.LAYOUTS:
            for k, v in cases.train_case(layout, mesh, ckpt).items():
                results[f"{layout}/{k}"] = v
        for k, v in cases.stacked_case(mesh, ckpt).items():
            results[f"stacked/{k}"] = v
        for k, v in cases.scatter_case(mesh).items():
            results[f"scatter/{k}"] = v
        for k, v in cases.nd_case(mesh).items():
            results[f"nd/{k}"] = v
        for k, v in cases.sparse_case(mesh).items():
            results[f"sparse/{k}"] = v
    if "restore" in modes:
        for k, v in cases.restore_case(mesh, ckpt).items():
            results[f"restore/{k}"] = v
    if "bench" in modes:
        for layout in ("dp", "tp", "fsdp"):
            results[f"bench/{layout}"] = np.array(cases.bench(mesh, layout)["step_s"])
    np.savez(out_path, **results)


if __name__ == "__main__":
    main()
