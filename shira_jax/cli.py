"""The `shira-jax` command.

shira-jax demo              # a small NNX model fine-tuned with SHiRA on synthetic data
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    """Pretrain a small MLP on task A, then adapt it to task B with a SHiRA adapter."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import shira_jax as sj

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.up = nnx.Linear(64, 256, rngs=rngs)
            self.down = nnx.Linear(256, 64, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.down(nnx.gelu(self.up(x)))

    key_a, key_b, key_x = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (2048, 64))
    task_a = jax.random.normal(key_a, (64, 64)) / 8
    task_b = task_a + jax.random.normal(key_b, (64, 64)) / 16  # a shifted task
    y_a, y_b = jnp.tanh(x @ task_a), jnp.tanh(x @ task_b)

    def fit(model: MLP, y: jax.Array, wrt: object, steps: int, lr: float) -> list[float]:
        optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

        @nnx.jit
        def step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
            def loss_fn(model: MLP) -> jax.Array:
                return jnp.mean((model(x) - y) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
            optimizer.update(model, grads)
            return loss

        return [float(step(model, optimizer)) for _ in range(steps)]

    model = MLP(nnx.Rngs(args.seed))
    fit(model, y_a, nnx.Param, 300, 3e-3)
    mse_b = lambda m: float(jnp.mean((m(x) - y_b) ** 2))  # noqa: E731
    print(f"base model pretrained on task A; MSE on task B: {mse_b(model):.4f}")

    config = sj.ShiraConfig(r=args.r, target_modules=["up", "down"], random_seed=args.seed)
    sj.apply_shira(model, config)
    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(model, sj.ShiraParam)))
    total = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"SHiRA r={args.r}: {trainable:,} trainable of {total:,} params "
        f"({100 * trainable / total:.1f}%)"
    )
    start = time.perf_counter()
    losses = fit(model, y_b, sj.ShiraParam, args.steps, args.lr)
    seconds = time.perf_counter() - start
    for i in range(0, args.steps, max(1, args.steps // 8)):
        print(f"  step {i:4d}  loss {losses[i]:.4f}")
    print(f"  step {args.steps - 1:4d}  loss {losses[-1]:.4f}   ({seconds:.1f} s)")
    delta = model.up.get_delta_weight("default")
    print(
        f"rank of the learned delta of `up`: {int(jnp.linalg.matrix_rank(delta))} "
        f"(LoRA at r={args.r} is capped at {args.r})"
    )
    adapted = mse_b(model)
    sj.merge(model)
    print(f"merged: MSE on task B {mse_b(model):.4f} (unmerged {adapted:.4f})")
    sj.unmerge(model)
    with sj.disable_adapter(model):
        print(f"adapter disabled: MSE on task B {mse_b(model):.4f}")
    if args.out:
        sj.save_adapter(model, args.out)
        print(f"adapter saved to {args.out}")
    return 0 if losses[-1] < losses[0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="adapt a small NNX model with SHiRA on synthetic data")
    demo.add_argument("--r", type=int, default=4)
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="save the adapter (orbax) here")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        print(f"shira-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
