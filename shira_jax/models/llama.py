"""Llama for Flax NNX, with Hugging Face's module paths and numerics.

The module tree mirrors ``transformers.LlamaForCausalLM`` attribute for attribute, so a dotted
NNX path names the same layer as a torch module path (``model.layers.0.self_attn.q_proj``), and
every projection is a plain :class:`flax.nnx.Linear` (kernel ``[in, out]``) that adapter wrappers
can replace and call as ``layer(x)``. Numerics follow transformers: RMSNorm in float32 then cast
back, RoPE in the ``rotate_half`` layout, softmax in float32, grouped-query attention.

Weights are loaded and saved by :mod:`bridge` (``bridge.from_pretrained``,
``bridge.save_pretrained``); this module never imports torch.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM, generate
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.array([[1, 2, 3]])).shape
    (1, 3, 64)
    >>> type(model.model.layers[0].self_attn.q_proj).__name__
    'Linear'
    >>> generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4).shape
    (1, 7)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.typing import ArrayLike, DTypeLike

__all__ = [
    "KVCache",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "LlamaRMSNorm",
    "RopeScaling",
    "generate",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama",)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A RoPE frequency scaling rule (Hugging Face's ``rope_scaling`` / ``rope_parameters``).

    Supported ``rope_type`` values: ``"linear"`` (positions divided by ``factor``) and
    ``"llama3"`` (Llama 3.1's band-wise rescaling). Plain RoPE is ``rope_scaling=None``.

    Example:

        >>> RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0}).factor
        2.0
        >>> RopeScaling.from_dict({"type": "default"}) is None
        True
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES or self.rope_type == "default":
            raise ValueError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} (use rope_scaling=None for 'default')"
            )
        if self.rope_type == "llama3":
            missing = [
                name
                for name in (
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                )
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"rope_scaling type 'llama3' needs {', '.join(missing)}")

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, *, max_position_embeddings: int | None = None
    ) -> RopeScaling | None:
        """Parses HF's ``rope_scaling`` dict (old ``type`` or new ``rope_type`` key).

        Returns ``None`` for plain RoPE. Raises ``ValueError`` for types this model does not
        implement (``dynamic``, ``yarn``, ``longrope``, ...).
        """
        if d is None:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in (None, "default"):
            return None
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if "factor" not in d:
            raise ValueError(f"rope_scaling type {rope_type!r} needs a 'factor'")
        omax = d.get("original_max_position_embeddings")
        if rope_type == "llama3" and omax is None:
            omax = max_position_embeddings  # transformers' fallback
        low, high = d.get("low_freq_factor"), d.get("high_freq_factor")
        return cls(
            rope_type=rope_type,
            factor=float(d["factor"]),
            low_freq_factor=None if low is None else float(low),
            high_freq_factor=None if high is None else float(high),
            original_max_position_embeddings=None if omax is None else int(omax),
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF ``rope_scaling`` dict (``rope_type`` key, unset fields left out)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama hyper-parameters, with the field names of Hugging Face's ``config.json``.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads``
    to ``num_attention_heads``. ``rope_scaling`` takes ``None``, a :class:`RopeScaling` or an HF
    dict. The dataclass is frozen and hashable, so it can sit on a module as static data.

    Example:

        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> cfg.head_dim, cfg.num_key_value_groups
        (8, 2)
        >>> LlamaConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: "
                f"{', '.join(sorted(_ACTIVATIONS))}"
            )
        if isinstance(self.rope_scaling, Mapping):
            set_(
                "rope_scaling",
                RopeScaling.from_dict(
                    self.rope_scaling, max_position_embeddings=self.max_position_embeddings
                ),
            )
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(
                f"rope_scaling must be None, a dict or RopeScaling, got {self.rope_scaling!r}"
            )
        if isinstance(self.eos_token_id, Sequence):
            ids = tuple(int(i) for i in self.eos_token_id)
            set_("eos_token_id", ids[0] if len(ids) == 1 else ids)
        set_("rope_theta", float(self.rope_theta))
        set_("rms_norm_eps", float(self.rms_norm_eps))

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from an HF ``config.json`` dict (transformers 4 or 5 layout).

        Reads RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
        ``rope_scaling`` (older files). Unknown keys are ignored. An unsupported
        ``architectures`` / ``model_type`` raises ``ValueError`` naming the supported ones.
        """
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        archs = d.get("architectures") or []
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(
                f"unsupported architectures {archs}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, Mapping) and (
            "rope_type" in rope_params or "rope_theta" in rope_params
        ):
            rope_theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling_src: Mapping[str, Any] | None = rope_params
        else:
            rope_theta = d.get("rope_theta", 10000.0)
            scaling_src = d.get("rope_scaling")
        max_pos = int(d.get("max_position_embeddings", 2048))
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("rope_theta", "rope_scaling") or f.name not in d:
                continue
            kwargs[f.name] = d[f.name]
        return cls(
            **kwargs,
            rope_theta=rope_theta,
            rope_scaling=RopeScaling.from_dict(scaling_src, max_position_embeddings=max_pos),
        )

    def to_dict(self, *, dtype: str | None = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` loads as ``LlamaForCausalLM``.

        RoPE is written both ways (``rope_parameters`` for transformers 5, ``rope_theta`` +
        ``rope_scaling`` for older versions). ``dtype`` names the stored weights' dtype.
        """
        scaling = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if scaling is not None:
            rope_parameters.update(scaling)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out: dict[str, Any] = {
            "architectures": list(SUPPORTED_ARCHITECTURES),
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if dtype is not None:
            out["dtype"] = dtype
            out["torch_dtype"] = dtype
        return out


# --------------------------------------------------------------------------- rotary embedding


@functools.lru_cache(maxsize=64)
def _inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies, computed in float32 exactly as transformers does."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3 (transformers' _compute_llama3_parameters)
    factor = np.float32(scaling.factor)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_llama).astype(np.float32)


def rope_cos_sin(
    positions: jax.Array, config: LlamaConfig, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables ``[B, T, head_dim]`` for integer ``positions`` ``[B, T]``.

    Angles are computed in float32 and cast to ``dtype`` (as transformers does).
    """
    inv_freq = jnp.asarray(_inv_freq(config))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------- KV cache


@struct.dataclass
class KVCache:
    """Pre-allocated key/value cache for incremental decoding (a JAX pytree).

    Attributes:
      keys, values: one array ``[batch, max_len, num_key_value_heads, head_dim]`` per layer,
        keys stored after RoPE.
      mask: ``[batch, max_len]`` bool, which slots hold real (non-padding) tokens.
      index: int32 scalar, number of slots written so far; the next call writes its ``T``
        tokens at slots ``index .. index + T - 1``. Writing past ``max_len`` is not checked
        inside ``jit`` (XLA clamps the write), so size the cache for the whole sequence.

    Build one with :meth:`LlamaForCausalLM.init_cache`.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots."""
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def create(
        cls, config: LlamaConfig, batch_size: int, max_len: int, dtype: DTypeLike = jnp.float32
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            mask=jnp.zeros((batch_size, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )


# --------------------------------------------------------------------------- modules


def _init(config: LlamaConfig) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=config.initializer_range)


class LlamaRMSNorm(nnx.Module):
    """RMSNorm with transformers' semantics: normalise in float32, cast back, scale by weight.

    The parameter is called ``weight`` (HF's name). Output dtype is ``dtype`` if given, else the
    promotion of the input and weight dtypes (as torch does).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        eps: float = 1e-6,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.weight = nnx.Param(jnp.ones((hidden_size,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        input_dtype = x.dtype
        h = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
        h = (h * jax.lax.rsqrt(variance + self.eps)).astype(input_dtype)
        weight = self.weight[...]
        dtype = jnp.promote_types(weight.dtype, input_dtype) if self.dtype is None else self.dtype
        return weight.astype(dtype) * h.astype(dtype)


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(
            use_bias=config.mlp_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=_init(config),
            rngs=rngs,
        )
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.hidden_act]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,KVH,D], mask [B,T,S] (True = attend)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=precision) * (d**-0.5)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=precision)
    return out.reshape(b, t, h * d)


class LlamaAttention(nnx.Module):
    """Causal grouped-query self-attention with RoPE (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj`` are plain :class:`flax.nnx.Linear`)."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(
            use_bias=config.attention_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=_init(config),
            rngs=rngs,
        )
        hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nnx.Linear(config.hidden_size, nh * hd, **kw)
        self.k_proj = nnx.Linear(config.hidden_size, nkv * hd, **kw)
        self.v_proj = nnx.Linear(config.hidden_size, nkv * hd, **kw)
        self.o_proj = nnx.Linear(nh * hd, config.hidden_size, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.precision = precision

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns the output ``[B, T, hidden]`` and the updated ``(keys, values)`` cache."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if kv_cache is not None:
            ck, cv = kv_cache
            start = (0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
            kv_cache = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        out = _attend(q, k, v, mask, precision=self.precision)
        return self.o_proj(out), kv_cache


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm transformer block: ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm``, ``mlp``."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        norm_kw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, **kw)
        self.mlp = LlamaMLP(config, **kw)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, **norm_kw)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, **norm_kw)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        h, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class LlamaModel(nnx.Module):
    """The decoder stack: ``embed_tokens``, ``layers`` (an :class:`flax.nnx.List`), ``norm``.

    Calling it returns the final hidden states and the updated cache (``None`` without one).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=_init(config),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                LlamaDecoderLayer(
                    config, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = LlamaRMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: KVCache | None = None,
        segment_ids: ArrayLike | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """See :meth:`LlamaForCausalLM.__call__`; returns ``(hidden [B, T, hidden], cache)``."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        else:
            attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
            if attention_mask.shape != (b, t):
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, t)}"
                )
        if cache is None:
            offset: jax.Array | int = 0
            kv_valid = attention_mask
        else:
            if cache.batch_size != b:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {b}")
            offset = cache.index
            kv_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, offset))
        q_slots = offset + jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(q_slots, (b, t))
        else:
            positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
        s = kv_valid.shape[1]
        causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slots[:, None]  # [T, S]
        mask = causal[None, :, :] & kv_valid[:, None, :]  # [B, T, S]
        if segment_ids is not None:  # packed rows: a token attends only within its example
            if cache is not None:
                raise ValueError("segment_ids is for packed training rows; not with a cache")
            seg = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (b, t))
            mask = mask & (seg[:, :, None] == seg[:, None, :])

        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config, x.dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache = layer(x, cos, sin, mask, layer_cache, offset)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        x = self.norm(x)
        if cache is None:
            return x, None
        new_cache = KVCache(
            keys=tuple(new_keys), values=tuple(new_values), mask=kv_valid, index=offset + t
        )
        return x, new_cache


class LlamaForCausalLM(nnx.Module):
    """Llama causal LM with Hugging Face's module paths.

    Attributes mirror ``transformers.LlamaForCausalLM``: ``model.embed_tokens`` (nnx.Embed),
    ``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``
    (nnx.Linear, kernel ``[in, out]``), ``model.layers[i].{input,post_attention}_layernorm``,
    ``model.norm`` and ``lm_head`` (nnx.Linear, or ``None`` when the embeddings are tied and
    logits are ``h @ embed_tokens.embedding.T``).

    Args:
      config: the architecture.
      dtype: compute dtype (default: ``param_dtype``).
      param_dtype: parameter dtype.
      precision: matmul precision passed to every projection and attention einsum.
      rngs: random init (``initializer_range`` normal, as transformers).

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        ...                   tie_word_embeddings=True)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> model.lm_head is None
        True
        >>> ids = jnp.array([[5, 6, 7, 8]])
        >>> full = model(ids)
        >>> cache = model.init_cache(batch_size=1, max_len=8)
        >>> part, cache = model(ids[:, :3], cache=cache)
        >>> last, cache = model(ids[:, 3:], cache=cache)
        >>> bool(jnp.allclose(last[:, 0], full[:, 3], atol=1e-5)), int(cache.index)
        (True, 4)
        >>> packed = model(jnp.array([[5, 6, 7, 9, 10]]), positions=jnp.array([[0, 1, 2, 0, 1]]),
        ...                segment_ids=jnp.array([[1, 1, 1, 2, 2]]))  # two examples, one row
        >>> bool(jnp.allclose(packed[:, 3:], model(jnp.array([[9, 10]])), atol=1e-5))
        True
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.model = LlamaModel(
            config, dtype=self.dtype, param_dtype=param_dtype, precision=precision, rngs=rngs
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=_init(config),
                rngs=rngs,
            )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Projects hidden states ``[..., hidden]`` to vocabulary logits ``[..., vocab]``."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: KVCache | None = None,
        segment_ids: ArrayLike | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Runs the model.

        Args:
          input_ids: int ``[B, T]``.
          attention_mask: ``[B, T]``, 1 = real token, 0 = padding (keys at padding are masked;
            padding queries produce unspecified logits). With a cache, the mask of earlier
            calls is remembered in it.
          positions: int ``[B, T]`` (or ``[T]``) RoPE positions. Default, as transformers:
            ``arange(T)`` plus the number of cached tokens, regardless of padding. For
            left-padded batches pass ``cumsum(attention_mask) - 1`` (``generate`` does).
          cache: a :class:`KVCache` (from :meth:`init_cache`); the ``T`` new tokens are written
            at ``cache.index`` and attend to everything cached before them.
          segment_ids: int ``[B, T]``, for rows that pack several examples: a token attends
            only to earlier tokens with the same id (pass ``positions`` restarting at 0 for
            each example too). Not with a cache. Default: one sequence per row.

        Returns:
          ``logits`` ``[B, T, vocab]`` in the compute dtype without a cache, else
          ``(logits, updated_cache)``.
        """
        hidden, new_cache = self.model(input_ids, attention_mask, positions, cache, segment_ids)
        logits = self.logits(hidden)
        if cache is None:
            return logits
        return logits, new_cache

    def init_cache(
        self, batch_size: int, max_len: int, *, dtype: DTypeLike | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of ``max_len`` tokens
        (``dtype`` defaults to the compute dtype)."""
        return KVCache.create(
            self.config, batch_size, max_len, self.dtype if dtype is None else dtype
        )


# --------------------------------------------------------------------------- generation


_GEN_BUCKET = 32  # new-token buffers are rounded up to this, so nearby lengths share programs


def _sample(
    logits: jax.Array, key: jax.Array, greedy: bool, temperature: jax.Array, top_k: int | None
) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@nnx.jit
def _prefill(
    model: LlamaForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    hidden, cache = model.model(input_ids, attention_mask, positions, cache)
    return model.logits(hidden[:, -1]), cache


@functools.partial(nnx.jit, static_argnames=("buffer_len", "greedy", "top_k", "eos_ids"))
def _decode(
    model: LlamaForCausalLM,
    logits: jax.Array,
    cache: KVCache,
    next_pos: jax.Array,
    key: jax.Array,
    max_new_tokens: jax.Array,
    temperature: jax.Array,
    pad_id: jax.Array,
    *,
    buffer_len: int,
    greedy: bool,
    top_k: int | None,
    eos_ids: tuple[int, ...],
) -> jax.Array:
    """Greedy / sampled decoding in one ``while_loop``; stops early when all rows hit eos."""
    b = logits.shape[0]
    out = jnp.full((b, buffer_len), pad_id, jnp.int32)
    finished = jnp.zeros((b,), jnp.bool_)
    ones = jnp.ones((b, 1), jnp.bool_)
    # The model's state enters the loop as an operand and the module is rebuilt inside, at the
    # loop's trace level, so layers that mutate their own variables during a forward pass
    # (SHiRA's kernel swap) stay legal there.
    graphdef, model_state = nnx.split(model)

    def step(tok, cache, pos, logits, model_state):
        m = nnx.merge(graphdef, model_state)
        hidden, cache = m.model(tok[:, None], ones, pos[:, None], cache)
        return m.logits(hidden[:, -1]).astype(logits.dtype), cache

    def skip(tok, cache, pos, logits, model_state):  # the last token needs no forward pass
        return logits, cache

    def cond(state):
        i, _, _, _, _, _, finished = state
        return (i < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        i, logits, cache, pos, key, out, finished = state
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, greedy, temperature, top_k)
        tok = jnp.where(finished, pad_id, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        if eos_ids:
            finished = finished | jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))
        logits, cache = jax.lax.cond(
            i + 1 < max_new_tokens, step, skip, tok, cache, pos, logits, model_state
        )
        return i + 1, logits, cache, pos + 1, key, out, finished

    init = (jnp.zeros((), jnp.int32), logits, cache, next_pos, key, out, finished)
    return jax.lax.while_loop(cond, body, init)[5]


def generate(
    model: LlamaForCausalLM,
    input_ids: ArrayLike,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    *,
    attention_mask: ArrayLike | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Autoregressive generation with a KV cache (one jitted prefill, one jitted decode loop).

    The decode loop runs inside a single compiled ``while_loop`` and stops once every row has
    produced an eos. Buffers are rounded up to a multiple of 32 new tokens, so calls that
    differ only in ``max_new_tokens`` (or in ``temperature`` > 0, ``rng``, ``pad_token_id``)
    reuse the compiled programs; a new prompt shape or ``top_k`` compiles again.

    Args:
      model: a :class:`LlamaForCausalLM` (SHiRA-wrapped or not).
      input_ids: int ``[B, T]`` (or ``[T]``) prompts, LEFT-padded if their lengths differ.
      max_new_tokens: number of tokens to generate.
      temperature: 0 for greedy decoding, else softmax sampling at this temperature.
      top_k: sample only among the ``top_k`` most likely tokens.
      rng: a ``jax.random`` key for sampling (default ``jax.random.key(0)``).
      eos_token_id: token id(s) that end a sequence; ``None`` never stops early (pass
        ``model.config.eos_token_id`` to stop like transformers does).
      attention_mask: ``[B, T]``, 1 = token, 0 = left padding. Positions are
        ``cumsum(mask) - 1`` so padded rows generate exactly as unpadded ones.
      pad_token_id: fills the slots after a sequence finished (default: the first eos id,
        else ``config.pad_token_id``, else 0).

    Returns:
      int32 ``[B, T + max_new_tokens]``: the prompts followed by the new tokens.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        >>> prompts = jnp.array([[0, 3, 4], [7, 8, 9]])
        >>> out = generate(model, prompts, 5, attention_mask=jnp.array([[0, 1, 1], [1, 1, 1]]))
        >>> out.shape
        (2, 8)
    """
    ids = jnp.asarray(input_ids)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {ids.shape}")
    ids = ids.astype(jnp.int32)
    b, t = ids.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    if attention_mask is None:
        mask = jnp.ones((b, t), jnp.int32)
    else:
        mask = jnp.asarray(attention_mask).astype(jnp.int32)
        if squeeze and mask.ndim == 1:
            mask = mask[None]
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, t)}")
        if not bool(jnp.all(mask[:, -1] == 1)):
            raise ValueError(
                "generate needs LEFT padding: the last prompt token of every row must have "
                "attention_mask 1 (pad on the left, e.g. tokenizer.padding_side = 'left')"
            )
    if max_new_tokens == 0:
        return ids[0] if squeeze else ids
    if eos_token_id is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else (model.config.pad_token_id or 0)
    if rng is None:
        rng = jax.random.key(0)

    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    buffer_len = -(-max_new_tokens // _GEN_BUCKET) * _GEN_BUCKET
    cache = model.init_cache(b, t + buffer_len)
    logits, cache = _prefill(model, ids, mask.astype(jnp.bool_), positions, cache)
    new = _decode(
        model,
        logits,
        cache,
        positions[:, -1] + 1,
        rng,
        jnp.int32(max_new_tokens),
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.int32(pad_token_id),
        buffer_len=buffer_len,
        greedy=temperature == 0,
        top_k=top_k,
        eos_ids=eos_ids,
    )
    out = jnp.concatenate([ids, new[:, :max_new_tokens]], axis=1)
    return out[0] if squeeze else out
