"""Convert adapter files between shira_jax's orbax checkpoints and PEFT folders, no base model.

Both directions go through `shira_jax.state.AdapterState`:

* :func:`orbax_to_peft`: `shira_jax.checkpoint.read_state` (layer paths, kernel shapes,
  kernel-layout indices and values are all stored), then `bridge.peft.write_state`.
* :func:`peft_to_orbax`: `bridge.peft.read_state`, then `shira_jax.checkpoint.write_state`.
  A PEFT file does NOT store kernel shapes, and the largest index only bounds them from below;
  guessing would write a checkpoint that fails (or silently misbehaves) on the real model. So
  the shapes come from `model=` (any NNX model with the same module paths; its weights are not
  used) or `kernel_shapes={path: (in, out)}`. `modules_to_save` params need `model=` too, to
  know each variable's Flax name and layout.

A Tunix model (`bridge.tunix`) has its own module paths (`layers.0.attn.q_einsum`), a PEFT
file HF's (`model.layers.0.self_attn.q_proj`): given such a `model=`, both directions map the
names (and split or join fused kernels) as `bridge.load_peft_adapter` and
`bridge.save_peft_adapter` do, so the orbax side holds what `sj.save_adapter` on that model
writes and the PEFT side what PEFT writes.

The CLI's `shira-jax convert` calls these.

Example (an HF Qwen3 folder `qwen3/`, a PEFT adapter trained on it in `peft/`;
tests/test_tunix.py runs this on every Tunix family)::

    model = bridge.tunix.abstract_model("qwen3")  # shapes only
    bridge.peft_to_orbax("peft", "ckpt", model=model)  # sj.load_adapter(tunix_qwen3, "ckpt")
    bridge.orbax_to_peft("ckpt", "peft_again", model=model)  # PEFT's tensors again
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flax import nnx

from bridge import peft, tunix
from shira_jax import checkpoint
from shira_jax.state import check_entries
from shira_jax.util import check_adapter_name

__all__ = ["orbax_to_peft", "peft_to_orbax"]


def orbax_to_peft(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    model: nnx.Module | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Convert a `shira_jax.save_adapter` checkpoint to a PEFT SHiRA folder.

    The checkpoint is checked as `sj.load_adapter` checks it, as far as no model is needed
    (indices inside the stored kernel shapes and unique, sizes, finite values): a bad one
    raises `AdapterLoadError` and writes nothing.

    Args:
        src_dir: the orbax adapter checkpoint.
        dst_dir: the PEFT output folder; an adapter not named "default" is written to
            `dst_dir/<adapter_name>`, as PEFT's save_pretrained does.
        adapter_name: name for the output (default: the name stored in the checkpoint).
        model: needed only for a checkpoint of a Tunix model (weights unused, an abstract
            model will do): its paths become HF's, fused kernels are split per HF linear.
            Other models' paths are written as stored.
        allow_nonfinite: convert NaN/inf values too (refused by default).

    Returns:
        The folder that holds `adapter_config.json` and `adapter_model.safetensors`.
    """
    stored_name, state = checkpoint.read_state(src_dir)  # host numpy, whatever mesh saved it
    check_entries(state, str(src_dir), allow_nonfinite=allow_nonfinite)
    if model is not None and tunix.is_tunix_model(model):
        state = tunix.to_hf_state(state, model)
    return peft.write_state(dst_dir, state, stored_name if adapter_name is None else adapter_name)


def peft_to_orbax(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    model: nnx.Module | None = None,
    kernel_shapes: Mapping[str, tuple[int, int]] | None = None,
    stack_name: str = "layers",
) -> Path:
    """Convert a PEFT SHiRA folder to a `shira_jax` orbax checkpoint (`sj.load_adapter` reads it).

    Args:
        src_dir: the PEFT adapter folder (for a non-default `adapter_name`, a subfolder of
            that name is preferred when it holds an adapter, as PEFT saves them).
        dst_dir: the orbax checkpoint to write (replaced atomically if it exists).
        adapter_name: the adapter name stored in the checkpoint.
        model: an NNX model with the same module paths, for kernel shapes and modules_to_save
            layouts (its weights are not used or changed); its scan-stacked layers are stored
            whole, as `sj.save_adapter` would. A Tunix model's paths differ from the file's:
            they are mapped (see the module docstring).
        kernel_shapes: instead of `model`: layer path -> Flax kernel shape `(in, out)`, i.e.
            torch's `weight.shape[::-1]`. One of `model` / `kernel_shapes` is required.
        stack_name: the attribute holding `model`'s scan-stacked blocks (`layers.N` in the file).

    Returns:
        The checkpoint folder.
    """
    check_adapter_name(adapter_name)
    if model is not None and tunix.is_tunix_model(model):  # HF paths in the file
        _, state = peft.read_tunix_state(src_dir, adapter_name, model)
    else:
        _, state = peft.read_state(
            src_dir, adapter_name, model=model, kernel_shapes=kernel_shapes,
            stack_name=stack_name,
        )
        if model is not None:
            state = state.restacked(model, stack_name)
    checkpoint.write_state(dst_dir, state, adapter_name)
    return Path(dst_dir).absolute()
