"""Shared test builders, imported as plain functions (`from conftest import ...`).

* `MLP`: the MLP of PEFT's own SHiRA tests, in Flax NNX; `snapshot` / `assert_unchanged`.
* `stacked_blocks` / `scan_blocks`: MaxText-style scan-stacked layers (`nnx.vmap` + `nnx.scan`).
* `TINY_LLAMA`, `tiny_hf_llama`, `tiny_jax_llama`, `tiny_llama_dir`: one tiny Llama shape for
  transformers and the NNX model; `torch_logits`, `rel_err` to compare them.
* `make_text`, `make_tiny_model_dir`: a learnable text and a tiny HF model dir with a BPE
  tokenizer trained on it (the fine-tuning job's input).
* `peft_model`, `strict_warnings`, `strict_from_pretrained`, `strict_load_adapter`,
  `file_tensors`, `torch_out`: PEFT-side helpers.

torch, transformers, peft and tokenizers are imported inside the builders that need them.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

# `--doctest-modules` (pyproject.toml) imports every module under tests/; the workers are scripts
# that read their device count from argv before jax starts, so they are never imported here.
collect_ignore_glob = ["*_worker.py"]


# --------------------------------------------------------------------------- NNX models


class MLP(nnx.Module):
    """lin0 10->20, lin1 20->40, lin2 40->30, lin3 30->10, as in PEFT's tests/test_shira.py."""

    def __init__(self, *, bias: bool = True, seed: int = 0, param_dtype=jnp.float32, dtype=None):
        rngs = nnx.Rngs(seed)
        kw = dict(use_bias=bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.lin0 = nnx.Linear(10, 20, **kw)
        self.lin1 = nnx.Linear(20, 40, **kw)
        self.lin2 = nnx.Linear(40, 30, **kw)
        self.lin3 = nnx.Linear(30, 10, **kw)

    def __call__(self, x):
        x = nnx.relu(self.lin0(x))
        x = nnx.relu(self.lin1(x))
        x = nnx.relu(self.lin2(x))
        return nnx.log_softmax(self.lin3(x), axis=-1)


@pytest.fixture
def mlp() -> MLP:
    return MLP()


@pytest.fixture
def x() -> jnp.ndarray:
    import jax

    return jax.random.normal(jax.random.key(1), (5, 10))


# Scan-stacked blocks keep the stack axis out of the kernels' sharding names.
_SCAN_METADATA = {nnx.PARTITION_NAME: None}


def stacked_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs):
    """`n` blocks created once under `nnx.vmap` (kernels `[n, in, out]`), as MaxText does."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=_SCAN_METADATA)
    def make(rngs):
        return make_block(rngs)

    return make(rngs)


def scan_blocks(blocks: nnx.Module, x):
    """Apply `stacked_blocks` in order with `nnx.scan` (x is the carry)."""

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=_SCAN_METADATA)
    def body(x, block):
        return block(x)

    return body(x, blocks)


class ResidualBlock(nnx.Module):
    """x + down(relu(up(x))), 16 -> 32 -> 16: the block of `ScanResidual`."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.relu(self.up(x)))


class ScanResidual(nnx.Module):
    """Three `ResidualBlock`s made under `nnx.vmap` (kernels `[3, in, out]`), run by `nnx.scan`."""

    def __init__(self):
        self.layers = stacked_blocks(ResidualBlock, 3, nnx.Rngs(0))

    def __call__(self, x):
        return scan_blocks(self.layers, x)


# --------------------------------------------------------------------------- refused changes


def snapshot(model):
    """Everything about a model that a refused load or merge must leave as it was."""
    import shira_jax as sj

    flat = nnx.to_flat_state(nnx.state(model))
    return (
        nnx.graphdef(model),
        {k: np.asarray(v[...]).copy() for k, v in flat},
        sj.adapter_names(model),
        dict(sj.adapter_configs(model)),
    )


def assert_unchanged(model, snap):
    import shira_jax as sj

    graph, arrays, names, configs = snap
    assert nnx.graphdef(model) == graph
    now = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert now.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(now[k], arrays[k], err_msg=str(k))
    assert sj.adapter_names(model) == names
    assert sj.adapter_configs(model) == configs


# --------------------------------------------------------------------------- tiny Llamas

# One tiny shape for transformers' LlamaForCausalLM and the NNX Llama (head_dim 16, GQA 4:2).
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=1000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_hf_llama(seed: int = 0, *, noise: float = 0.1, **overrides):
    """A random fp32 transformers `LlamaForCausalLM` of `TINY_LLAMA`'s shape, in eval mode.

    `noise`: N(0, noise^2) added to every weight, so logits are well separated (transformers'
    own init, std 0.02, gives near-uniform logits); 0 keeps transformers' init.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model


def tiny_llama_dir(path: Path, seed: int = 0, **kw) -> Path:
    """`tiny_hf_llama(seed, **kw)` saved with `save_pretrained` (safetensors) in `path`."""
    tiny_hf_llama(seed, **kw).save_pretrained(path)
    return Path(path)


def tiny_jax_llama(seed: int = 0, **overrides):
    """The NNX `LlamaForCausalLM` of `TINY_LLAMA`'s shape, weights drawn with std 0.1."""
    from shira_jax.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, "initializer_range": 0.1, **overrides})
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def torch_logits(hf, ids, mask=None, positions=None) -> np.ndarray:
    """float32 logits of a transformers model for int ids (optional mask and position ids)."""
    import torch

    def tensor(a):
        return None if a is None else torch.as_tensor(np.asarray(a, np.int64))

    with torch.no_grad():
        out = hf(tensor(ids), attention_mask=tensor(mask), position_ids=tensor(positions))
    return out.logits.float().numpy()


def rel_err(a, b, where=None) -> float:
    """max |a - b| / max |b| (over `where` only, if given): logits compared at their scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    if where is not None:
        diff, b = diff[where], b[where]
    return float(diff.max() / np.abs(b).max())


# --------------------------------------------------------------------------- fine-tuning input

WORDS = {
    "name": ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "BRUTUS"],
    "adj": ["gentle", "sweet", "noble", "foul", "fair", "wicked", "merry"],
    "noun": ["lord", "night", "heart", "sword", "moon", "crown", "love", "grave"],
    "verb": ["loves", "fears", "seeks", "wounds", "crowns", "mocks"],
}
TOKENIZER_VOCAB = 320


def make_text(n_lines: int, seed: int) -> str:
    """Play-like lines from a small grammar: learnable, so the loss falls within a few steps."""
    rng = random.Random(seed)
    pick = lambda kind: rng.choice(WORDS[kind])  # noqa: E731
    lines = []
    for _ in range(n_lines):
        lines.append(f"{pick('name')}:")
        lines.append(f"The {pick('adj')} {pick('noun')} {pick('verb')} the {pick('noun')}.")
        lines.append("")
    return "\n".join(lines)


def make_tiny_model_dir(root: Path, *, text: str, tie: bool = False) -> Path:
    """A transformers Llama (2 layers, hidden 64, transformers' init) + a BPE tokenizer.json
    trained on `text`, saved in `root`; token 0 (<eos>) is bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.save(str(root / "tokenizer.json"))
    model = tiny_hf_llama(
        0,
        noise=0.0,
        vocab_size=TOKENIZER_VOCAB,
        intermediate_size=128,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    model.save_pretrained(str(root), safe_serialization=True)
    return root


# --------------------------------------------------------------------------- PEFT side


def peft_model(base, **kw):
    """`peft.get_peft_model(base, peft.ShiraConfig(**kw))`; `mask_fn=` sets a custom mask
    function (not a ShiraConfig init argument)."""
    import peft

    mask_fn = kw.pop("mask_fn", None)
    cfg = peft.ShiraConfig(**kw)
    if mask_fn is not None:
        cfg.mask_fn = mask_fn
    return peft.get_peft_model(base, cfg)


@contextlib.contextmanager
def strict_warnings():
    """Every warning is an error ("Found missing adapter keys", PEFT's "Unexpected keyword
    arguments" for unknown config fields, ...), except library deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def strict_from_pretrained(base, folder, **kw):
    """`peft.PeftModel.from_pretrained` under `strict_warnings`."""
    import peft

    with strict_warnings():
        return peft.PeftModel.from_pretrained(base, str(folder), **kw)


def strict_load_adapter(pm, folder, name):
    with strict_warnings():
        pm.load_adapter(str(folder), adapter_name=name)


def file_tensors(folder) -> dict[str, np.ndarray]:
    """The tensors of a PEFT adapter dir's `adapter_model.safetensors`."""
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def torch_out(model, x: np.ndarray) -> np.ndarray:
    """A torch model's output for a float32 numpy input, as numpy."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()
