"""Tunix model families: build them from HF checkpoints, and name their layers as HF does.

google-tunix (`tunix.models`) holds Flax NNX models of Qwen3, Qwen2, Llama3 and Gemma3 and its
own HF loaders (`create_model_from_safe_tensors`). This module keeps one registry, keyed by
`config.json`'s `model_type`:

* how to build the family's Tunix `ModelConfig` from `config.json` and which Tunix loader
  reads the safetensors (`from_pretrained`);
* which Tunix module holds each HF linear (`hf_to_tunix`, `tunix_to_hf`), so PEFT adapter
  files, whose keys use HF module paths, load onto and save from Tunix models
  (`bridge.peft`, via `to_tunix_state` / `to_hf_state`).

==================================  ========================================  ===========
HF module (`model.layers.N.` ...)   Tunix module (`layers.N.` ...)            slice
==================================  ========================================  ===========
`self_attn.{q,k,v,o}_proj`          `attn.{q,k,v,o}_proj` (Einsum, `w`)       whole
`mlp.{gate,up,down}_proj`           `mlp.{gate,up,down}_proj` (nnx.Linear)    whole
`lm_head` (untied)                  `lm_head` (Einsum `BTD,DV->BTV`)          whole
Gemma3 `self_attn.o_proj`           `attn.attn_vec_einsum` `(N, H, D)`        whole
Gemma3 `self_attn.q_proj`           `attn.q_einsum` `(N, D, H)`               whole
Gemma3 `self_attn.{k,v}_proj`       `attn.kv_einsum` `(2, K, D, H)`           part 0, 1 / 2
Gemma3 (heads == kv heads) `q/k/v`  `attn.qkv_einsum` `(3, N, D, H)`          part 0-2 / 3
==================================  ========================================  ===========

An adapter addresses a Tunix kernel as its logical `[in, out]` matrix (`shira_jax.kernels`):
`in` and `out` are the row-major flattenings of the kernel axes contracted with the input and
of those that reach the output. That is exactly HF's flattening, so HF `q_proj.weight`
`[N*H, D]` entry `(o, i)` is entry `(i, o)` of Tunix `q_proj.w` `(D, N, H)`. A fused kernel's
parts are equal column blocks: HF `v_proj` column `c` is column `K*H + c` of `kv_einsum`.

Importing this module never imports tunix; every function that needs it imports it inside.

Example (no tunix needed for the names):
    >>> from bridge import tunix
    >>> tunix.family_for("qwen3").name, tunix.family_for("gemma3_text").name
    ('qwen3', 'gemma3')
    >>> rules = tunix.family_for("gemma3").rules(num_heads=4, num_kv_heads=2)
    >>> tunix.match_hf(rules, "model.layers.3.self_attn.v_proj")
    Slot(path='layers.3.attn.kv_einsum', part=1, parts=2)
    >>> tunix.match_tunix(rules, "layers.3.attn.kv_einsum")
    [('model.layers.3.self_attn.k_proj', 0), ('model.layers.3.self_attn.v_proj', 1)]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax import masks
from shira_jax.errors import AdapterLoadError
from shira_jax.kernels import kernel_view
from shira_jax.layer import unwrap
from shira_jax.model import named_modules
from shira_jax.state import AdapterState, LayerState

__all__ = [
    "FAMILIES",
    "tunix_flags",
    "Family",
    "Rule",
    "Slot",
    "SUPPORTED_MODEL_TYPES",
    "abstract_model",
    "family_for",
    "family_of",
    "from_pretrained",
    "hf_kernel_shapes",
    "is_tunix_model",
    "match_hf",
    "match_tunix",
    "model_config",
    "read_hf_config",
    "to_hf_state",
    "to_tunix_state",
]


# ----------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where an HF linear lives in a Tunix model: a module path and, for a fused kernel, which
    of its `parts` equal column blocks (of the logical `[in, out]` matrix) it is."""

    path: str
    part: int = 0
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF module path <-> one Tunix slot; `{i}` stands for a layer number."""

    hf: str
    tunix: str
    part: int = 0
    parts: int = 1

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>[0-9]+)"))

    def from_hf(self, path: str) -> Slot | None:
        hit = self._pattern(self.hf).fullmatch(path)
        if hit is None:
            return None
        return Slot(self.tunix.format(**hit.groupdict()), self.part, self.parts)

    def from_tunix(self, path: str) -> str | None:
        hit = self._pattern(self.tunix).fullmatch(path)
        return None if hit is None else self.hf.format(**hit.groupdict())


def match_hf(rules: Iterable[Rule], hf_path: str) -> Slot | None:
    """The Tunix slot of an HF module path (None: no Tunix module holds it)."""
    for rule in rules:
        slot = rule.from_hf(hf_path)
        if slot is not None:
            return slot
    return None


def match_tunix(rules: Iterable[Rule], path: str) -> list[tuple[str, int]]:
    """`[(HF module path, part)]` held by the Tunix module at `path`, by part ([] if none)."""
    found = [(hf, rule.part) for rule in rules if (hf := rule.from_tunix(path)) is not None]
    return sorted(found, key=lambda item: item[1])


_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."


def _llama_like_rules(**_: Any) -> tuple[Rule, ...]:
    """Qwen3, Qwen2, Llama3: one Tunix module per HF linear, same leaf names."""
    attn = [Rule(f"{_ATTN}{p}_proj", f"layers.{{i}}.attn.{p}_proj") for p in "qkvo"]
    mlp = [Rule(f"{_MLP}{p}_proj", f"layers.{{i}}.mlp.{p}_proj") for p in ("gate", "up", "down")]
    return (*attn, *mlp, Rule("lm_head", "lm_head"))


def _gemma3_rules(*, num_heads: int, num_kv_heads: int) -> tuple[Rule, ...]:
    """Gemma3: `attn_vec_einsum` is o_proj; q/k/v are fused into `qkv_einsum` (3 parts) when
    heads == kv heads, else `q_einsum` + `kv_einsum` (2 parts)."""
    attn = "layers.{i}.attn."
    if num_heads == num_kv_heads:
        qkv = [Rule(f"{_ATTN}{p}_proj", f"{attn}qkv_einsum", n, 3) for n, p in enumerate("qkv")]
    else:
        qkv = [
            Rule(f"{_ATTN}q_proj", f"{attn}q_einsum"),
            Rule(f"{_ATTN}k_proj", f"{attn}kv_einsum", 0, 2),
            Rule(f"{_ATTN}v_proj", f"{attn}kv_einsum", 1, 2),
        ]
    mlp = [Rule(f"{_MLP}{p}_proj", f"layers.{{i}}.mlp.{p}_proj") for p in ("gate", "up", "down")]
    return (*qkv, Rule(f"{_ATTN}o_proj", f"{attn}attn_vec_einsum"), *mlp)


# ----------------------------------------------------------------------------- configs


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def _rope(d: Mapping[str, Any], kind: str | None = None) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling dict or {}) from transformers 5's `rope_parameters` (per layer type
    for Gemma3) or the older `rope_theta` / `rope_scaling`."""
    params = d.get("rope_parameters") or {}
    if kind is not None and isinstance(params.get(kind), Mapping):
        params = params[kind]
    theta = params.get("rope_theta") or d.get("rope_theta") or 10000.0
    scaling = dict(d.get("rope_scaling") or {})
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return float(theta), scaling


def _head_dim(d: Mapping[str, Any]) -> int:
    return int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])


def _check_activation(
    d: Mapping[str, Any], key: str, allowed: tuple[str, ...], family: str
) -> None:
    act = d.get(key, allowed[0])
    if act not in allowed:
        raise ValueError(
            f"{family}: {key}={act!r} in config.json, but Tunix's model computes {allowed[0]}."
        )


def _fixed_rope(d: Mapping[str, Any], family: str) -> None:
    """Tunix's Qwen3 and Llama3 apply RoPE with theta 1e6 and no scaling, whatever the
    checkpoint says: say so when the checkpoint differs."""
    theta, scaling = _rope(d)
    if theta != 1e6 or scaling:
        _warn(
            f"{family}: config.json asks for rope_theta={theta:g}"
            f"{f' and rope scaling {scaling}' if scaling else ''}, but Tunix's {family} model "
            "applies RoPE with theta 1e6 and no scaling: its logits differ from transformers' "
            "for this checkpoint."
        )


def _shape_fields(d: Mapping[str, Any]) -> dict[str, int]:
    """The ModelConfig sizes Tunix's Qwen3, Qwen2 and Llama3 name alike, from config.json."""
    return dict(
        num_layers=int(d["num_hidden_layers"]),
        vocab_size=int(d["vocab_size"]),
        embed_dim=int(d["hidden_size"]),
        hidden_dim=int(d["intermediate_size"]),
        num_heads=int(d["num_attention_heads"]),
        head_dim=_head_dim(d),
        num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
    )


def _qwen3_config(d: Mapping[str, Any], dtype: Any, param_dtype: Any) -> Any:
    from tunix.models.qwen3 import model as lib

    _check_activation(d, "hidden_act", ("silu",), "qwen3")
    _fixed_rope(d, "qwen3")
    return lib.ModelConfig(
        **_shape_fields(d),
        rope_theta=int(_rope(d)[0]),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        use_tied_embedding=bool(d.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _qwen2_config(d: Mapping[str, Any], dtype: Any, param_dtype: Any) -> Any:
    from tunix.models.qwen2 import model as lib

    _check_activation(d, "hidden_act", ("silu",), "qwen2")
    theta, scaling = _rope(d)
    if scaling:
        _warn(f"qwen2: Tunix's Qwen2 ignores the rope scaling {scaling} of config.json.")
    return lib.ModelConfig(
        **_shape_fields(d),
        rope_theta=int(theta),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        use_tied_embedding=bool(d.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _llama3_config(d: Mapping[str, Any], dtype: Any, param_dtype: Any) -> Any:
    from tunix.models.llama3 import model as lib

    _check_activation(d, "hidden_act", ("silu",), "llama3")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("llama3: Tunix's Llama3 has no biases; this checkpoint has some.")
    _fixed_rope(d, "llama3")
    return lib.ModelConfig(
        **_shape_fields(d),
        rope_theta=int(_rope(d)[0]),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        weight_tying=bool(d.get("tie_word_embeddings", False)),
    )


def _gemma3_config(d: Mapping[str, Any], dtype: Any, param_dtype: Any) -> Any:
    from tunix.models.gemma3 import model as lib

    family = "gemma3"
    _check_activation(d, "hidden_activation", ("gelu_pytorch_tanh",), family)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise ValueError(f"{family}: {key}={d[key]} in config.json; Tunix's Gemma3 has none.")
    if not d.get("tie_word_embeddings", True):
        raise ValueError(f"{family}: Tunix's Gemma3 ties lm_head to the embeddings; this has not.")
    n_layers, heads = int(d["num_hidden_layers"]), int(d["num_attention_heads"])
    pattern = [p.name for p in lib.GEMMA3_ATTENTION_PATTERN]
    want = [pattern[i % len(pattern)] for i in range(n_layers)]
    kinds = {"sliding_attention": "LOCAL_SLIDING", "full_attention": "GLOBAL"}
    have = [kinds.get(t, t) for t in d.get("layer_types") or want]
    if have != want:
        raise ValueError(
            f"{family}: layer_types {d.get('layer_types')} in config.json; Tunix's Gemma3 "
            f"always uses {len(pattern) - 1} sliding layers then 1 global ({want})."
        )
    head_dim, hidden = _head_dim(d), int(d["hidden_size"])
    scalar = d.get("query_pre_attn_scalar", head_dim)
    norms = lib.QueryPreAttentionNormalisation
    if scalar == head_dim:
        norm = norms.BY_ONE_OVER_SQRT_HEAD_DIM
    elif scalar == hidden // heads:
        norm = norms.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    else:
        raise ValueError(
            f"{family}: query_pre_attn_scalar={scalar}; Tunix's Gemma3 scales queries by "
            f"head_dim ({head_dim}) or hidden_size // heads ({hidden // heads}) only."
        )
    if float(d.get("rms_norm_eps", 1e-6)) != 1e-6:
        _warn(f"{family}: Tunix's Gemma3 RMSNorm uses eps 1e-6, not {d['rms_norm_eps']}.")
    local_theta, local_scaling = _rope(d, "sliding_attention")
    if "rope_local_base_freq" in d:
        local_theta = float(d["rope_local_base_freq"])
    global_theta, global_scaling = _rope(d, "full_attention")
    for kind, scaling in (("sliding", local_scaling), ("global", global_scaling)):
        if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
            raise ValueError(f"{family}: {kind} rope scaling {scaling}: Tunix has linear only.")
    return lib.ModelConfig(
        num_layers=n_layers,
        num_embed=int(d["vocab_size"]),
        embed_dim=hidden,
        hidden_dim=int(d["intermediate_size"]),
        num_heads=heads,
        head_dim=head_dim,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        sliding_window_size=int(d.get("sliding_window") or 4096),
        local_base_frequency=int(local_theta),
        global_base_frequency=int(global_theta),
        local_scale_factor=float(local_scaling.get("factor", 1.0)),
        global_scale_factor=float(global_scaling.get("factor", 1.0)),
        query_pre_attn_norm=norm,
        param_dtype=param_dtype,
    )


@dataclasses.dataclass(frozen=True)
class Family:
    """One Tunix model family: its HF `model_type`s, Tunix modules and the name mapping."""

    name: str
    model_types: tuple[str, ...]
    package: str  # tunix.models.<family>; the model class lives in <package>.model
    loader: str  # module with create_model_from_safe_tensors(file_dir, config, mesh, dtype)
    model_class: str
    config_fn: Callable[[Mapping[str, Any], Any, Any], Any]
    rules_fn: Callable[..., tuple[Rule, ...]] = _llama_like_rules

    def rules(self, *, num_heads: int, num_kv_heads: int) -> tuple[Rule, ...]:
        """The HF <-> Tunix name rules for a model with these head counts."""
        return self.rules_fn(num_heads=num_heads, num_kv_heads=num_kv_heads)

    def model_rules(self, model: nnx.Module) -> tuple[Rule, ...]:
        cfg = model.config
        return self.rules(num_heads=int(cfg.num_heads), num_kv_heads=int(cfg.num_kv_heads))


_FAMILIES = (
    Family("qwen3", ("qwen3",), "tunix.models.qwen3", "tunix.models.qwen3.params", "Qwen3",
           _qwen3_config),
    Family("qwen2", ("qwen2",), "tunix.models.qwen2", "tunix.models.qwen2.params", "Qwen2",
           _qwen2_config),
    Family("llama3", ("llama",), "tunix.models.llama3", "tunix.models.llama3.params", "Llama3",
           _llama3_config),
    Family("gemma3", ("gemma3_text", "gemma3"), "tunix.models.gemma3",
           "tunix.models.gemma3.params_safetensors", "Gemma3", _gemma3_config, _gemma3_rules),
)
#: HF `model_type` -> Tunix family.
FAMILIES: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_for(model_type: str) -> Family:
    """The Tunix family of an HF `model_type`; ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no Tunix family here; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return FAMILIES[model_type]


def family_of(model: Any) -> Family | None:
    """The family of a Tunix model instance (by its class's module), None for other models."""
    module = type(model).__module__
    for family in _FAMILIES:
        if module == f"{family.package}.model" and type(model).__name__ == family.model_class:
            return family
    return None


def is_tunix_model(model: Any) -> bool:
    """True for a model of a registered Tunix family (no tunix import needed)."""
    return family_of(model) is not None


# ----------------------------------------------------------------------------- loading


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """`config.json` of an HF dir; a multimodal Gemma3 (`model_type` "gemma3") is refused."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    d = json.loads(cfg_file.read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file}: not a JSON object")
    if d.get("quantization_config"):
        raise ValueError(f"{path} holds a quantized checkpoint; only dense ones are loaded.")
    if d.get("model_type") == "gemma3" and "text_config" in d:
        raise ValueError(
            f"{cfg_file}: a multimodal Gemma3 (Gemma3ForConditionalGeneration); only text-only "
            "Gemma3 checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM) are supported."
        )
    return d


def model_config(
    hf_config: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = None
) -> Any:
    """The Tunix `ModelConfig` of an HF `config.json` dict (its `model_type` picks the family).

    Settings Tunix's model cannot follow are errors (another activation, Gemma3 soft-capping or
    layer pattern) or warnings where Tunix's model still runs but differs from transformers'
    (Qwen3 / Llama3 RoPE theta other than 1e6, rope scaling).
    """
    family = family_for(str(hf_config.get("model_type")))
    param_dtype = dtype if param_dtype is None else param_dtype
    return family.config_fn(hf_config, dtype, param_dtype)


def _model_class(family: Family) -> type:
    return getattr(importlib.import_module(f"{family.package}.model"), family.model_class)


def tunix_flags() -> None:
    """Set flax the way Tunix's models need it: `flax_always_shard_variable` off (importing
    Tunix's model modules does this once; anyone may have turned it back on since, and Tunix's
    sharding names then need a mesh to build a variable)."""
    import flax

    flax.config.update("flax_always_shard_variable", False)


def abstract_model(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> nnx.Module:
    """The Tunix model of an HF dir with shapes only (no weights read, no memory)."""
    d = read_hf_config(path)
    family = family_for(str(d.get("model_type")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = model_config(d, dtype=dtype)
    cls = _model_class(family)
    tunix_flags()
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(params=0)))


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> nnx.Module:
    """A Tunix model from an HF dir (`config.json` + safetensors), with Tunix's own loader.

    Args:
        path: local HF model directory; its `model_type` picks the family
            (`SUPPORTED_MODEL_TYPES`).
        dtype: compute dtype where the family has one (Qwen2/Qwen3); else the params'.
        param_dtype: parameter dtype (default `dtype`); tensors are cast on load.
        mesh: passed to Tunix's loader (params placed by the model's sharding names).

    Every parameter must come from the checkpoint: one Tunix's loader left unset (a missing
    tensor) is a ValueError naming it.

    Example (skipped: needs a checkpoint; tests/test_tunix.py loads tiny ones):
        >>> model = from_pretrained("Qwen3-0.6B/")    # doctest: +SKIP
        >>> logits, _ = model(tokens, positions, None, causal_mask)   # doctest: +SKIP
    """
    d = read_hf_config(path)
    family = family_for(str(d.get("model_type")))
    param_dtype = dtype if param_dtype is None else param_dtype
    config = model_config(d, dtype=dtype, param_dtype=param_dtype)
    loader = importlib.import_module(family.loader)
    tunix_flags()
    try:
        model = loader.create_model_from_safe_tensors(
            file_dir=str(Path(path).absolute()), config=config, mesh=mesh, dtype=param_dtype
        )
    except (AssertionError, TypeError, KeyError, ValueError) as err:
        raise ValueError(
            f"{path}: Tunix's {family.name} loader failed ({' '.join(str(err).split())[:300]}); "
            "the checkpoint's tensors do not match config.json (a tensor missing? "
            "tie_word_embeddings?)."
        ) from err
    missing = [
        ".".join(str(k) for k in key)
        for key, value in nnx.to_flat_state(nnx.state(model))
        if not isinstance(value.get_value(), jax.Array)
    ]
    if missing:
        raise ValueError(
            f"{path}: no tensor for the Tunix parameters {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the checkpoint does not match config.json "
            "(tie_word_embeddings?)."
        )
    return model


# ----------------------------------------------------------------------------- adapters


def _rules(model: nnx.Module) -> tuple[Rule, ...]:
    family = family_of(model)
    if family is None:
        raise TypeError(f"{type(model).__name__} is not a Tunix model of a known family.")
    return family.model_rules(model)


def _logical_shape(module: nnx.Module, path: str) -> tuple[int, int]:
    view = kernel_view(unwrap(module))
    if view is None or view.stacked or getattr(view, "unsupported", ""):
        raise ValueError(f"Tunix module {path} ({type(unwrap(module)).__name__}) has no kernel "
                         "SHiRA can adapt.")
    return int(view.n_in), int(view.n_out)


def hf_kernel_shapes(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """`{HF module path: (in, out)}` of every HF linear a Tunix model holds (a fused kernel's
    part has `out / parts` columns)."""
    rules = _rules(model)
    out: dict[str, tuple[int, int]] = {}
    for path, module in named_modules(model):
        held = match_tunix(rules, path)
        if held:
            n_in, n_out = _logical_shape(module, path)
            for hf_path, _ in held:
                out[hf_path] = (n_in, n_out // _parts(rules, path))
    return out


def _parts(rules: Iterable[Rule], path: str) -> int:
    return max((r.parts for r in rules if r.from_tunix(path) is not None), default=1)


def to_tunix_state(
    state: AdapterState, model: nnx.Module, *, source: str = "adapter"
) -> AdapterState:
    """An adapter with HF module paths (a PEFT file's) -> the same adapter on Tunix paths.

    The HF linears of one fused kernel (Gemma3 `kv_einsum`, `qkv_einsum`) become one layer:
    each part's indices are shifted to its column block and the parts concatenated. Every HF
    path must name a linear the model holds (AdapterLoadError otherwise); modules_to_save are
    refused (Tunix modules have no HF parameter names here).
    """
    if state.modules_to_save:
        raise AdapterLoadError(
            f"{source}: modules_to_save {sorted(state.modules_to_save)} cannot be loaded onto a "
            "Tunix model (its modules do not carry HF parameter names); only SHiRA layers can."
        )
    rules = _rules(model)
    modules = dict(named_modules(model))
    grouped: dict[str, dict[int, tuple[str, LayerState]]] = {}
    for hf_path, layer in state.layers.items():
        slot = match_hf(rules, hf_path)
        if slot is None or slot.path not in modules:
            raise AdapterLoadError(
                f"{source}: layer {hf_path!r} is not a linear this Tunix "
                f"{type(model).__name__} holds (HF paths it holds look like "
                f"{sorted(hf_kernel_shapes(model))[:3]})."
            )
        grouped.setdefault(slot.path, {})[slot.part] = (hf_path, layer)
    layers: dict[str, LayerState] = {}
    for path, parts in grouped.items():
        n_in, n_out = _logical_shape(modules[path], path)
        n_parts = _parts(rules, path)
        width = n_out // n_parts
        idx_list, val_list, ranks = [], [], set()
        for part, (hf_path, layer) in sorted(parts.items()):
            if tuple(layer.kernel_shape) != (n_in, width):
                raise AdapterLoadError(
                    f"{source}: layer {hf_path!r} was made for a kernel {list(layer.kernel_shape)}"
                    f"; this model's is {[n_in, width]}. Was it made for another model size?"
                )
            idx = np.asarray(layer.indices).astype(np.int64)
            idx_list.append(np.stack([idx[0], idx[1] + part * width]))
            val_list.append(np.asarray(layer.values))
            ranks.add(layer.r)
        idx, val = masks.canonicalize(
            np.concatenate(idx_list, axis=1), np.concatenate(val_list), (n_in, n_out)
        )
        layers[path] = LayerState(idx, val, (n_in, n_out), max(ranks), parts=len(parts))
    return dataclasses.replace(state, layers=layers)


def to_hf_state(state: AdapterState, model: nnx.Module) -> AdapterState:
    """An adapter on a Tunix model's paths -> the same adapter on HF module paths (for PEFT).

    A fused kernel's adapter is split into its parts' column blocks; a part with no entries is
    left out. Each part must hold exactly `r * (in + out)` entries of its HF linear, as PEFT
    sizes them: an adapter made by `apply_shira` on the fused kernel itself does not split so,
    and is refused (save it with `shira_jax.save_adapter`).
    """
    if state.modules_to_save:
        raise ValueError(
            f"modules_to_save {sorted(state.modules_to_save)} of a Tunix model have no PEFT "
            "names here; save this adapter with shira_jax.save_adapter."
        )
    rules = _rules(model)
    layers: dict[str, LayerState] = {}
    for path, layer in state.layers.items():
        held = match_tunix(rules, path)
        if not held:
            raise ValueError(
                f"Layer {path} of this Tunix model holds no HF linear PEFT can name; save the "
                "adapter with shira_jax.save_adapter."
            )
        n_in, n_out = (int(n) for n in layer.kernel_shape[-2:])
        n_parts = _parts(rules, path)
        width = n_out // n_parts
        idx = np.asarray(layer.indices).astype(np.int64)
        val = np.asarray(layer.values)
        for hf_path, part in held:
            keep = (idx[1] >= part * width) & (idx[1] < (part + 1) * width)
            if n_parts > 1 and not keep.any():
                continue
            nnz, want = int(keep.sum()), layer.r * (n_in + width)
            if n_parts > 1 and nnz != want:
                raise ValueError(
                    f"Layer {path} (fused, {n_parts} HF linears) has {nnz} SHiRA entries in the "
                    f"block of {hf_path}, but PEFT needs exactly r * (in + out) = {layer.r} * "
                    f"({n_in} + {width}) = {want} per HF linear. An adapter made on the fused "
                    "kernel itself (apply_shira on it) does not split into PEFT layers; save it "
                    "with shira_jax.save_adapter, or load a PEFT adapter to get per-linear masks."
                )
            part_idx = np.stack([idx[0][keep], idx[1][keep] - part * width]).astype(np.int32)
            layers[hf_path] = LayerState(part_idx, val[keep], (n_in, width), layer.r)
    return dataclasses.replace(state, layers=layers)
