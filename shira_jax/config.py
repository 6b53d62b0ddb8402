"""`ShiraConfig`: PEFT's SHiRA fields and defaults, plus the paper's mask options.

Example:
    >>> import shira_jax as sj
    >>> cfg = sj.ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], random_seed=0)
    >>> cfg.to_dict()["peft_type"]
    'SHIRA'
    >>> sj.ShiraConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

MaskType = Literal["random", "struct", "weight_magnitude", "gradient", "snip", "custom"]
MASK_TYPES: tuple[str, ...] = ("random", "struct", "weight_magnitude", "gradient", "snip", "custom")
MASKS_NEEDING_DATA: tuple[str, ...] = ("gradient", "snip")
GRAD_REDUCTIONS: tuple[str, ...] = ("sum_abs", "abs_sum")

# PEFT's own defaults when target_modules is None (its LoRA mapping, reused for SHiRA).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
}
ALL_LINEAR = "all-linear"

# Fields that PEFT's adapter_config.json carries for SHiRA (base PeftConfig fields included).
_PEFT_FIELDS: tuple[str, ...] = (
    "r",
    "mask_type",
    "random_seed",
    "target_modules",
    "fan_in_fan_out",
    "init_weights",
    "modules_to_save",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
    "peft_version",
)
# Our options that PEFT has no field for; stored under this key so PEFT ignores them.
EXTRA_KEY = "shira_jax"
DELTA_MODES = ("patched", "sparse", "auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShiraConfig:
    """Configuration of a SHiRA adapter (PEFT's `ShiraConfig` fields, same defaults).

    Each targeted `[in, out]` kernel gets `r * (in + out)` trainable entries, LoRA's size
    at rank `r`, but the update itself can have full rank.

    Args:
        r: budget per layer, `nnz = r * (in + out)`; must be positive and `nnz <= in * out`.
        mask_type: "random" (PEFT-exact), "struct", "weight_magnitude", "gradient", "snip",
            or "custom" (then `mask_fn` is required).
        random_seed: seed of the random mask; None is PEFT's unseeded generator.
        target_modules: a regex (`re.fullmatch` on the dotted module path), a list of names
            (a path equal to one or ending in "." + one), "all-linear", or None for the
            model type's defaults (q_proj and v_proj on Llama).
        fan_in_fan_out: kept for PEFT compatibility; Flax kernels are always `[in, out]`.
        init_weights: True starts values at zero; False draws standard normals (tests).
        modules_to_save: other modules trained fully and saved with the adapter.
        mask_fn: custom mask, `mask_fn(base_layer, r, **kw)` returning a 0/1 `[in, out]`
            array or `[2, nnz]` kernel-layout indices. Not saved (the indices are).
        grad_reduction: how "gradient"/"snip" accumulate calibration gradients:
            "sum_abs" = sum over batches of |g| (default), "abs_sum" = |sum of g|.
        topk_scope: "layer" picks top-nnz per layer (default; the budget is per layer).
        exclude_adapters: names of adapters whose positions this one must not reuse
            (the paper's non-overlapping masks for fusion).
        struct_stride: for "struct", keep every `struct_stride`-th row/column (None: as
            many as the budget allows).
        delta_mode: how the forward applies the delta (ours, not a PEFT field): "patched"
            scatters the values into a copy of the kernel and runs the layer's one matmul;
            "sparse" runs the base layer and adds `x @ S` from the `nnz` entries
            (`ops.sparse_product`; on N-D kernels too: nnx.LinearGeneral, nnx.Einsum, Tunix
            einsum modules, whose input is moved to `[tokens, in]` and the product back to
            the output layout; refused, before any change, for N-D kinds registered by
            in_axes/out_axes and einsums whose input repeats an axis); "auto" picks per
            layer and call by the crossover measured in BENCHMARKS.md (sparse for few
            tokens: decoding). Default "patched", PEFT's forward.
    """

    r: int = 32
    mask_type: MaskType = "random"
    random_seed: int | None = None
    target_modules: str | tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: tuple[str, ...] | None = None
    mask_fn: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    grad_reduction: Literal["sum_abs", "abs_sum"] = "sum_abs"
    topk_scope: Literal["layer"] = "layer"
    exclude_adapters: tuple[str, ...] = ()
    struct_stride: int | None = None
    delta_mode: Literal["patched", "sparse", "auto"] = "patched"
    # Base PEFT fields, carried through to adapter_config.json.
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict[str, Any] | None = dataclasses.field(default=None, compare=False)
    peft_version: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("target_modules", "modules_to_save", "exclude_adapters"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                set_(name, tuple(value))
                bad = [v for v in getattr(self, name) if not isinstance(v, str)]
                if bad:
                    raise TypeError(f"{name} must be names (strings), got {bad[:3]!r}.")
        if isinstance(self.target_modules, tuple):  # a set in PEFT: order carries no meaning
            set_("target_modules", tuple(sorted(set(self.target_modules))))
        if isinstance(self.modules_to_save, str):
            set_("modules_to_save", (self.modules_to_save,))
        if isinstance(self.exclude_adapters, str):
            set_("exclude_adapters", (self.exclude_adapters,))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"ShiraConfig.r must be a positive integer, got {self.r!r}.")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(
                f"Unknown mask_type {self.mask_type!r}; choose one of {', '.join(MASK_TYPES)}."
            )
        if self.mask_type == "custom" and self.mask_fn is None:
            raise ValueError('mask_type="custom" needs mask_fn=my_mask(base_layer, r, **kw).')
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise TypeError(f"mask_fn must be callable, got {type(self.mask_fn).__name__}.")
        if self.grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(
                f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {self.grad_reduction!r}."
            )
        if self.topk_scope != "layer":
            raise ValueError(f'topk_scope must be "layer", got {self.topk_scope!r}.')
        if self.delta_mode not in DELTA_MODES:
            raise ValueError(
                f"delta_mode must be one of {DELTA_MODES}, got {self.delta_mode!r}."
            )
        if self.struct_stride is not None and self.struct_stride <= 0:
            raise ValueError(f"struct_stride must be positive, got {self.struct_stride}.")
        seed = self.random_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"random_seed must be an int or None, got {seed!r}.")
        if seed is not None and not -(2**63) <= seed < 2**64:  # torch.Generator's range
            raise ValueError(
                f"random_seed must be in [-2**63, 2**64) (torch's seed range), got {seed}."
            )
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules {self.target_modules!r}: bad regex: {err}"
                ) from err

    @property
    def peft_type(self) -> str:
        return "SHIRA"

    @property
    def needs_calibration(self) -> bool:
        return self.mask_type in MASKS_NEEDING_DATA

    def replace(self, **changes: Any) -> ShiraConfig:
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields of PEFT's `adapter_config.json` (plus our extras under "shira_jax")."""
        out: dict[str, Any] = {"peft_type": "SHIRA"}
        for name in _PEFT_FIELDS:
            value = getattr(self, name)
            out[name] = sorted(value) if isinstance(value, tuple) else value
        if self.mask_type == "custom":
            out["mask_type"] = "custom"
        out[EXTRA_KEY] = {
            "grad_reduction": self.grad_reduction,
            "topk_scope": self.topk_scope,
            "exclude_adapters": list(self.exclude_adapters),
            "struct_stride": self.struct_stride,
            "delta_mode": self.delta_mode,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShiraConfig:
        """Build from an `adapter_config.json` dict; unknown PEFT base fields are ignored."""
        peft_type = data.get("peft_type", "SHIRA")
        if str(peft_type).upper() != "SHIRA":
            raise ValueError(f"Not a SHiRA config: peft_type is {peft_type!r}, expected 'SHIRA'.")
        kwargs = {k: data[k] for k in _PEFT_FIELDS if k in data}
        kwargs.update(data.get(EXTRA_KEY) or {})
        if kwargs.get("mask_type") not in MASK_TYPES:
            # Adapters saved with a custom PEFT mask: the indices are in the file.
            kwargs["mask_type"] = "custom"
            kwargs["mask_fn"] = stored_indices_mask_fn
        elif kwargs.get("mask_type") == "custom":
            kwargs["mask_fn"] = stored_indices_mask_fn
        return cls(**kwargs)

    @classmethod
    def stored_indices(cls, r: int, target_modules: Sequence[str] = ()) -> ShiraConfig:
        """The config of an adapter known only by its stored indices (no config was saved).

        >>> ShiraConfig.stored_indices(4).mask_type
        'custom'
        """
        return cls(
            r=r,
            mask_type="custom",
            mask_fn=stored_indices_mask_fn,
            target_modules=tuple(target_modules),
        )


def stored_indices_mask_fn(base_layer: Any, r: int, **kwargs: Any) -> Any:
    """The `mask_fn` of an adapter whose indices were loaded or derived (custom masks are not
    saved, fused adapters take their parts' indices): calling it is an error."""
    raise ValueError(
        "This adapter's indices come from a file or from other adapters: its mask_fn is not "
        "saved. Load the adapter's indices from the file, or pass mask_fn=... to build new ones."
    )


# ----------------------------------------------------------------------------- matching


def matches_target(path: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is `re.fullmatch`; a list matches equal or `endswith("." + t)`.

    >>> matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    True
    >>> matches_target("model.layers.0.self_attn.q_proj", r".*\\.(q|v)_proj")
    True
    >>> matches_target("model.layers.0.self_attn.xq_proj", ["q_proj"])
    False
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def resolve_targets(
    config: ShiraConfig,
    linear_paths: Iterable[str],
    *,
    model_type: str | None = None,
    output_layer_names: Sequence[str] = ("lm_head",),
    unsupported: Mapping[str, str] | None = None,
) -> list[str]:
    """The dotted paths among `linear_paths` that `config.target_modules` selects.

    Raises a ValueError naming the target and listing candidates when nothing matches.
    `unsupported` maps the paths of the other modules (that SHiRA cannot adapt) to their type
    names: as in PEFT, a regex or list that selects one of them is a TypeError (only
    `"all-linear"` picks the linear layers out of everything).

    >>> cfg = ShiraConfig(target_modules=r".*(proj|norm)")
    >>> resolve_targets(cfg, ["attn.q_proj"], unsupported={"attn.norm": "RMSNorm"})
    Traceback (most recent call last):
    ...
    TypeError: Target module attn.norm (RMSNorm) is selected by target_modules '.*(proj|norm)' \
but SHiRA adapts linear layers only (nnx.Linear, LinearGeneral, Einsum, sj.register_kernel \
kinds; PEFT raises the same for modules other than torch.nn.Linear). Narrow target_modules \
(or use "all-linear").
    """
    paths = list(linear_paths)
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is None and the model type "
                f"{model_type!r} has no default targets; pass target_modules=[...]. "
                f"Linear layers here: {_preview(paths)}"
            )
        targets = DEFAULT_TARGETS[model_type]
    if targets == ALL_LINEAR:
        chosen = [p for p in paths if p.rsplit(".", 1)[-1] not in output_layer_names]
    else:
        chosen = [p for p in paths if matches_target(p, targets)]
        bad = [p for p in unsupported or () if matches_target(p, targets)]
        if bad:
            more = f" ({len(bad)} such modules: {_preview(bad)})" if len(bad) > 1 else ""
            raise TypeError(
                f"Target module {bad[0]} ({unsupported[bad[0]]}) is selected by target_modules "
                f"{targets!r} but SHiRA adapts linear layers only (nnx.Linear, LinearGeneral, "
                "Einsum, sj.register_kernel kinds; PEFT raises the same for modules other than "
                f"torch.nn.Linear){more}. Narrow target_modules (or use \"all-linear\")."
            )
    if not chosen:
        raise ValueError(
            f"Target modules {targets!r} matched no linear layer of the model. "
            f"Linear layers here: {_preview(paths)}"
        )
    return chosen


def _preview(paths: Sequence[str], limit: int = 12) -> str:
    if not paths:
        return "(none)"
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")
