"""Shared machinery: paired timing, figures with goals, machine information, model builders.

A `Figure` is one measured ratio (contender / baseline) with both medians, an optional goal
(`"<= 1.3"` or `">= 15"`) and a note. `paired` runs callables round-robin so that slow drifts
of a shared machine hit every contender alike. The models every benchmark builds live here
once: Llama shapes (`SMOLLM2`, `TINY_LLAMA`) for JAX (`jax_llama`) and torch (`torch_llama`),
and a plain stack of square `nnx.Linear` layers (`LinearStack`).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "ALL_LINEAR",
    "QV",
    "SMOLLM2",
    "TINY_LLAMA",
    "Figure",
    "LinearStack",
    "Section",
    "block",
    "jax_llama",
    "machine_info",
    "paired",
    "ratio_figure",
    "torch_llama",
]

# ----------------------------------------------------------------------------- models

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def jax_llama(config: dict[str, Any], layers: int) -> LlamaForCausalLM:
    """The NNX Llama with `config`'s shapes and `layers` decoder layers (random weights)."""
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **config), rngs=nnx.Rngs(0))


def torch_llama(config: dict[str, Any], layers: int) -> Any:
    """transformers' LlamaForCausalLM with the same shapes (fp32, seeded; callers pick
    `.train()` / `.eval()` and the dtype)."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_hidden_layers=layers, **config)
    ).float()


class LinearStack(nnx.Module):
    """`depth` square `nnx.Linear(width, width)` layers with ReLU between (`layers.N`)."""

    def __init__(self, width: int, depth: int = 4) -> None:
        self.layers = nnx.List([nnx.Linear(width, width, rngs=nnx.Rngs(i)) for i in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


# ----------------------------------------------------------------------------- timing


def block(value: Any) -> Any:
    """Wait for every array in `value` (JAX async dispatch; torch and NumPy are synchronous)."""
    return jax.block_until_ready(value)


@dataclasses.dataclass
class Figure:
    """One ratio: `value = contender / baseline` (times: medians in ms; memory: MiB)."""

    name: str
    value: float
    contender: float | None = None
    baseline: float | None = None
    unit: str = "ms"
    goal: str | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, bound = self.goal.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def row(self) -> str:
        def fmt(x: float | None) -> str:
            if x is None:
                return ""
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"

        goal = "" if self.goal is None else f"{self.goal}: {'met' if self.met else 'MISSED'}"
        return (
            f"| {self.name} | **{self.value:.3g}x** | {fmt(self.contender)} | "
            f"{fmt(self.baseline)} | {self.unit} | {goal} | {self.note} |"
        )


@dataclasses.dataclass
class Section:
    """The figures of one benchmark, with the text that explains them."""

    title: str
    command: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    text: str = ""
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Command: `{self.command}` ({self.seconds:.0f} s)", ""]
        if self.figures:
            lines += [
                "| figure (contender / baseline) | ratio | contender | baseline | unit | goal "
                "| note |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            lines += [f.row() for f in self.figures]
            lines.append("")
        if self.text:
            lines += [self.text.strip(), ""]
        return "\n".join(lines)


def paired(
    fns: Mapping[str, Callable[[], Any]],
    *,
    reps: int,
    warmup: int = 1,
    setup: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each callable, run round-robin (A B C A B C ...) after `warmup`
    untimed rounds. `setup[name]()`, if given, runs untimed before each call of `name`."""
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if name in setup:
                block(setup[name]())
            gc.collect()
            t0 = time.perf_counter()
            block(fn())
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def ratio_figure(
    name: str,
    times: Mapping[str, Sequence[float]],
    contender: str,
    baseline: str,
    *,
    goal: str | None = None,
    note: str = "",
) -> Figure:
    """median(contender) / median(baseline) over the interleaved rounds, with both medians.

    (The ratio of medians: with a handful of rounds on a shared machine it is steadier than
    the median of per-round ratios, whose every term carries both contenders' noise.)
    """
    a, b = statistics.median(times[contender]), statistics.median(times[baseline])
    return Figure(name, a / b, 1e3 * a, 1e3 * b, "ms", goal, note)


def machine_info() -> dict[str, str]:
    """CPU, cores, memory, load and library versions, for the report header."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    info["cores"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory"] = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["load average (1/5/15 min) at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    info["python"] = platform.python_version()
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = "not installed"
    info["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    info["jax backend"] = f"{jax.default_backend()} ({len(jax.devices())} device(s))"
    return info


def torch_threads() -> int:
    """Give torch the same threads as XLA's CPU client (all cores) and return the count."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
