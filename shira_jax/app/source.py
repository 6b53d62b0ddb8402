"""The model behind `--model`: find it, load it (or only its shapes), its tokenizer, and
check that an adapter fits it before any long work.

`bridge` (the HF / GGUF side) is imported inside the functions that need it, so importing
this module stays light and torch-free.

Example (a model with shapes only: no weights, no memory):
    >>> from flax import nnx
    >>> import shira_jax as sj
    >>> from shira_jax.app import source
    >>> from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    >>> source.check_adapter_fits(model, sj.ShiraConfig(r=4, target_modules=["q_proj"]))
    ['model.layers.0.self_attn.q_proj']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shira_jax as sj
from shira_jax.app import data as data_lib
from shira_jax.app.options import DTYPES, FinetuneError, targets_text
from shira_jax.config import ShiraConfig, resolve_targets
from shira_jax.kernels import KernelView, kernel_view
from shira_jax.layer import unwrap
from shira_jax.masks import shira_budget
from shira_jax.model import named_modules


def resolve_model(name: str) -> Path:
    """`--model` -> a local HF model directory or a `.gguf` file (no Hub: fails fast).

    The embedded "smollm2-135m" is converted to a cached HF directory on first use.
    """
    import bridge

    if name.lower() in bridge.EMBEDDED_MODELS:
        return Path(bridge.smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"--model {name}: no config.json in that folder")
        return path.absolute()
    if path.is_file() and path.suffix == ".gguf":
        return path.absolute()
    raise FinetuneError(
        f"unknown --model {name!r}: use {' or '.join(bridge.EMBEDDED_MODELS)} (embedded) or a "
        "local Hugging Face model folder (config.json + *.safetensors) or a .gguf file"
    )


def abstract_model(model_path: Path) -> nnx.Module | None:
    """The model with shapes only (no weights, no memory), from `config.json`; None for GGUF.

    `model_type` "llama" is shira-jax's Llama; the Tunix families (`bridge.tunix`: qwen3,
    qwen2, gemma3_text) are Tunix's models, as `bridge.from_pretrained` loads them.
    """
    from shira_jax.models.llama import SUPPORTED_MODEL_TYPES, LlamaConfig, LlamaForCausalLM

    if model_path.is_file():
        return None
    try:
        config_dict = json.loads((model_path / "config.json").read_text())
        if config_dict.get("model_type", "llama") not in SUPPORTED_MODEL_TYPES:
            from bridge import tunix

            return tunix.abstract_model(model_path)
        config = LlamaConfig.from_dict(config_dict)
    except (ValueError, TypeError, KeyError, ImportError) as err:
        raise FinetuneError(f"--model {model_path}: {err}") from err
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))


def load_model(model_path: Path, dtype: str) -> nnx.Module:
    """`bridge.from_pretrained` with weights and compute in `dtype` ("float32" / "bfloat16")."""
    import bridge

    return bridge.from_pretrained(model_path, dtype=DTYPES[dtype])


def load_model_tokenizer(model_path: Path) -> data_lib.Tokenizer:
    """The model's tokenizer: `tokenizer.json` via `tokenizers`, else `bridge.load_tokenizer`."""
    if model_path.is_dir() and (model_path / "tokenizer.json").is_file():
        return data_lib.load_tokenizer(model_path)
    import bridge

    try:
        backend = bridge.load_tokenizer(model_path)
    except Exception as err:  # noqa: BLE001 - any loader failure is a missing tokenizer
        raise FinetuneError(f"--model {model_path}: no usable tokenizer ({err})") from err
    return data_lib.Tokenizer(backend, eos_id=backend.eos_token_id, bos_id=backend.bos_token_id)


def _view(layer: nnx.Module) -> KernelView:
    """The kernel view of a linear layer, or of the layer a SHiRA wrapper holds."""
    return kernel_view(unwrap(layer))


def _linear_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every layer SHiRA can adapt (`nnx.Linear`, Tunix's Einsum projections, ...)."""
    out = {}
    for path, module in named_modules(model):
        view = kernel_view(unwrap(module))
        if view is not None and not view.stacked and not getattr(view, "unsupported", ""):
            out[path] = module
    return out


def check_adapter_fits(model: nnx.Module, config: ShiraConfig) -> list[str]:
    """The layer paths `config` targets in `model` (abstract models work: shapes only).

    Raises `FinetuneError` with one line when nothing matches or `r` is too large.
    """
    linear = _linear_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        paths = resolve_targets(config, list(linear), model_type=model_type)
    except ValueError:
        names = sorted({p.rsplit(".", 1)[-1] for p in linear})
        raise FinetuneError(
            f"--targets {targets_text(config.target_modules)} matched no linear layer; "
            f"this model's linear layers are named: {', '.join(names)}"
        ) from None
    worst: tuple[int, str, tuple[int, int]] | None = None
    for path in paths:
        view = _view(linear[path])
        n_in, n_out = int(view.n_in), int(view.n_out)
        try:
            shira_budget(n_in, n_out, config.r, layer_name=path)
        except ValueError:
            r_max = (n_in * n_out) // (n_in + n_out)
            if worst is None or r_max < worst[0]:
                worst = (r_max, path, (n_in, n_out))
    if worst is not None:
        r_max, path, (n_in, n_out) = worst
        raise FinetuneError(
            f"--r {config.r} is too large for {path} (kernel {n_in}x{n_out}): "
            f"r*(in+out) must be <= in*out, so r <= {r_max} here"
        )
    return paths


def keep_float32(model: nnx.Module, paths: Sequence[str]) -> None:
    """Store the kernels at `paths` (the adapted layers) in float32, in place.

    Their layers still compute in the model's dtype (`nnx.Linear` casts the kernel for the
    matmul), but the sparse update is added to an exact float32 kernel and rounded once per
    step, and its gradient is taken in float32. The other weights stay in the low precision.
    """
    modules = dict(named_modules(model))
    for path in paths:
        kernel = _view(modules[path]).variable
        if kernel[...].dtype != jnp.float32:
            kernel.set_value(kernel[...].astype(jnp.float32))


def quantize(model: nnx.Module, paths: Sequence[str], qtype: str) -> nnx.Module:
    """A copy of `model` whose kernels at `paths` qwix quantized (weight-only PTQ, `qtype`
    int8 / int4 / nf4). SHiRA adapters on them add the sparse product to the quantized matmul.

    Only shira-jax's Llama (called as `model(ids)`) is supported here.
    """
    import re

    import qwix

    if not paths:
        raise FinetuneError("--quantize: no layer to quantize (check --targets)")
    pattern = "|".join(re.escape(p).replace(r"\.", "/") for p in paths)  # qwix paths use "/"
    extra = {"tile_size": 64} if qtype == "nf4" else {}
    rule = qwix.QuantizationRule(module_path=f"({pattern})", weight_qtype=qtype, **extra)
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), jnp.zeros((1, 8), jnp.int32))


def count_params(model: nnx.Module) -> tuple[int, int]:
    """(trainable SHiRA values, all parameters of the base model)."""
    trainable = nnx.state(model, sj.ShiraParam)
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(sj.ShiraParam)))
    size = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    return size(trainable), size(base)
