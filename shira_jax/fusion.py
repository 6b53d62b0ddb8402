"""Multi-adapter fusion: weighted sums of SHiRA adapters, and the paper's AWOM / AWOR.

Sparse deltas add exactly, so a weighted fusion of SHiRA adapters is itself one sparse
adapter on the union of their indices.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> class Net(nnx.Module):
    ...     def __init__(self):
    ...         self.proj = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    >>> net = Net()
    >>> _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"], random_seed=1,
    ...                                        init_weights=False), "a")
    >>> _ = sj.apply_shira(net, sj.ShiraConfig(r=1, target_modules=["proj"], random_seed=2,
    ...                                        init_weights=False), "b")
    >>> sj.fuse_adapters(net, {"a": 1.0, "b": 0.5}, "ab")
    >>> d = net.proj.get_delta_weight
    >>> bool(jnp.allclose(d("ab"), d("a") + 0.5 * d("b")))
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import masks
from shira_jax.config import stored_indices_mask_fn
from shira_jax.layer import ShiraDense
from shira_jax.model import active_adapters, adapter_configs, require_adapters, shira_layers
from shira_jax.util import check_adapter_name


def fuse_adapters(model: nnx.Module, weights: Mapping[str, float], new_name: str) -> None:
    """Add adapter `new_name` = sum of `weight * scaling * delta` of the given adapters.

    The result lives on the union of their indices (overlaps add up); it is inactive until
    `set_adapter(model, new_name)`, like any later adapter, and can be merged or saved.
    """
    check_adapter_name(new_name)
    if not weights:
        raise ValueError("fuse_adapters needs at least one adapter weight.")
    require_adapters(model, list(weights))
    layers = shira_layers(model)
    if any(new_name in layer.adapter_names for _, layer in layers):
        raise ValueError(f"Adapter {new_name!r} already exists; pick another name.")
    plans = []
    for path, layer in layers:
        parts = [(a, w) for a, w in weights.items() if a in layer.adapter_names]
        if parts:
            plans.append((layer, *_fused(layer, parts, path)))
    active = active_adapters(model)
    for layer, idx, values in plans:
        layer.add_adapter(
            new_name,
            idx,
            r=max(layer.r[a] for a in weights if a in layer.r),
            values=values,
            active=new_name in active,
        )
    first = adapter_configs(model).get(next(iter(weights)))
    if first is not None:
        model.shira_configs = {
            **adapter_configs(model),
            new_name: first.replace(mask_type="custom", mask_fn=stored_indices_mask_fn),
        }


def _fused(
    layer: ShiraDense, parts: list[tuple[str, float]], path: str
) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([np.asarray(layer.shira_indices[a][...]) for a, _ in parts], axis=1)
    vals = np.concatenate(
        [
            float(w) * layer.scaling[a] * np.asarray(layer.shira_weight[a][...], np.float32)
            for a, w in parts
        ]
    )
    return masks.canonicalize(idx, vals, (layer.in_features, layer.out_features))


def awom(delta_a: jnp.ndarray, delta_b: jnp.ndarray) -> float:
    """Adapter Weight Orthogonality Magnitude, `||A^T B||_2` (spectral norm); 0 = orthogonal."""
    return float(jnp.linalg.norm(delta_a.T @ delta_b, ord=2))


def awor(delta_a: jnp.ndarray, delta_b: jnp.ndarray) -> float:
    """Adapter Weight Orthogonality Ratio, `1 - nnz(A^T B) / size(A^T B)`; 1 = orthogonal."""
    product = delta_a.T @ delta_b
    return float(1.0 - jnp.count_nonzero(product) / product.size)


def adapter_orthogonality(model: nnx.Module, a: str, b: str) -> dict[str, dict[str, float]]:
    """AWOM and AWOR of adapters `a` and `b` on every layer that has both, plus their mean.

    Returns `{path: {"awom": ..., "awor": ...}, ..., "mean": {...}}`.
    """
    require_adapters(model, [a, b])
    out: dict[str, dict[str, float]] = {}
    for path, layer in shira_layers(model):
        if a in layer.adapter_names and b in layer.adapter_names:
            da, db = layer.get_delta_weight(a), layer.get_delta_weight(b)
            out[path] = {"awom": awom(da, db), "awor": awor(da, db)}
    if not out:
        raise ValueError(f"No layer holds both {a!r} and {b!r}.")
    out["mean"] = {k: float(np.mean([v[k] for v in out.values()])) for k in ("awom", "awor")}
    return out
