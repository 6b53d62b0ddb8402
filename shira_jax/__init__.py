"""shira-jax: Sparse High Rank Adapters (SHiRA) for JAX / Flax NNX.

Example:
    >>> import shira_jax as sj
    >>> cfg = sj.ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], random_seed=42)
    >>> cfg.r
    32
"""

from shira_jax import functional, kernels, masks, ops, sharding, stacked, state
from shira_jax.bank import AdapterBank
from shira_jax.checkpoint import load_adapter, save_adapter
from shira_jax.config import ShiraConfig, matches_target
from shira_jax.errors import AdapterLoadError
from shira_jax.fusion import adapter_orthogonality, awom, awor, fuse_adapters
from shira_jax.kernels import register_kernel
from shira_jax.layer import (
    ShiraDense,
    ShiraFrozenValues,
    ShiraIndices,
    ShiraMergeBackup,
    ShiraParam,
)
from shira_jax.model import (
    active_adapters,
    adapter_configs,
    adapter_index,
    adapter_names,
    apply_shira,
    calibration_gradients,
    delete_adapter,
    disable_adapter,
    merge,
    merge_and_unload,
    mixed_adapters,
    set_adapter,
    set_scale,
    shira_layers,
    switch_adapter,
    unmerge,
)
from shira_jax.modules_to_save import ModulesToSave, ShiraModuleParam
from shira_jax.state import AdapterState, LayerState

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterLoadError",
    "AdapterState",
    "LayerState",
    "ModulesToSave",
    "ShiraConfig",
    "ShiraDense",
    "ShiraFrozenValues",
    "ShiraIndices",
    "ShiraMergeBackup",
    "ShiraModuleParam",
    "ShiraParam",
    "active_adapters",
    "adapter_configs",
    "adapter_index",
    "adapter_names",
    "adapter_orthogonality",
    "apply_shira",
    "awom",
    "awor",
    "calibration_gradients",
    "delete_adapter",
    "disable_adapter",
    "functional",
    "kernels",
    "fuse_adapters",
    "load_adapter",
    "masks",
    "matches_target",
    "merge",
    "merge_and_unload",
    "mixed_adapters",
    "ops",
    "register_kernel",
    "save_adapter",
    "set_adapter",
    "set_scale",
    "sharding",
    "shira_layers",
    "stacked",
    "state",
    "switch_adapter",
    "unmerge",
]
