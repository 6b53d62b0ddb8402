"""The training math of `shira-jax finetune`: loss, optimizer, jitted train and eval steps.

Only the SHiRA values (`sj.ShiraParam`) train. The step functions are cached per loss
function and the optimizer per setting, so a second run in one process reuses the compiled
programs.

Example:
    >>> from shira_jax.app import steps
    >>> schedule = steps.lr_schedule(1e-3, steps=100, warmup=10)
    >>> [round(float(schedule(s)), 6) for s in (0, 5, 10, 100)]
    [0.0, 0.0005, 0.001, 0.0001]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import shira_jax as sj


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
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, sj.ShiraParam))
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss

    return nnx.jit(train_step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
    return nnx.jit(fn)


def make_eval_fn(loss_fn: Callable[[Any, Any], jax.Array] = lm_loss) -> Callable:
    """A jitted `evaluate(model, batches) -> mean loss` over a list of equal-shape batches."""
    jitted = _jitted(loss_fn)

    def evaluate(model: nnx.Module, batches: Sequence[np.ndarray]) -> float:
        losses = [jitted(model, jnp.asarray(b)) for b in batches]
        return float(np.mean([float(x) for x in losses]))

    return evaluate
