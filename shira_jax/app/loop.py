"""The train loop and its hooks: one small state object, and callables run after each step.

`train_loop` runs the steps; after each one it calls every hook as `hook(step, loss)`, and
stops early (`state.interrupted`) when a hook returns True. Logging, evaluation,
checkpoints, a progress bar and Ctrl-C are all hooks (`every`, `ProgressBar`, `CtrlC`).

Example:
    >>> from shira_jax.app.loop import TrainState, every, train_loop
    >>> state, seen = TrainState(), []
    >>> log = every(2, lambda step, loss: seen.append((step, loss)), last=5, at_last=True)
    >>> stop_at_4 = lambda step, loss: step == 4
    >>> train_loop(state, lambda i: 1.0 / (i + 1), 5, [log, stop_at_4])
    >>> state.step, state.interrupted, seen
    (4, True, [(2, 0.5), (4, 0.25)])
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Hook = Callable[[int, float], "bool | None"]


@dataclasses.dataclass
class TrainState:
    """Where the run is: step, loss history, train time (what a checkpoint stores), plus this
    process's step timings (not stored)."""

    step: int = 0
    train_loss: list[float] = dataclasses.field(default_factory=list)
    eval_loss: list[Any] = dataclasses.field(default_factory=list)  # (step, loss) pairs
    eval_accuracy: list[Any] = dataclasses.field(default_factory=list)  # (step, exact match)
    train_seconds: float = 0.0
    eval_before: float | None = None
    eval_after: float | None = None
    interrupted: bool = False
    first_step_seconds: float | None = None  # includes compilation
    steady_steps: int = 0
    steady_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any]) -> TrainState:
        """The state saved by `to_checkpoint` (history cut at the saved step)."""
        step = int(meta["step"])
        return cls(
            step=step,
            train_loss=list(meta.get("train_loss", []))[:step],
            eval_loss=[e for e in meta.get("eval_loss", []) if e[0] <= step],
            eval_accuracy=[e for e in meta.get("eval_accuracy", []) if e[0] <= step],
            train_seconds=float(meta.get("train_seconds", 0.0)),
            eval_before=meta.get("eval_loss_before"),
        )

    def to_checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        """The `state.json` entries of a training checkpoint."""
        return {
            "step": self.step,
            "config": config,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "eval_accuracy": self.eval_accuracy,
            "eval_loss_before": self.eval_before,
            "train_seconds": self.train_seconds,
        }

    def record(self, loss: float, seconds: float) -> None:
        """One step done: its loss and how long it took."""
        self.step += 1
        self.train_loss.append(loss)
        self.train_seconds += seconds
        if self.first_step_seconds is None:
            self.first_step_seconds = seconds
        else:
            self.steady_steps += 1
            self.steady_seconds += seconds

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        """Throughput after the first (compiling) step; the first step's while it is alone."""
        if self.steady_seconds:
            return self.steady_steps * tokens_per_step / self.steady_seconds
        if self.first_step_seconds:
            return tokens_per_step / self.first_step_seconds
        return None


def train_loop(
    state: TrainState, run_step: Callable[[int], float], steps: int, hooks: Sequence[Hook]
) -> None:
    """Run `run_step(i)` for i = state.step .. steps - 1, calling every hook after each step.

    A hook that returns True stops the loop after that step (all hooks of the step still
    run); stopping before the last step sets `state.interrupted`.
    """
    while state.step < steps:
        start = time.perf_counter()
        loss = run_step(state.step)
        state.record(loss, time.perf_counter() - start)
        stop = [hook(state.step, loss) for hook in hooks]
        if any(stop) and state.step < steps:
            state.interrupted = True
            return


def every(n: int, fn: Callable[[int, float], Any], *, last: int, at_last: bool = False) -> Hook:
    """A hook that calls `fn(step, loss)` every `n` steps (never for n = 0) before step
    `last`, and at step `last` only when `at_last`."""

    def hook(step: int, loss: float) -> None:
        if step == last:
            if at_last:
                fn(step, loss)
        elif n and step % n == 0:
            fn(step, loss)

    return hook


class ProgressBar:
    """A tqdm bar over the steps with loss and tokens/s; `write` prints above it. Disabled,
    it shows nothing and `write` goes to `log`. Use it as a context manager and a hook."""

    def __init__(
        self,
        total: int,
        initial: int,
        *,
        enabled: bool,
        log: Callable[[str], None],
        rate: Callable[[], float],
    ) -> None:
        self._args = dict(total=total, initial=initial, desc="train", unit="step")
        self._enabled, self._log, self._rate = enabled, log, rate
        self._bar: Any = None

    def __enter__(self) -> ProgressBar:
        if self._enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(**self._args, dynamic_ncols=True)
        return self

    def write(self, line: str) -> None:
        if self._bar is None:
            self._log(line)
        else:
            self._bar.write(line)

    def __call__(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self._rate():,.0f}")
            self._bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


def with_progress(items: Iterable[Any], desc: str, *, enabled: bool) -> Iterable[Any]:
    """`items`, under a transient tqdm bar when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class CtrlC:
    """First Ctrl-C asks the loop to stop after the current step (as a hook it then returns
    True); a second one aborts. Outside the main thread Ctrl-C raises as usual."""

    def __init__(self) -> None:
        self.stop = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler
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

    def __call__(self, step: int, loss: float) -> bool:
        return self.stop

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
