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
from shira_jax.app import lm


def lm_loss(model: Callable[[jax.Array], jax.Array], batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of `batch` `[B, T + 1]`, in float32."""
    batch = jnp.asarray(batch)
    logits = lm.forward(model, batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def token_losses(model: Callable[..., jax.Array], batch: Any) -> tuple[jax.Array, jax.Array]:
    """Per-target cross-entropy `[B, T]` (float32) and its weights `[B, T]`.

    `batch` is a token array `[B, T + 1]` (every target counts) or a row dict of
    `shira_jax.app.sft` (`tokens`, `weights`, `segment_ids`, `positions`): the model then
    sees the segment ids and positions, and only weighted targets count.
    """
    if isinstance(batch, dict):
        tokens = jnp.asarray(batch["tokens"])
        logits = lm.forward(
            model, tokens[:, :-1], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        weights = jnp.asarray(batch["weights"], jnp.float32)
    else:
        tokens = jnp.asarray(batch)
        logits = lm.forward(model, tokens[:, :-1])
        weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return ce * weights, weights


def token_sums(model: Callable[..., jax.Array], batch: Any) -> tuple[jax.Array, jax.Array]:
    """(sum of the counted targets' cross-entropy, how many targets count)."""
    losses, weights = token_losses(model, batch)
    return losses.sum(), weights.sum()


def masked_loss(model: Callable[..., jax.Array], batch: Any) -> jax.Array:
    """Mean cross-entropy over the counted targets (`lm_loss` for a plain token array)."""
    total, count = token_sums(model, batch)
    return total / jnp.maximum(count, 1.0)


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
def make_accum_step(grad_accum: int) -> Callable:
    """A jitted `step(model, optimizer, batch) -> loss` over `grad_accum` micro-batches.

    The batch (`[grad_accum * m, ...]`, array or row dict) is split into `grad_accum`
    micro-batches of `m` rows, run one after another (`lax.scan`); the gradients of the
    summed token losses are added up and divided by the total count of trained targets once,
    so the update equals that of the whole batch in one step (up to float summation order).
    """

    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> jax.Array:
        graphdef, params, rest = nnx.split(model, sj.ShiraParam, ...)
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
        )

        def sums(p: Any, mb: Any) -> tuple[jax.Array, jax.Array]:
            return token_sums(nnx.merge(graphdef, p, rest), mb)

        def body(carry: Any, mb: Any) -> tuple[Any, None]:
            grads, total, count = carry
            (s, n), g = jax.value_and_grad(sums, has_aux=True)(params, mb)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
        (grads, total, count), _ = jax.lax.scan(body, init, micro)
        count = jnp.maximum(count, 1.0)
        optimizer.update(model, jax.tree.map(lambda g: g / count, grads))
        return total / count

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


def make_sums_eval_fn() -> Callable:
    """A jitted `evaluate(model, batches) -> loss`: counted-target mean over all batches."""
    jitted = _jitted(token_sums)

    def evaluate(model: nnx.Module, batches: Sequence[Any]) -> float:
        sums = [jitted(model, b) for b in batches]
        count = sum(float(n) for _, n in sums)
        return sum(float(s) for s, _ in sums) / max(count, 1.0)

    return evaluate
