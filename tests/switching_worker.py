"""Run `switching_cases` on N simulated CPU devices (its own process: the device count must
be fixed before jax is imported).

    python tests/switching_worker.py N OUT.npz N_SWITCHES
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

import jax  # noqa: E402
import numpy as np  # noqa: E402
import switching_cases as cases  # noqa: E402

from shira_jax import sharding  # noqa: E402


def main() -> None:
    out_path, n = sys.argv[2], int(sys.argv[3])
    assert jax.device_count() == n_devices, jax.devices()
    mesh = sharding.make_mesh("data=2,model=4")
    results: dict[str, np.ndarray] = {}
    with jax.set_mesh(mesh):
        for dtype_name, dtype in cases.DTYPES.items():
            for kind in ("plain", "stacked"):
                model = cases.build(kind, dtype, mesh)
                split = [len(layer.base_layer.kernel.get_value().sharding.device_set)
                         for _, layer in cases.sj.shira_layers(model)]
                results[f"{kind}/{dtype_name}/on_mesh"] = np.array(min(split) == n_devices)
                for key, ok in cases.thousand_switches(model, n).items():
                    results[f"{kind}/{dtype_name}/{key}"] = np.array(ok)
                if kind == "plain" and dtype_name == "bfloat16":  # (others: in pytest)
                    for key, ok in cases.bank_round_trip(model, "device").items():
                        results[f"{kind}/{dtype_name}/bank_{key}"] = np.array(ok)
    np.savez(out_path, **results)


if __name__ == "__main__":
    main()
