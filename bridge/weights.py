"""Hugging Face safetensors checkpoints <-> Flax NNX Llama models.

``from_pretrained`` reads an HF model directory (``config.json`` plus ``model.safetensors`` or
sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``), a ``.gguf``
file, the embedded default ``"smollm2-135m"``, or (if reachable) a Hub repo id, and returns a
:class:`shira_jax.models.LlamaForCausalLM`. ``save_pretrained`` writes the reverse, folding any
active SHiRA adapters into the exported weights. Only safetensors are read: never pickles,
never remote code.

Every variable of the model maps to one HF tensor by :mod:`bridge.conventions`'s name rule:
``P.kernel`` of an ``nnx.Linear`` is HF's ``P.weight`` (transposed, torch stores
``[out, in]``), ``P.bias`` stays, ``P.embedding`` of an ``nnx.Embed`` is ``P.weight``, an
RMSNorm's ``P.weight`` stays.

Example:

    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from shira_jax.models import LlamaConfig, LlamaForCausalLM
    >>> import bridge
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=1, num_attention_heads=4)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = bridge.save_pretrained(model, tmp.name)
    >>> again = bridge.from_pretrained(tmp.name)
    >>> bool(jnp.array_equal(again(jnp.array([[1, 2]])), model(jnp.array([[1, 2]]))))
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from bridge.conventions import to_torch, torch_names
from shira_jax import atomic
from shira_jax.errors import check_regular_file
from shira_jax.layer import unwrap
from shira_jax.models.llama import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    LlamaConfig,
    LlamaForCausalLM,
)
from shira_jax.modules_to_save import ModulesToSave
from shira_jax.state import module_variables

__all__ = ["from_pretrained", "load_tokenizer", "model_from_tensors", "save_pretrained"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Keys some checkpoints carry that hold no model state.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = [
    CONFIG_NAME,
    "generation_config.json",
    "*.safetensors",
    SAFE_WEIGHTS_INDEX_NAME,
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
]


# --------------------------------------------------------------------------- name mapping


def _slots(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
    """HF key -> (the variable it fills, transposed?) of a plain (unwrapped) model."""
    variables = module_variables(model)
    return {key: (variables[p], t) for key, (p, t) in torch_names(variables, "model").items()}


def _hf_shape(variable: nnx.Variable, transpose: bool) -> tuple[int, ...]:
    shape = tuple(variable.shape)
    return shape[::-1] if transpose else shape


def _abstract_model(
    config: LlamaConfig,
    dtype: DTypeLike,
    param_dtype: DTypeLike,
    precision: jax.lax.PrecisionLike = None,
) -> LlamaForCausalLM:
    """The model with shape-only parameters (no memory, no random init)."""
    return nnx.eval_shape(
        lambda: LlamaForCausalLM(
            config, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=nnx.Rngs(0)
        )
    )


# --------------------------------------------------------------------------- reading


class _SafetensorsSource:
    """Lazy key -> numpy reader over one or several safetensors files."""

    def __init__(self, files: Mapping[str, Path]):
        self._file_of = dict(files)  # key -> file
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_dir(cls, path: Path) -> _SafetensorsSource:
        from safetensors import safe_open

        index = path / SAFE_WEIGHTS_INDEX_NAME
        single = path / SAFE_WEIGHTS_NAME
        if single.is_file():
            with safe_open(str(check_regular_file(single, "weights file")), framework="numpy") as f:
                return cls({k: single for k in f.keys()})
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'")
            files: dict[str, Path] = {}
            for key, fname in weight_map.items():
                shard = path / fname
                if Path(fname).name != fname or not shard.is_file():
                    raise FileNotFoundError(
                        f"{index} maps {key!r} to {fname!r}, which is not a file in {path}"
                    )
                files[key] = shard
            # Check the shards really hold what the index says.
            for shard in sorted(set(files.values())):
                shard = check_regular_file(shard, "weights shard")
                with safe_open(str(shard), framework="numpy") as f:
                    present = set(f.keys())
                absent = [k for k, s in files.items() if s == shard and k not in present]
                if absent:
                    raise ValueError(f"{shard.name} lacks {absent[0]!r} listed in {index.name}")
            return cls(files)
        found = sorted(p.name for p in path.iterdir())
        hint = ""
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
            hint = " (pickle checkpoints are never loaded; convert them to safetensors)"
        raise FileNotFoundError(
            f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}{hint}; found: {found}"
        )

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str) -> Any:
        from safetensors import safe_open

        path = self._file_of[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="numpy")
        return self._handles[path]

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their mmap when dropped


class _DictSource:
    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def get(self, key: str) -> np.ndarray:
        return self._t[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def close(self) -> None:
        pass


def _hub_download(name: str) -> Path:
    unreachable = (
        "pass a local directory containing config.json and *.safetensors (or the embedded "
        "model name 'smollm2-135m')"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OSError(
            f"{name!r} is not a local directory and huggingface_hub is not installed, so the "
            f"Hugging Face Hub is unreachable; {unreachable}"
        ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network errors, missing repos, offline mode ...
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}); the "
            f"hub may be unreachable from this machine: {unreachable}"
        ) from e


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """Local directory, .gguf file, embedded model name, or Hub repo id -> local path."""
    from bridge import gguf

    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        if path.name == CONFIG_NAME:
            return path.parent
        raise ValueError(f"{path} is a file; pass its model directory (or a .gguf file)")
    name = str(path_or_name)
    if name.lower() in gguf.EMBEDDED_MODELS:
        return gguf.smollm2_dir()
    if _REPO_ID.match(name):
        return _hub_download(name)
    raise FileNotFoundError(
        f"{name!r} is not a local directory, a .gguf file, an embedded model "
        f"({', '.join(gguf.EMBEDDED_MODELS)}) or a Hugging Face repo id"
    )


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    d = json.loads(cfg_file.read_text())
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{path} holds a quantized checkpoint ({method}); only dense is supported")
    archs = d.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(
            f"unsupported architecture {archs} in {cfg_file}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama')"
        )
    return d


def model_from_tensors(
    config: LlamaConfig,
    source: Any,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike | None = None,
    precision: jax.lax.PrecisionLike = None,
) -> LlamaForCausalLM:
    """Builds a model from HF-named torch-layout tensors (``source`` maps key -> array).

    Parameters are created abstractly and filled one tensor at a time, so peak memory is about
    one model plus one tensor. Missing, unexpected and mis-shaped keys raise ``ValueError``
    naming the key.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    model = _abstract_model(config, dtype, param_dtype, precision)
    slots = _slots(model)
    missing = [key for key in slots if key not in source]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing {missing[0]!r}{more}")
    unexpected = [
        k
        for k in source.keys()
        if k not in slots
        and not _IGNORED_KEYS.search(k)
        and not (k == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"checkpoint has unexpected key {unexpected[0]!r}{more}")
    for key, (variable, transpose) in slots.items():
        shape, want = source.shape(key), _hf_shape(variable, transpose)
        if shape != want:
            raise ValueError(f"tensor {key!r} has shape {shape}, expected {want}")
    for key, (variable, transpose) in slots.items():
        arr = source.get(key)
        variable.set_value(jnp.asarray(arr.T if transpose else arr, dtype=param_dtype))
        del arr
    return model


#: `implementation=` values of `from_pretrained`.
IMPLEMENTATIONS = ("shira", "tunix")


def _implementation(path: Path, implementation: str | None) -> str:
    """Which model class reads `path`: ours ("shira", Llama and GGUF files) or Tunix's."""
    from bridge import tunix

    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    model_type = None
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        try:
            model_type = json.loads((path / CONFIG_NAME).read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None  # _read_config reports a bad file
    ours = model_type is None or model_type in SUPPORTED_MODEL_TYPES
    if implementation == "tunix" or (implementation is None and not ours):
        if path.is_file():
            raise ValueError(f"{path}: Tunix models are read from HF directories, not GGUF.")
        if model_type not in tunix.SUPPORTED_MODEL_TYPES:
            others = [t for t in tunix.SUPPORTED_MODEL_TYPES if t not in SUPPORTED_MODEL_TYPES]
            raise ValueError(
                f"unsupported model_type {model_type!r} in {path / CONFIG_NAME}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (shira-jax's own Llama, or Tunix's Llama3 "
                f"with implementation='tunix') and {', '.join(others)} (Tunix's models: the "
                "google-tunix package)."
            )
        return "tunix"
    if not ours:
        raise ValueError(
            f"model_type {model_type!r} in {path / CONFIG_NAME} has no shira-jax model; it is "
            "read with implementation='tunix' (or None)."
        )
    return "shira"


def from_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike | None = None,
    precision: jax.lax.PrecisionLike = None,
    implementation: str | None = None,
) -> nnx.Module:
    """Loads a Hugging Face checkpoint as a Flax NNX model, picked by `config.json`'s `model_type`.

    ``llama`` (and GGUF files, the embedded SmolLM2) give shira-jax's own
    :class:`LlamaForCausalLM`; ``qwen3``, ``qwen2`` and ``gemma3_text`` give Tunix's model,
    built by Tunix's own loader (:mod:`bridge.tunix`; needs ``google-tunix``). Tunix models are
    called ``model(tokens, positions, cache, attention_mask) -> (logits, cache)``. Any other
    ``model_type`` is a ValueError naming the supported ones.

    Args:
      path_or_name: an HF model directory (``config.json`` + ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``), a llama ``.gguf`` file, ``"smollm2-135m"`` (the
        embedded SmolLM2-135M-Instruct, converted and cached on first use, see
        :mod:`bridge.gguf`), or a Hub repo id (downloaded only when ``huggingface_hub`` is
        installed and the Hub reachable).
      dtype: compute dtype.
      param_dtype: parameter dtype (default: ``dtype``); tensors are cast on load.
      precision: matmul precision for the model's projections (shira-jax's Llama only).
      implementation: ``"shira"`` (our Llama), ``"tunix"`` (Tunix's model, also for
        ``llama``: Tunix's Llama3), or None: ours for ``llama``, Tunix's otherwise.

    Raises:
      ValueError: unsupported architecture (the message lists the supported ones), quantized
        checkpoint, missing / unexpected / mis-shaped tensors (named).
      FileNotFoundError, OSError: nothing loadable at ``path_or_name``.

    Example (skipped in the doctest run: it reads the 135M-parameter model, which
    tests/test_weights.py covers; the module docstring above runs a save / load round trip):

        >>> model = from_pretrained("smollm2-135m")   # doctest: +SKIP
        >>> model.config.num_hidden_layers            # doctest: +SKIP
        30
    """
    path = _resolve(path_or_name)
    if _implementation(path, implementation) == "tunix":
        from bridge import tunix

        if precision is not None:
            raise ValueError("precision= applies to shira-jax's Llama only, not Tunix models.")
        return tunix.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    if path.is_file():  # .gguf
        from bridge.gguf import read_gguf

        config_dict, tensors = read_gguf(path)
        source: Any = _DictSource(tensors)
    else:
        config_dict = _read_config(path)
        source = _SafetensorsSource.from_dir(path)
    config = LlamaConfig.from_dict(config_dict)
    try:
        return model_from_tensors(
            config, source, dtype=dtype, param_dtype=param_dtype, precision=precision
        )
    finally:
        source.close()


def load_tokenizer(path_or_name: str | os.PathLike) -> Any:
    """The tokenizer of a model directory, a ``.gguf`` file or ``"smollm2-135m"``.

    Returns a ``transformers`` fast tokenizer (``encode`` / ``decode`` / ``__call__``,
    ``apply_chat_template``); needs ``transformers``. Never runs remote code.

    Example (skipped in the doctest run: tests/test_weights.py covers it):

        >>> tok = load_tokenizer("smollm2-135m")      # doctest: +SKIP
        >>> tok.decode(tok.encode("Hello world"))     # doctest: +SKIP
        'Hello world'
    """
    from transformers import AutoTokenizer

    path = _resolve(path_or_name)
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


# --------------------------------------------------------------------------- writing


def _export_tensors(model: nnx.Module) -> dict[str, jax.Array]:
    """HF key -> torch-layout array of what the forward pass uses.

    A SHiRA layer exports its kernel with the live adapters applied (``effective_kernel()``);
    a ``modules_to_save`` wrapper exports its active copy.
    """
    flat: dict[str, jax.Array] = {}

    def visit(module: Any, prefix: str) -> None:
        if isinstance(module, ModulesToSave):
            module = module.active_module()
        base = unwrap(module)
        for name, child in nnx.iter_children(base):
            path = f"{prefix}.{name}" if prefix else str(name)
            if isinstance(child, nnx.Variable):
                flat[path] = child[...]
            elif isinstance(child, nnx.Module):
                visit(child, path)
        if base is not module:  # a SHiRA layer
            flat[f"{prefix}.kernel"] = module.effective_kernel()

    visit(model, "")
    return to_torch(flat, "model")


def save_pretrained(
    model: LlamaForCausalLM, out_dir: str | os.PathLike, *, dtype: DTypeLike | None = None
) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers`` loads.

    Tensors are in torch layout under HF's names, metadata ``{"format": "pt"}``. A SHiRA layer
    is exported with its active adapters merged in, so the file is a plain dense model. Each
    file is written to a temporary name and renamed; a stale sharded index in ``out_dir`` is
    removed.

    Args:
      model: a :class:`LlamaForCausalLM`, wrapped or not.
      out_dir: created if missing.
      dtype: storage dtype (default: each parameter's own dtype).

    Returns:
      ``out_dir`` as a Path.
    """
    from safetensors.numpy import save_file

    config = getattr(model, "config", None)
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"save_pretrained needs a LlamaForCausalLM, got {type(model).__name__}")
    tensors = _export_tensors(model)
    abstract = _abstract_model(config, jnp.float32, jnp.float32)
    expected = {key: _hf_shape(*slot) for key, slot in _slots(abstract).items()}
    if set(tensors) != set(expected):
        extra = sorted(set(tensors) - set(expected))
        lacking = sorted(set(expected) - set(tensors))
        raise ValueError(f"cannot export model: unexpected {extra[:3]}, missing {lacking[:3]}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {expected[key]}")
        if dtype is not None:
            value = value.astype(dtype)
        arrays[key] = np.ascontiguousarray(np.asarray(value))
    dtype_name = str(arrays["model.embed_tokens.weight"].dtype)

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_with(
        out / SAFE_WEIGHTS_NAME, lambda tmp: save_file(arrays, str(tmp), metadata={"format": "pt"})
    )
    atomic.write_json(out / CONFIG_NAME, dict(sorted(config.to_dict(dtype=dtype_name).items())))
    stale_index = out / SAFE_WEIGHTS_INDEX_NAME
    if stale_index.is_file():
        try:
            shards = set(json.loads(stale_index.read_text()).get("weight_map", {}).values())
        except ValueError:
            shards = set()
        stale_index.unlink()
        for name in shards:
            shard = out / name
            if Path(name).name == name and name != SAFE_WEIGHTS_NAME and shard.is_file():
                shard.unlink()
    return out
