"""Fine-tune a causal LM with a SHiRA adapter: the library behind `shira-jax finetune`.

`run(FinetuneConfig(...))` does the whole job: check the arguments (cheaply, before any long
work), load the model and its tokenizer, tokenize and pack the text, add the adapter, train
with AdamW (linear warmup, cosine decay, global-norm clipping) in a jitted step with donated
buffers, evaluate before and after, checkpoint periodically (`--resume` continues), and write

    OUT/metrics.json     train_loss per step, eval losses, tokens/s, the config
    OUT/loss.png         the loss curve
    OUT/orbax/           the adapter (`shira_jax.load_adapter`)
    OUT/peft/            the adapter as a PEFT SHiRA folder (`PeftModel.from_pretrained`)
    OUT/checkpoint/      adapter + optimizer state + step, for `--resume`

With `--mesh data=2,model=4` (any axes, see `shira_jax.sharding`) the model, adapter,
optimizer state and batches are placed on a device mesh and the steps run under it;
`--distributed` first calls `jax.distributed.initialize()` (one process per host).

The model side (`bridge.from_pretrained`, PEFT export) is imported lazily inside functions, so
`import shira_jax` never imports torch. The pieces (`lm_loss`, `make_optimizer`,
`check_adapter_fits`, `save_train_checkpoint`, ...) are usable on their own.

Example (the pieces; the whole job is `run(FinetuneConfig(...))` or `shira-jax finetune`):
    >>> from shira_jax import finetune
    >>> finetune.parse_targets("q_proj,v_proj")
    ('q_proj', 'v_proj')
    >>> schedule = finetune.lr_schedule(1e-3, steps=100, warmup=10)
    >>> [round(float(schedule(s)), 6) for s in (0, 5, 10, 100)]
    [0.0, 0.0005, 0.001, 0.0001]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shira_jax import data as data_lib
from shira_jax import sharding
from shira_jax.checkpoint import _replace_dir, load_adapter, save_adapter
from shira_jax.config import ALL_LINEAR, MASK_TYPES, ShiraConfig, resolve_targets
from shira_jax.layer import ShiraDense, ShiraParam
from shira_jax.masks import shira_budget
from shira_jax.model import apply_shira, named_modules

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "shira-jax-train-state"
# Flags a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("model", "data", "r", "targets", "mask", "seq_len", "batch_size", "seed")


class FinetuneError(ValueError):
    """A bad argument or input, reported to the user as one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything `shira-jax finetune` takes (the CLI flags, same names and defaults).

    The defaults are sized for `make demo`: SmolLM2-135M on 2 CPU cores in about 3 minutes,
    with a clearly falling eval loss.
    """

    model: str = "smollm2-135m"
    data: str = "shakespeare"
    r: int = 32
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    mask: str = "random"
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 6
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"
    out: str = "runs/finetune"
    resume: bool = False
    eval_every: int = 0
    eval_batches: int = 4
    eval_fraction: float = 0.05
    ckpt_every: int = 0
    calib_batches: int = 4
    log_every: int = 0
    adapter_name: str = "default"
    export_peft: bool = True
    mesh: str | None = None
    distributed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The flags as JSON data; `targets` normalized ("q_proj,v_proj" -> a list)."""
        out = dataclasses.asdict(self)
        try:
            targets = parse_targets(self.targets)
        except FinetuneError:
            targets = self.targets
        out["targets"] = list(targets) if isinstance(targets, tuple) else targets
        return out


@dataclasses.dataclass
class FinetuneResult:
    """What `run` produced: the metrics dict (as in metrics.json) and the output paths."""

    metrics: dict[str, Any]
    paths: dict[str, Path]
    interrupted: bool = False
    model: Any = None


# ----------------------------------------------------------------------------- pieces


def lm_loss(model: Callable[[jax.Array], jax.Array], batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of `batch` `[B, T + 1]`, in float32."""
    batch = jnp.asarray(batch)
    logits = model(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def lr_schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, cosine decay to `lr / 10` at `steps`."""
    steps = max(int(steps), 1)
    warmup = max(0, min(int(warmup), steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=lr / 10,
    )


@functools.lru_cache(maxsize=16)
def make_optimizer(
    lr: float, steps: int, warmup: int, *, weight_decay: float = 0.0, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """AdamW with `lr_schedule`, after global-norm gradient clipping at `clip_norm`.

    Equal arguments give the same (stateless) object, so a jitted step that closes over the
    optimizer is not compiled again for a second run with the same settings.
    """
    parts = []
    if clip_norm and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(lr_schedule(lr, steps, warmup), weight_decay=weight_decay))
    return optax.chain(*parts)


@functools.lru_cache(maxsize=16)
def make_train_step(loss_fn: Callable[[Any, Any], jax.Array] = lm_loss) -> Callable:
    """A jitted `step(model, optimizer, batch) -> loss` that trains the `ShiraParam`s only.

    Model and optimizer buffers are donated: their state is updated in place. One jitted
    function per `loss_fn`, so its compilation cache is shared by every run in a process.
    """

    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, ShiraParam))
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss

    return nnx.jit(train_step, donate_argnums=(0, 1))


def make_eval_fn(loss_fn: Callable[[Any, Any], jax.Array] = lm_loss) -> Callable:
    """A jitted `evaluate(model, batches) -> mean loss` over a list of equal-shape batches."""
    jitted = _jitted(loss_fn)

    def evaluate(model: nnx.Module, batches: Sequence[np.ndarray]) -> float:
        losses = [jitted(model, jnp.asarray(b)) for b in batches]
        return float(np.mean([float(x) for x in losses]))

    return evaluate


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
    return nnx.jit(fn)


def parse_targets(targets: str | Sequence[str]) -> str | tuple[str, ...]:
    """`--targets`: "q_proj,v_proj" -> a list (PEFT's endswith rule); a value with regex
    characters stays a regex (PEFT's fullmatch rule); "all-linear" is kept."""
    if not isinstance(targets, str):
        return tuple(targets)
    text = targets.strip()
    if text == ALL_LINEAR or any(c in text for c in "*?[]()|\\^$+"):
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise FinetuneError("--targets is empty; name layers such as q_proj,v_proj")
    return names


def shira_config(cfg: FinetuneConfig, base_model_name_or_path: str | None) -> ShiraConfig:
    """The adapter's `ShiraConfig` for these flags (random masks seeded with `--seed`)."""
    if cfg.mask not in MASK_TYPES or cfg.mask == "custom":
        choices = ", ".join(m for m in MASK_TYPES if m != "custom")
        raise FinetuneError(f"unknown --mask {cfg.mask!r}; choose one of {choices}")
    try:
        return ShiraConfig(
            r=cfg.r,
            mask_type=cfg.mask,
            random_seed=cfg.seed,
            target_modules=parse_targets(cfg.targets),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        )
    except (TypeError, ValueError) as err:
        raise FinetuneError(str(err)) from err


def check_adapter_fits(model: nnx.Module, config: ShiraConfig) -> list[str]:
    """The layer paths `config` targets in `model` (abstract models work: shapes only).

    Raises `FinetuneError` with one line when nothing matches or `r` is too large.
    """
    modules = dict(named_modules(model))
    linear = {p: m for p, m in modules.items() if isinstance(m, (nnx.Linear, ShiraDense))}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        paths = resolve_targets(config, list(linear), model_type=model_type)
    except ValueError:
        names = sorted({p.rsplit(".", 1)[-1] for p in linear})
        raise FinetuneError(
            f"--targets {_targets_text(config.target_modules)} matched no linear layer; "
            f"this model's linear layers are named: {', '.join(names)}"
        ) from None
    worst: tuple[int, str, tuple[int, int]] | None = None
    for path in paths:
        layer = linear[path]
        kernel = (layer.base_layer if isinstance(layer, ShiraDense) else layer).kernel
        n_in, n_out = int(kernel.shape[0]), int(kernel.shape[1])
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


def _targets_text(targets: Any) -> str:
    return ",".join(targets) if isinstance(targets, tuple) else str(targets)


def count_params(model: nnx.Module) -> tuple[int, int]:
    """(trainable SHiRA values, all parameters of the base model)."""
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, ShiraParam)))
    base = nnx.All(nnx.Param, nnx.Not(ShiraParam))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, base)))
    return trainable, total


# ----------------------------------------------------------------------------- model source


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
    """The model with shapes only (no weights, no memory), from `config.json`; None for GGUF."""
    from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM

    if model_path.is_file():
        return None
    try:
        config = LlamaConfig.from_dict(json.loads((model_path / "config.json").read_text()))
    except (ValueError, TypeError, KeyError) as err:
        raise FinetuneError(f"--model {model_path}: {err}") from err
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))


def load_model(model_path: Path, dtype: str) -> nnx.Module:
    """`bridge.from_pretrained` with weights and compute in `dtype` ("float32" / "bfloat16")."""
    import bridge

    return bridge.from_pretrained(model_path, dtype=DTYPES[dtype])


def keep_float32(model: nnx.Module, paths: Sequence[str]) -> None:
    """Store the kernels at `paths` (the adapted layers) in float32, in place.

    Their layers still compute in the model's dtype (`nnx.Linear` casts the kernel for the
    matmul), but the sparse update is added to an exact float32 kernel and rounded once per
    step, and its gradient is taken in float32. The other weights stay in the low precision.
    """
    modules = dict(named_modules(model))
    for path in paths:
        layer = modules[path]
        kernel = (layer.base_layer if isinstance(layer, ShiraDense) else layer).kernel
        if kernel[...].dtype != jnp.float32:
            kernel.set_value(kernel[...].astype(jnp.float32))


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


# ----------------------------------------------------------------------------- checkpoints


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

    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_adapter(model, tmp / "adapter", adapter_name=adapter_name)
        flat = nnx.to_flat_state(nnx.state(optimizer))
        tree = {f"{i:05d}": np.asarray(v[...]) for i, (_, v) in enumerate(flat)}
        ocp.PyTreeCheckpointer().save(tmp / "optimizer", tree)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "optimizer_paths": [".".join(str(k) for k in p) for p, _ in flat],
            **state,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_train_state(directory: Path) -> dict[str, Any]:
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
    state = nnx.state(optimizer)
    flat = nnx.to_flat_state(state)
    paths = [".".join(str(k) for k in p) for p, _ in flat]
    if paths != meta["optimizer_paths"]:
        raise FinetuneError(
            f"--resume: the optimizer state in {directory} does not fit this adapter "
            "(different layers); start a new run without --resume"
        )
    for i, (_, variable) in enumerate(flat):
        saved = np.asarray(tree[f"{i:05d}"])
        if saved.shape != tuple(variable.shape):
            raise FinetuneError(f"--resume: optimizer entry {paths[i]} has shape {saved.shape}")
        variable.set_value(jnp.asarray(saved, variable[...].dtype))
    nnx.update(optimizer, state)


# ----------------------------------------------------------------------------- outputs


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plot_losses(metrics: dict[str, Any], path: Path) -> bool:
    """Save the loss curve (train per step, its moving average, eval points) as a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    train = np.asarray(metrics.get("train_loss") or [], float)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(train):
        steps = np.arange(1, len(train) + 1)
        ax.plot(steps, train, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        k = max(1, min(10, len(train) // 5))
        if k > 1:
            smooth = np.convolve(train, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=2, label=f"train ({k}-step mean)")
    evals = metrics.get("eval_loss") or []
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="tab:red", lw=1.5, label="eval (held-out text)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    cfg = metrics.get("config", {})
    ax.set_title(
        f"SHiRA r={cfg.get('r')} {cfg.get('mask')} on {Path(str(cfg.get('data'))).name} "
        f"({Path(str(cfg.get('model'))).name})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.stop = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- the job


def validate(cfg: FinetuneConfig) -> None:
    """The checks that need no model or data reading: numbers, names, paths."""
    positive = {
        "--steps": cfg.steps,
        "--batch-size": cfg.batch_size,
        "--seq-len": cfg.seq_len,
        "--r": cfg.r,
        "--eval-batches": cfg.eval_batches,
    }
    for flag, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FinetuneError(f"{flag} must be a positive integer, got {value!r}")
    for flag, value in {
        "--warmup": cfg.warmup,
        "--eval-every": cfg.eval_every,
        "--ckpt-every": cfg.ckpt_every,
        "--log-every": cfg.log_every,
    }.items():
        if not isinstance(value, int) or value < 0:
            raise FinetuneError(f"{flag} must be >= 0, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise FinetuneError(f"--lr must be a positive number, got {cfg.lr!r}")
    if cfg.dtype not in DTYPES:
        raise FinetuneError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.mask in ("gradient", "snip") and cfg.calib_batches < 1:
        raise FinetuneError(f"--mask {cfg.mask} needs --calib-batches >= 1")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise FinetuneError(f"eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {cfg.out} exists and is not a folder")
    try:
        data_lib.text_files(cfg.data)
    except (FileNotFoundError, ValueError) as err:
        raise FinetuneError(str(err)) from err
    shira_config(cfg, None)  # mask / r / targets syntax
    if cfg.distributed and not cfg.mesh:
        raise FinetuneError("--distributed needs --mesh (e.g. --mesh data=-1)")
    if cfg.mesh:
        try:
            sizes = sharding.parse_mesh(cfg.mesh)
        except ValueError as err:
            raise FinetuneError(f"--mesh: {err}") from None
        _check_batch_split(cfg.batch_size, sizes)


def _check_batch_split(batch_size: int, sizes: dict[str, int]) -> None:
    """--batch-size must divide by the product of the mesh's batch axes (data, fsdp)."""
    axes = {a: n for a, n in sizes.items() if a in ("data", "fsdp") and n != -1}
    split = math.prod(axes.values())
    if batch_size % split:
        shown = "*".join(f"{a}={n}" for a, n in axes.items())
        raise FinetuneError(
            f"--batch-size {batch_size} does not divide by the mesh's batch axes "
            f"({shown} = {split})"
        )


def _check_resume(cfg: FinetuneConfig, ckpt_dir: Path) -> dict[str, Any]:
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


def _add_adapter(
    model: nnx.Module,
    cfg: FinetuneConfig,
    shira_cfg: ShiraConfig,
    batches: data_lib.Batches,
    log: Callable[[str], None],
) -> None:
    """`apply_shira`; the gradient / snip masks score the first `--calib-batches` batches."""
    calibration = None
    if shira_cfg.needs_calibration:
        calibration = [jnp.asarray(batches.batch(i)) for i in range(cfg.calib_batches)]
        log(f"mask    {cfg.mask}: calibrating on {len(calibration)} training batches")
    apply_shira(
        model,
        shira_cfg,
        cfg.adapter_name,
        loss_fn=lm_loss if calibration is not None else None,
        calibration_data=calibration,
    )


def _log_paths(paths: dict[str, Path], log: Callable[[str], None]) -> None:
    rows = [
        ("metrics", "metrics    ", ""),
        ("plot", "loss plot  ", ""),
        ("orbax", "adapter    ", "  (shira_jax.load_adapter / shira-jax generate --adapter)"),
        ("peft", "PEFT       ", "  (peft.PeftModel.from_pretrained on the base model)"),
        ("checkpoint", "checkpoint ", "  (--resume)"),
    ]
    log("wrote")
    for key, label, note in rows:
        if key in paths:
            log(f"  {label}{paths[key]}{note}")


def run(
    cfg: FinetuneConfig,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> FinetuneResult:
    """Run a fine-tuning job end to end (see the module docstring for what it writes).

    Every cheap check runs first (flags, data path, model name, targets, r), so bad input
    fails in about a second with a `FinetuneError` that is one line.

    Args:
        cfg: the job.
        log: where progress lines go.
        progress: show a tqdm bar.
        on_step: called as `on_step(step, loss)` after each step; returning True stops the
            run as Ctrl-C does (checkpoint, metrics, `interrupted=True`).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    validate(cfg)
    if cfg.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize()  # before any device use
    is_main = jax.process_index() == 0
    out = Path(cfg.out).expanduser()
    ckpt_dir = out / CHECKPOINT_DIR
    resume_meta = _check_resume(cfg, ckpt_dir) if cfg.resume else None

    model_path = resolve_model(cfg.model)
    shira_cfg = shira_config(cfg, str(model_path))
    abstract = abstract_model(model_path)
    if abstract is not None:
        check_adapter_fits(abstract, shira_cfg)
        del abstract
    tokenizer = load_model_tokenizer(model_path)
    timings["check"] = time.perf_counter() - t_start

    # ---- the long work starts here
    t = time.perf_counter()
    log(f"model   {cfg.model} ({model_path}), {cfg.dtype}")
    model = load_model(model_path, cfg.dtype)
    targets = check_adapter_fits(model, shira_cfg)  # instant; checks a GGUF model too
    keep_float32(model, targets)
    mesh = None
    if cfg.mesh:
        try:
            mesh = sharding.make_mesh(cfg.mesh)
        except ValueError as err:
            raise FinetuneError(f"--mesh: {err}") from None
        rules, batch_axes = sharding.mesh_rules(mesh)
        _check_batch_split(cfg.batch_size, dict(mesh.shape))
        sharding.annotate(model, rules, mesh=mesh)
        log(f"mesh    {dict(mesh.shape)} over {jax.process_count()} process(es)")
    vocab = int(model.config.vocab_size)
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        text = data_lib.prepare(
            cfg.data,
            tokenizer,
            seq_len=cfg.seq_len,
            eval_fraction=cfg.eval_fraction,
            max_eval_sequences=cfg.eval_batches * cfg.batch_size,
        )
    except (FileNotFoundError, ValueError) as err:
        raise FinetuneError(str(err)) from err
    top = max(int(text.train.max()), int(text.eval.max()))
    if top >= vocab:
        raise FinetuneError(
            f"the tokenizer produced id {top} but the model's vocabulary has {vocab} entries"
        )
    batches = data_lib.Batches(text.train, cfg.batch_size, seed=cfg.seed)
    eval_set = data_lib.eval_batches(text.eval, cfg.batch_size)
    timings["tokenize"] = time.perf_counter() - t

    def place(batch: np.ndarray) -> Any:
        """A batch as the step takes it: unchanged, or split over the mesh's batch axes."""
        if mesh is None:
            return batch
        if jax.process_count() > 1:  # each process passes its share of the global batch
            n = len(batch) // jax.process_count()
            batch = batch[jax.process_index() * n : (jax.process_index() + 1) * n]
        return sharding.shard_batch(batch, mesh, batch_axes)

    if mesh is not None:
        eval_set = [place(b) for b in eval_set]
    log(
        f"data    {cfg.data}: {text.n_documents} documents, {text.n_tokens:,} tokens -> "
        f"{len(text.train):,} train / {len(eval_set) * cfg.batch_size} eval sequences of "
        f"{cfg.seq_len} tokens"
    )

    # ---- adapter: a new one, or the checkpoint's (same indices, values and history)
    t = time.perf_counter()
    start_step = 0
    history: dict[str, Any] = {"train_loss": [], "eval_loss": [], "train_seconds": 0.0}
    eval_before: float | None = None
    if resume_meta is not None:
        load_adapter(model, (ckpt_dir / "adapter").absolute(), adapter_name=cfg.adapter_name)
        start_step = int(resume_meta["step"])
        history = {
            "train_loss": list(resume_meta.get("train_loss", []))[:start_step],
            "eval_loss": [e for e in resume_meta.get("eval_loss", []) if e[0] <= start_step],
            "train_seconds": float(resume_meta.get("train_seconds", 0.0)),
        }
        eval_before = resume_meta.get("eval_loss_before")
        log(f"resume  from {ckpt_dir} at step {start_step}")
    else:
        _add_adapter(model, cfg, shira_cfg, batches, log)
    if mesh is not None:
        sharding.shard_model(model, mesh)
    timings["adapter"] = time.perf_counter() - t
    in_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with in_mesh:
        eval_fn = make_eval_fn()
        trainable, total = count_params(model)
        n_layers = sum(1 for _, m in named_modules(model) if isinstance(m, ShiraDense))
        log(
            f"adapter SHiRA r={cfg.r} mask={cfg.mask} on {n_layers} layers "
            f"({_targets_text(shira_cfg.target_modules)}): {trainable:,} trainable of "
            f"{total:,} params ({100 * trainable / total:.3f}%)"
        )

        t = time.perf_counter()
        if eval_before is None:
            eval_before = eval_fn(model, eval_set)
            history["eval_loss"].append((0, eval_before))
        timings["eval_before"] = time.perf_counter() - t
        log(f"eval    before training: loss {eval_before:.4f}")

        tx = make_optimizer(
            cfg.lr, cfg.steps, cfg.warmup, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm
        )
        optimizer = nnx.Optimizer(model, tx, wrt=ShiraParam)
        if resume_meta is not None:
            restore_optimizer(ckpt_dir, optimizer, resume_meta)
        if mesh is not None:
            sharding.shard_model(optimizer, mesh)
        step_fn = make_train_step()

        def state_dict(step: int) -> dict[str, Any]:
            return {
                "step": step,
                "config": cfg.to_dict(),
                "train_loss": history["train_loss"],
                "eval_loss": history["eval_loss"],
                "eval_loss_before": eval_before,
                "train_seconds": history["train_seconds"],
            }

        # ---- train
        tokens_per_step = cfg.batch_size * cfg.seq_len
        log_every = cfg.log_every or max(1, cfg.steps // 10)
        step = start_step
        interrupted = False
        first_step_seconds = None
        steady_tokens, steady_seconds = 0, 0.0
        bar = _progress_bar(total=cfg.steps, initial=start_step, enabled=progress, log=log)
        with _StopFlag() as stop:
            while step < cfg.steps:
                batch = place(batches.batch(step))
                t0 = time.perf_counter()
                loss = float(step_fn(model, optimizer, batch))
                dt = time.perf_counter() - t0
                step += 1
                history["train_loss"].append(loss)
                history["train_seconds"] += dt
                if first_step_seconds is None:
                    first_step_seconds = dt
                else:
                    steady_tokens += tokens_per_step
                    steady_seconds += dt
                tok_s = (
                    tokens_per_step / dt if steady_seconds == 0 else steady_tokens / steady_seconds
                )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                if not math.isfinite(loss):
                    bar.close()
                    raise FinetuneError(
                        f"loss became {loss} at step {step}; lower --lr (now {cfg.lr})"
                    )
                if step % log_every == 0 or step == cfg.steps:
                    bar.write(f"step {step:5d}/{cfg.steps}  loss {loss:.4f}  {tok_s:,.0f} tok/s")
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    ev = eval_fn(model, eval_set)
                    history["eval_loss"].append((step, ev))
                    bar.write(f"step {step:5d}/{cfg.steps}  eval loss {ev:.4f}")
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                    save_train_checkpoint(
                        ckpt_dir, model, optimizer, state_dict(step), cfg.adapter_name
                    )
                if on_step is not None and on_step(step, loss):
                    stop.stop = True
                if stop.stop and step < cfg.steps:
                    interrupted = True
                    break
        bar.close()
        tokens_per_s = (
            steady_tokens / steady_seconds
            if steady_seconds
            else (tokens_per_step / first_step_seconds if first_step_seconds else None)
        )
        timings["train"] = history["train_seconds"]
        if first_step_seconds is not None:
            timings["first_step_with_compile"] = first_step_seconds

        paths: dict[str, Path] = {}
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        save_train_checkpoint(ckpt_dir, model, optimizer, state_dict(step), cfg.adapter_name)
        paths["checkpoint"] = ckpt_dir
        eval_after = None
        if not interrupted:
            eval_after = eval_fn(model, eval_set)
            if not history["eval_loss"] or history["eval_loss"][-1][0] != step:
                history["eval_loss"].append((step, eval_after))
            log(f"eval    after {step} steps: loss {eval_after:.4f} (before: {eval_before:.4f})")
            save_adapter(model, (out / "orbax").absolute(), adapter_name=cfg.adapter_name)
            paths["orbax"] = out / "orbax"
            if cfg.export_peft and is_main:
                from bridge.peft import save_peft_adapter

                save_peft_adapter(
                    model,
                    (out / "peft").absolute(),
                    adapter_name=cfg.adapter_name,
                    base_model_name_or_path=str(model_path),
                )
                paths["peft"] = out / "peft"
        timings["eval_after_and_export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    metrics = {
        "config": cfg.to_dict(),
        "model_path": str(model_path),
        "steps_done": step,
        "interrupted": interrupted,
        "train_loss": history["train_loss"],
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_loss": [list(e) for e in history["eval_loss"]],
        "tokens_per_s": tokens_per_s,
        "tokens_per_step": tokens_per_step,
        "trainable_params": trainable,
        "total_params": total,
        "data": {
            "documents": text.n_documents,
            "tokens": text.n_tokens,
            "train_sequences": int(len(text.train)),
            "eval_sequences": int(len(eval_set) * cfg.batch_size),
        },
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "backend": jax.default_backend(),
    }
    if mesh is not None:
        metrics["mesh"] = dict(mesh.shape)
        metrics["processes"] = jax.process_count()
    paths["metrics"] = out / "metrics.json"
    if is_main:
        _write_json(out / "metrics.json", metrics)
        if plot_losses(metrics, out / "loss.png"):
            paths["plot"] = out / "loss.png"

    if interrupted:
        log(f"interrupted at step {step}: checkpoint saved; continue with --resume --out {out}")
    _log_paths(paths, log)
    return FinetuneResult(metrics=metrics, paths=paths, interrupted=interrupted, model=model)


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _NoBar:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.write = log

    def set_postfix(self, **_: Any) -> None:
        pass

    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool, log: Callable[[str], None]) -> Any:
    if not enabled:
        return _NoBar(log)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- generation


def generate_text(
    model: nnx.Module,
    tokenizer: data_lib.Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt` with the model's KV-cache `generate` (greedy at temperature 0)."""
    from shira_jax.models.llama import generate

    ids = tokenizer.encode(prompt)
    if not ids:
        raise FinetuneError("the prompt is empty after tokenization")
    out = generate(
        model,
        jnp.asarray([ids], jnp.int32),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
        eos_token_id=tokenizer.eos_id,
    )
    new = [int(i) for i in np.asarray(out[0, len(ids) :])]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)
