"""`shira-jax demo`: pretrain a small MLP on task A, then adapt it to task B with SHiRA.

Synthetic data, a few seconds on a CPU: shows the trainable fraction, the falling loss, the
full rank of the learned delta, merge / unmerge and a disabled adapter.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from shira_jax.app.demo import MLP
    >>> MLP(nnx.Rngs(0))(jax.numpy.ones((2, 64))).shape
    (2, 64)
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import shira_jax as sj


class MLP(nnx.Module):
    """64 -> 256 -> 64 with a GELU."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(64, 256, rngs=rngs)
        self.down = nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.gelu(self.up(x)))


def fit(
    model: MLP, x: jax.Array, y: jax.Array, wrt: Any, steps: int, lr: float
) -> list[float]:
    """Adam on the mean squared error, training the `wrt` variables; the loss per step."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

    @nnx.jit
    def step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
        def loss_fn(model: MLP) -> jax.Array:
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def _tasks(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inputs and the targets of task A and of a shifted task B."""
    key_a, key_b, key_x = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_x, (2048, 64))
    task_a = jax.random.normal(key_a, (64, 64)) / 8
    task_b = task_a + jax.random.normal(key_b, (64, 64)) / 16
    return x, jnp.tanh(x @ task_a), jnp.tanh(x @ task_b)


def run_demo(*, r: int, steps: int, lr: float, seed: int, out: str | None = None) -> int:
    """The demo, printed step by step; 0 when the adapter lowered the loss."""
    x, y_a, y_b = _tasks(seed)
    model = MLP(nnx.Rngs(seed))
    fit(model, x, y_a, nnx.Param, 300, 3e-3)
    mse_b = lambda m: float(jnp.mean((m(x) - y_b) ** 2))
    print(f"base model pretrained on task A; MSE on task B: {mse_b(model):.4f}")

    sj.apply_shira(model, sj.ShiraConfig(r=r, target_modules=["up", "down"], random_seed=seed))
    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(model, sj.ShiraParam)))
    total = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"SHiRA r={r}: {trainable:,} trainable of {total:,} params "
        f"({100 * trainable / total:.1f}%)"
    )
    start = time.perf_counter()
    losses = fit(model, x, y_b, sj.ShiraParam, steps, lr)
    seconds = time.perf_counter() - start
    for i in range(0, steps, max(1, steps // 8)):
        print(f"  step {i:4d}  loss {losses[i]:.4f}")
    print(f"  step {steps - 1:4d}  loss {losses[-1]:.4f}   ({seconds:.1f} s)")
    delta = model.up.get_delta_weight("default")
    print(
        f"rank of the learned delta of `up`: {int(jnp.linalg.matrix_rank(delta))} "
        f"(LoRA at r={r} is capped at {r})"
    )
    adapted = mse_b(model)
    sj.merge(model)
    print(f"merged: MSE on task B {mse_b(model):.4f} (unmerged {adapted:.4f})")
    sj.unmerge(model)
    with sj.disable_adapter(model):
        print(f"adapter disabled: MSE on task B {mse_b(model):.4f}")
    if out:
        sj.save_adapter(model, out)
        print(f"adapter saved to {out}")
    return 0 if losses[-1] < losses[0] else 1
