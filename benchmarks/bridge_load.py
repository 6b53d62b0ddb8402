"""Benchmark 5: the bridge. Loading a 7B-sized PEFT SHiRA adapter, and base-weight throughput.

* A synthetic PEFT SHiRA adapter with Llama-3.2-3B's q_proj + v_proj shapes at r=32 (28 layers,
  9,175,040 values, the size PEFT's own benchmark quotes) is loaded with
  `bridge.load_peft_adapter` into an NNX skeleton with those module paths (bf16 kernels), vs
  reading the same `adapter_model.safetensors` with `safetensors.numpy.load_file` (the I/O bound).
* Base weights: `bridge.from_pretrained` of a SmolLM2-135M-shaped checkpoint (random weights,
  written once by `bridge.save_pretrained`) vs reading its `model.safetensors` with NumPy.

Both pairs are interleaved; files are read from the page cache after the warm-up round.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shira_jax as sj
from benchmarks.common import SMOLLM2, TINY_LLAMA, Section, jax_llama, paired, ratio_figure

# Llama-3.2-3B attention shapes: hidden 3072, 24 heads, 8 KV heads of 128, 28 layers.
LLAMA32_3B = dict(layers=28, hidden=3072, kv=1024, r=32)
TINY = dict(layers=2, hidden=64, kv=32, r=4)


class _Attn(nnx.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        kw = dict(use_bias=False, param_dtype=jnp.bfloat16, kernel_init=nnx.initializers.zeros,
                  rngs=nnx.Rngs(0))
        self.q_proj = nnx.Linear(hidden, hidden, **kw)
        self.v_proj = nnx.Linear(hidden, kv, **kw)


class _Layer(nnx.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        self.self_attn = _Attn(hidden, kv)


class _Inner(nnx.Module):
    def __init__(self, layers: int, hidden: int, kv: int) -> None:
        self.layers = nnx.List([_Layer(hidden, kv) for _ in range(layers)])


class Skeleton(nnx.Module):
    """`model.layers.N.self_attn.{q,v}_proj`, the module paths of an HF Llama."""

    def __init__(self, layers: int, hidden: int, kv: int) -> None:
        self.model = _Inner(layers, hidden, kv)


def write_adapter(folder: Path, layers: int, hidden: int, kv: int, r: int = 32) -> int:
    """A PEFT SHiRA directory (torch-order indices, float32 values); returns the value count."""
    from bridge.peft import peft_config_dict, write_peft_dir

    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    total = 0
    for i in range(layers):
        for name, (n_out, n_in) in {"q_proj": (hidden, hidden), "v_proj": (kv, hidden)}.items():
            nnz = r * (n_in + n_out)
            flat = np.sort(rng.choice(n_out * n_in, nnz, replace=False))
            idx = np.stack([flat // n_in, flat % n_in]).astype(np.int32)  # torch [out, in] order
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.shira_indices"] = idx
            tensors[f"{key}.shira_weight"] = rng.standard_normal(nnz).astype(np.float32)
            total += nnz
    config = sj.ShiraConfig(r=r, target_modules=["q_proj", "v_proj"], random_seed=42)
    write_peft_dir(folder, tensors, peft_config_dict(config))
    return total


def run(quick: bool = False) -> Section:
    section = Section(
        "5. Bridge: PEFT adapter load and base-weight load",
        "python -m benchmarks.run --only bridge_load" + (" --quick" if quick else ""),
    )
    t0 = time.perf_counter()
    try:
        from safetensors.numpy import load_file

        import bridge
        from bridge.peft import load_peft_adapter  # noqa: F401 - availability check
    except ImportError as err:  # the bridge is written beside this benchmark
        section.text = f"- pending: the bridge is not importable yet ({err})."
        section.seconds = time.perf_counter() - t0
        return section
    reps = dict(reps=1, warmup=1) if quick else dict(reps=5, warmup=1)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        # ---- PEFT adapter: 9.2M values
        shape = TINY if quick else LLAMA32_3B
        folder = Path(tmp) / "adapter"
        total = write_adapter(folder, **shape)
        model = Skeleton(shape["layers"], shape["hidden"], shape["kv"])
        file = folder / "adapter_model.safetensors"

        def load() -> Any:
            bridge.load_peft_adapter(model, folder, adapter_name="default")
            return [layer.shira_weight["default"][...] for _, layer in sj.shira_layers(model)]

        def reset() -> None:
            if "default" in sj.adapter_names(model):
                sj.delete_adapter(model, "default")

        times = paired({"bridge.load_peft_adapter": load,
                        "numpy safetensors read": lambda: load_file(file)},
                       setup={"bridge.load_peft_adapter": reset}, **reps)
        size_mb = file.stat().st_size / 1e6
        section.figures.append(ratio_figure(
            f"PEFT SHiRA adapter ({total:,} values, {size_mb:.0f} MB): bridge load / numpy read",
            times, "bridge.load_peft_adapter", "numpy safetensors read",
            note="includes checks, torch->kernel index order, placing into the model"))
        rate = total / np.median(times["bridge.load_peft_adapter"]) / 1e6
        notes.append(
            f"adapter: {shape['layers']} layers x (q_proj, v_proj), r={shape['r']}, "
            f"{total:,} values, {size_mb:.1f} MB; load {rate:.0f} M values/s."
        )
        reset()
        # ---- base weights: SmolLM2-135M shapes
        base = jax_llama(TINY_LLAMA if quick else SMOLLM2, 1 if quick else 30)
        ckpt = Path(tmp) / "model"
        bridge.save_pretrained(base, ckpt)
        del base
        weights = ckpt / "model.safetensors"
        times = paired({"bridge.from_pretrained": lambda: jax.tree.leaves(
                            nnx.state(bridge.from_pretrained(ckpt))),
                        "numpy safetensors read": lambda: load_file(weights)}, **reps)
        size_mb = weights.stat().st_size / 1e6
        fig = ratio_figure(
            f"base weights ({'tiny Llama' if quick else 'SmolLM2-135M shapes'}, "
            f"{size_mb:.0f} MB fp32): bridge.from_pretrained / numpy read",
            times, "bridge.from_pretrained", "numpy safetensors read",
            note="includes building the NNX model, transposes, placing on device")
        section.figures.append(fig)
        notes.append(
            f"base weights: {size_mb:.0f} MB; bridge {size_mb / fig.contender * 1e3:.0f} MB/s, "
            f"numpy {size_mb / fig.baseline * 1e3:.0f} MB/s."
        )
    section.text = "\n".join(f"- {n}" for n in notes)
    section.seconds = time.perf_counter() - t0
    return section


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv).markdown())
