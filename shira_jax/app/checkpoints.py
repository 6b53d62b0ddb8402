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
import shutil
from pathlib import Path
from typing import Any

import jax
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

    Every process calls it. The checkpoint is assembled in the fixed sibling
    `atomic.sibling(directory, "tmp")` (the same name on every process): process 0 prepares
    it, every process writes its own shards of the adapter and optimizer arrays into it, and
    process 0 writes `state.json` and swaps it in (`atomic.replace_dir`); the previous
    checkpoint is removed only once the new one is whole.
    """
    import orbax.checkpoint as ocp

    _, flat = _flat_optimizer(optimizer)
    target = Path(directory).absolute()
    tmp = atomic.sibling(target, "tmp")
    lead = jax.process_index() == 0
    if lead:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.recover_dir(target, clean=True)  # finish or undo a killed save, drop leftovers
        tmp.mkdir()
    _sync("shira_train_checkpoint:start")
    try:
        sj.save_adapter(model, tmp / "adapter", adapter_name=adapter_name)
        tree = {f"{i:05d}": v[...] for i, (_, v) in enumerate(flat)}  # sharded: not gathered
        ocp.PyTreeCheckpointer().save(tmp / "optimizer", tree)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "optimizer_paths": [path for path, _ in flat],
            **state,
        }
        if lead:
            atomic.write_json(tmp / "state.json", meta, indent=1)
        _sync("shira_train_checkpoint:written")
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lead:
        atomic.replace_dir(tmp, target)
    _sync("shira_train_checkpoint:done")


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
    """Load the optimizer state saved by `save_train_checkpoint` into `optimizer`, each
    array straight onto the sharding its variable has now (any mesh, any process count)."""
    import orbax.checkpoint as ocp

    path = Path(directory).absolute() / "optimizer"
    state, flat = _flat_optimizer(optimizer)
    if [p for p, _ in flat] != meta["optimizer_paths"]:
        raise FinetuneError(
            f"--resume: the optimizer state in {directory} does not fit this adapter "
            "(different layers); start a new run without --resume"
        )
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path)
    saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
    args = {}
    for i, (var_path, variable) in enumerate(flat):
        shape = tuple(saved[f"{i:05d}"].shape)
        if shape != tuple(variable.shape):
            raise FinetuneError(f"--resume: optimizer entry {var_path} has shape {shape}")
        value = variable[...]
        args[f"{i:05d}"] = ocp.ArrayRestoreArgs(
            sharding=value.sharding, global_shape=shape, dtype=value.dtype
        )
    tree = checkpointer.restore(path, restore_args=args)
    for i, (_, variable) in enumerate(flat):
        variable.set_value(tree[f"{i:05d}"])
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
