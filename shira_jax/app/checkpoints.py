"""The training checkpoint behind `--resume`: adapter, optimizer state and `state.json`.

    OUT/checkpoint/adapter/     the adapter (`shira_jax.save_adapter`)
    OUT/checkpoint/optimizer/   the optimizer state, one orbax entry per variable
    OUT/checkpoint/state.json   format, step, config, loss history, optimizer variable paths

The folder is assembled beside its target and swapped in whole (`shira_jax.atomic`), so a
kill at any moment leaves the previous checkpoint or the new one.

Example:
    >>> import tempfile
    >>> from shira_jax.app import checkpoints
    >>> try:
    ...     checkpoints.read_train_state(tempfile.mkdtemp())
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    --resume
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import shira_jax as sj
from shira_jax import atomic
from shira_jax.app.options import FinetuneConfig, FinetuneError

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "shira-jax-train-state"
# Flags a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "data", "r", "targets", "mask", "seq_len", "batch_size", "seed")


def _flat_optimizer(optimizer: nnx.Optimizer) -> tuple[Any, list[tuple[str, nnx.Variable]]]:
    """The optimizer's state and its (dotted path, variable) pairs, in a fixed order."""
    state = nnx.state(optimizer)
    flat = nnx.to_flat_state(state)
    return state, [(".".join(str(k) for k in path), v) for path, v in flat]


def save_train_checkpoint(
    directory: Path,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    state: dict[str, Any],
    adapter_name: str = "default",
) -> None:
    """Write adapter (`save_adapter`), optimizer state (orbax) and `state.json`, atomically.

    The checkpoint is built next to `directory` and renamed into place; the previous one is
    removed only once the new one is whole.
    """
    import orbax.checkpoint as ocp

    _, flat = _flat_optimizer(optimizer)
    with atomic.staging_dir(Path(directory).absolute()) as tmp:
        sj.save_adapter(model, tmp / "adapter", adapter_name=adapter_name)
        tree = {f"{i:05d}": np.asarray(v[...]) for i, (_, v) in enumerate(flat)}
        ocp.PyTreeCheckpointer().save(tmp / "optimizer", tree)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "optimizer_paths": [path for path, _ in flat],
            **state,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def read_train_state(directory: str | Path) -> dict[str, Any]:
    """`state.json` of a training checkpoint (raises FinetuneError if there is none)."""
    path = Path(directory) / "state.json"
    if not path.is_file():
        raise FinetuneError(f"--resume: no checkpoint at {directory} (run without --resume first)")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"--resume: {path} is not a shira-jax training checkpoint")
    return meta


def restore_optimizer(directory: Path, optimizer: nnx.Optimizer, meta: dict[str, Any]) -> None:
    """Load the optimizer state saved by `save_train_checkpoint` into `optimizer`."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(Path(directory).absolute() / "optimizer")
    state, flat = _flat_optimizer(optimizer)
    if [path for path, _ in flat] != meta["optimizer_paths"]:
        raise FinetuneError(
            f"--resume: the optimizer state in {directory} does not fit this adapter "
            "(different layers); start a new run without --resume"
        )
    for i, (path, variable) in enumerate(flat):
        saved = np.asarray(tree[f"{i:05d}"])
        if saved.shape != tuple(variable.shape):
            raise FinetuneError(f"--resume: optimizer entry {path} has shape {saved.shape}")
        variable.set_value(jnp.asarray(saved, variable[...].dtype))
    nnx.update(optimizer, state)


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume(cfg: FinetuneConfig, ckpt_dir: Path) -> dict[str, Any]:
    """The checkpoint's state, after checking it was made with the same data/adapter flags."""
    meta = read_train_state(ckpt_dir)
    saved, now = meta.get("config", {}), cfg.to_dict()
    for key in RESUME_KEYS:
        if _norm(saved.get(key)) != _norm(now[key]):
            raise FinetuneError(
                f"--resume: --{key.replace('_', '-')} is {_norm(now[key])!r} but the "
                f"checkpoint in {ckpt_dir} used {_norm(saved.get(key))!r}"
            )
    return meta
