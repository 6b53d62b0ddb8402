"""Merged-mode switching scenarios, run in the pytest process (one device) and by
`switching_worker.py` on a simulated 8-device mesh (kernels split over it)."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
from conftest import stacked_blocks
from flax import nnx

import shira_jax as sj
from shira_jax import sharding

NAMES = ("a", "b", "c")
D, H = 16, 32


def _meta(spec):
    return {} if spec is None else {"out_sharding": spec}


class Net(nnx.Module):
    """Two same-shaped layers (one program for both) and a third shape; optional TP specs."""

    def __init__(self, dtype, rngs: nnx.Rngs, tp: bool = False):
        col, row = ((None, "model"), ("model", None)) if tp else (None, None)
        kw = dict(param_dtype=dtype, rngs=rngs, use_bias=False)
        self.up = nnx.Linear(D, H, kernel_metadata=_meta(col), **kw)
        self.gate = nnx.Linear(D, H, kernel_metadata=_meta(col), **kw)
        self.down = nnx.Linear(H, D, kernel_metadata=_meta(row), **kw)


class Block(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, H, param_dtype=dtype, rngs=rngs)
        self.o_proj = nnx.Linear(H, D, param_dtype=dtype, rngs=rngs)


class Stacked(nnx.Module):
    """Scan-stacked blocks: kernels [3, in, out]."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        self.layers = stacked_blocks(lambda r: Block(dtype, r), 3, rngs)


def build(kind: str, dtype, mesh=None) -> nnx.Module:
    """`kind` in plain / stacked; on `mesh`, plain kernels are split (tensor parallel)."""
    if kind == "plain":
        model = Net(dtype, nnx.Rngs(0), tp=mesh is not None)
    else:
        model = Stacked(dtype, nnx.Rngs(0))
    if mesh is not None:
        model = sharding.shard_model(model, mesh)
    targets = ["up", "gate", "down", "q_proj", "o_proj"]
    for i, name in enumerate(NAMES):
        cfg = sj.ShiraConfig(r=2, target_modules=targets, random_seed=i, init_weights=False)
        sj.apply_shira(model, cfg, name, key=jax.random.key(10 + i))
    return model


def kernels(model) -> dict[str, np.ndarray]:
    return {p: np.asarray(layer.base_layer.kernel[...]) for p, layer in sj.shira_layers(model)}


def expected(model, base: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A fresh single merge of `name` into `base`: each entry summed in float32, rounded once."""
    out = {}
    for path, layer in sj.shira_layers(model):
        kernel = base[path].copy()
        flat = kernel.reshape(-1)
        idx = np.asarray(layer.shira_indices[name][...]).astype(np.int64)
        vals = np.asarray(layer.shira_weight[name][...], np.float32)
        n_in, n_out = kernel.shape[-2:]
        pos = idx[..., 0, :] * n_out + idx[..., 1, :]
        if kernel.ndim == 3:
            pos = pos + (np.arange(kernel.shape[0]) * n_in * n_out)[:, None]
        pos = pos.reshape(-1)
        scale = np.float32(layer.scaling[name])
        flat[pos] = (flat[pos].astype(np.float32) + scale * vals.reshape(-1)).astype(kernel.dtype)
        out[path] = kernel
    return out


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


def thousand_switches(model, n: int = 1000, seed: int = 0) -> dict[str, bool]:
    """`n` switches among three adapters through every merged-mode path, then checks."""
    base = kernels(model)
    shardings = {p: str(layer.base_layer.kernel.get_value().sharding)
                 for p, layer in sj.shira_layers(model)}
    rng = random.Random(seed)
    sj.set_adapter(model, "a")
    sj.merge(model)
    current, disabled_ok = "a", True
    for k in range(n):
        new = rng.choice([m for m in NAMES if m != current])
        how = k % 4
        if how == 0:
            sj.switch_adapter(model, current, new)
        elif how == 1:
            sj.set_adapter(model, new)  # merged mode: swapped in place
        elif how == 2:
            sj.unmerge(model)
            sj.merge(model, [new])
            sj.set_adapter(model, new)
        else:
            with sj.disable_adapter(model):
                if k % 100 == 3:
                    disabled_ok &= same_bits(kernels(model), base)
            sj.switch_adapter(model, current, new)
        current = new
    layers = [layer for _, layer in sj.shira_layers(model)]
    out = {
        "state": all(layer.merged_adapters == (current,) for layer in layers)
        and sj.active_adapters(model) == (current,),
        "merged_exact": same_bits(kernels(model), expected(model, base, current)),
        "disabled_is_base": disabled_ok,
        "sharding_kept": all(str(layer.base_layer.kernel.get_value().sharding) == shardings[p]
                             for p, layer in sj.shira_layers(model)),
    }
    sj.unmerge(model)
    out["unmerge_exact"] = same_bits(kernels(model), base)
    out["unmerged"] = all(not layer.merged_adapters for layer in layers)
    return out


def bank_round_trip(model, storage: str) -> dict[str, bool]:
    """AdapterBank switches give the same kernels as a fresh merge; None gives the base."""
    base = kernels(model)
    bank = sj.AdapterBank(model, storage=storage)
    for name in NAMES:
        bank.add_from_model(name)
    ok = True
    order = ["b", "a", "c", "a", "b", "c", "c"]
    for name in order:
        bank.switch(name)
        ok &= same_bits(kernels(model), expected(model, base, name))
    bank.switch(None)
    return {"merged_exact": bool(ok), "unmerge_exact": same_bits(kernels(model), base),
            "times": len(bank.times) == len(order) + 1 and all(t > 0 for t in bank.times)}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
