"""The `shira-jax` command.

shira-jax finetune          # fine-tune SmolLM2-135M on Shakespeare with SHiRA (the main job)
shira-jax generate PROMPT   # continue a prompt with and without an adapter (KV cache)
shira-jax convert SRC DST   # adapter files: orbax checkpoint <-> PEFT folder
shira-jax demo              # a small NNX model fine-tuned with SHiRA on synthetic data

Each subcommand's flags are generated from a dataclass (`FinetuneConfig` for finetune, the
`*Options` classes below for the others), so every flag, default and help text is written
once. `bridge` (the PyTorch / HF side) is imported inside the subcommands, and nothing here
imports torch; PEFT files are written and read with safetensors alone.

Example:
    >>> from shira_jax.app.cli import build_parser
    >>> args = build_parser().parse_args(["finetune", "--r", "8", "--no-peft"])
    >>> args.r, args.targets, args.mask
    (8, 'q_proj,v_proj', 'random')
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shira_jax.app.flags import add_flags, from_namespace, option
from shira_jax.app.options import DTYPES, FinetuneConfig

MISSING: Any = dataclasses.MISSING
DEFAULT_MODEL = FinetuneConfig().model  # the embedded SmolLM2-135M


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneRunOptions:
    """The `finetune` flags that are not part of the job's `FinetuneConfig`."""

    progress: bool = option(True, "no progress bar", flag="--no-progress")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """`shira-jax generate` flags."""

    prompt: tuple[str, ...] = option(
        (), 'the prompt, e.g. "ROMEO:\\n"; or several prompts "@NAME text", one adapter each '
        '(NAME from --adapter NAME=DIR, or "base")', positional=True, nargs="*",
    )
    model: str | None = option(
        None, "base model (default: the one recorded in the adapter, else smollm2-135m)"
    )
    adapter: tuple[str, ...] = option(
        (), "[NAME=]FOLDER: a PEFT folder, orbax adapter folder, or a `finetune --out` folder; "
        "repeat it to give prompts tagged @NAME their own adapter in one batch", repeat=True,
    )
    max_new_tokens: int = option(60)
    temperature: float = option(0.0, "0: greedy")
    top_k: int | None = option(None, type=int)
    seed: int = option(0)
    dtype: str = option("float32", choices=DTYPES)
    no_base: bool = option(False, "skip the base-model generation")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """`shira-jax convert` arguments."""

    src: str = option(MISSING, positional=True)
    dst: str = option(MISSING, positional=True)
    model: str = option(
        DEFAULT_MODEL,
        "base model: the kernel shapes for PEFT -> orbax; for a Tunix model (Qwen, Gemma) "
        "also the map between its paths and HF's, both ways",
    )
    adapter_name: str | None = option(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """`shira-jax demo` flags."""

    r: int = option(4)
    steps: int = option(400)
    lr: float = option(1e-2)
    seed: int = option(0)
    out: str | None = option(None, "save the adapter (orbax) here")


# ----------------------------------------------------------------------------- subcommands


def _finetune(cfg: FinetuneConfig, run: FinetuneRunOptions) -> int:
    from shira_jax.app import finetune

    result = finetune.run(cfg, progress=run.progress)
    if result.interrupted:
        return 130
    m = result.metrics
    before, after = m["eval_loss_before"], m["eval_loss_after"]
    tok_s = m["tokens_per_s"] or 0.0
    print(
        f"done: eval loss {before:.4f} -> {after:.4f} ({after - before:+.4f}) in "
        f"{m['steps_done']} steps, {tok_s:,.0f} tokens/s, {m['seconds']['total']:.0f} s total"
    )
    print(f'try:  shira-jax generate --adapter {result.paths.get("orbax", cfg.out)} "ROMEO:\\n"')
    return 0


def _check_generate(opts: GenerateOptions) -> str:
    """The prompt (with '\\n' as a newline), after checking the numbers."""
    prompt = " ".join(opts.prompt).replace("\\n", "\n")
    if not prompt:
        raise ValueError('give a prompt, e.g. shira-jax generate "ROMEO:\\n"')
    if opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {opts.temperature}")
    if opts.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {opts.dtype!r}; choose {', '.join(DTYPES)}")
    if opts.top_k is not None and opts.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {opts.top_k}")
    return prompt


def _generate(opts: GenerateOptions) -> int:
    from shira_jax.app import generate, source

    tagged = generate.tagged_prompts(opts.prompt)
    prompt = "" if tagged else _check_generate(opts)
    if tagged:
        _check_generate(dataclasses.replace(opts, prompt=("x",)))  # the numbers only
    adapters = generate.named_adapters(opts.adapter)
    model_name = opts.model
    if model_name is None:  # the first adapter's own base model when it names a local one
        first = next(iter(adapters.values()), None)
        base = generate.adapter_base_model(*first) if first else None
        model_name = base if base else DEFAULT_MODEL
    model_path = source.resolve_model(model_name)
    tokenizer = source.load_model_tokenizer(model_path)
    model = source.load_model(model_path, opts.dtype)
    settings = dict(
        max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
        seed=opts.seed,
    )
    mode = "greedy" if opts.temperature == 0 else f"sampled, temperature {opts.temperature}"
    if tagged:
        generate.load_adapters(model, adapters, merge=False)
        texts = generate.generate_mixed(model, tokenizer, tagged, **settings)
        print(f"{len(tagged)} prompts in one batch ({mode}, {opts.max_new_tokens} new tokens)")
        for (name, text_in), text in zip(tagged, texts):
            print(f"\n--- @{name or 'base'} ---\n{text_in}{text}", flush=True)
        return 0
    if len(adapters) > 1:
        raise ValueError(
            f"{len(adapters)} adapters given: tag each prompt with the adapter it uses, e.g. "
            f'"@{next(iter(adapters))} ROMEO:"'
        )

    def show(title: str) -> None:
        text = generate.generate_text(model, tokenizer, prompt, **settings)
        print(f"\n--- {title} ---\n{prompt}{text}", flush=True)

    print(f"prompt ({mode}, {opts.max_new_tokens} new tokens):\n{prompt}", flush=True)
    if not adapters or not opts.no_base:
        show(f"base model ({model_name}, no adapter)")
    if adapters:
        generate.load_adapters(model, adapters, merge=True)  # one scatter, not one per step
        kind, folder = next(iter(adapters.values()))
        show(f"with adapter {folder} ({kind})")
    return 0


def _check_peft_destination(dst: Path, adapter_name: str | None) -> None:
    """Refuse a PEFT destination that holds anything but a PEFT adapter (files would mix)."""
    import bridge

    if not dst.is_dir():
        return
    ours = {bridge.peft.CONFIG_NAME, bridge.peft.WEIGHTS_NAME, "README.md"}
    others = sorted(
        p.name for p in dst.iterdir()
        if p.name not in ours and not p.name.startswith(".") and p.name != adapter_name
    )
    if others:
        raise ValueError(
            f"{dst} already holds other files ({others[:3]}); a PEFT adapter folder "
            "would mix with them. Pick a new or empty folder."
        )


def _shapes_model(model: str) -> Any:
    """The base model with shapes only (from config.json), or with weights for a GGUF file."""
    from shira_jax.app import source

    model_path = source.resolve_model(model)
    return source.abstract_model(model_path) or source.load_model(model_path, "float32")


def _convert(opts: ConvertOptions) -> int:
    import bridge

    # absolute paths: orbax refuses relative ones
    src, dst = Path(opts.src).expanduser().absolute(), Path(opts.dst).expanduser().absolute()
    if not src.is_dir():
        raise FileNotFoundError(f"convert: {opts.src} is not a folder")
    if not str(opts.dst).strip():
        raise ValueError("give a destination folder (DST is empty)")
    if dst == src or src in dst.parents:
        raise ValueError(f"DST {opts.dst} is inside SRC {opts.src}; pick another folder")
    if (src / "shira_adapter.json").is_file():
        # the file keeps the model's own paths; only a Tunix model's need HF's names
        _check_peft_destination(dst, opts.adapter_name)
        model = None if opts.model == DEFAULT_MODEL else _shapes_model(opts.model)
        folder = bridge.orbax_to_peft(src, dst, adapter_name=opts.adapter_name, model=model)
        print(f"PEFT adapter written to {folder} (from the orbax checkpoint {src})")
        return 0
    if (src / "adapter_config.json").is_file() or (
        opts.adapter_name and (src / opts.adapter_name / "adapter_config.json").is_file()
    ):
        # a PEFT file has no kernel shapes: read them from the base model's config (abstract)
        name = opts.adapter_name or "default"
        folder = bridge.peft_to_orbax(src, dst, adapter_name=name, model=_shapes_model(opts.model))
        print(f"orbax checkpoint written to {folder} (from the PEFT adapter {src})")
        return 0
    raise FileNotFoundError(
        f"convert: {opts.src} holds neither shira_adapter.json (orbax checkpoint) nor "
        "adapter_config.json (PEFT adapter)"
    )


def _demo(opts: DemoOptions) -> int:
    from shira_jax.app.demo import run_demo

    for flag, value in (("--r", opts.r), ("--steps", opts.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not opts.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {opts.lr}")
    if opts.out is not None and Path(opts.out).expanduser().is_file():
        raise ValueError(f"--out {opts.out} is a file; give a folder for the adapter")
    return run_demo(**dataclasses.asdict(opts))


# ----------------------------------------------------------------------------- parser


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its handler, the dataclasses its flags come from, its help."""

    handler: Callable[..., int]
    options: tuple[type, ...]
    help: str
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "finetune": Command(
        _finetune,
        (FinetuneConfig, FinetuneRunOptions),
        "fine-tune a causal LM with a SHiRA adapter (default: SmolLM2-135M on Shakespeare)",
        "Fine-tune a causal LM with SHiRA; writes OUT/metrics.json, OUT/loss.png, "
        "OUT/orbax/, OUT/peft/ and OUT/checkpoint/.",
    ),
    "generate": Command(
        _generate,
        (GenerateOptions,),
        "continue a prompt with and without an adapter",
        "Generate text with the KV cache, first with the base model, then with the "
        "adapter, so you see what fine-tuning changed. '\\n' in the prompt is a newline.",
    ),
    "convert": Command(
        _convert,
        (ConvertOptions,),
        "convert an adapter: orbax checkpoint <-> PEFT folder",
        "SRC with shira_adapter.json becomes a PEFT folder; SRC with "
        "adapter_config.json becomes an orbax checkpoint (kernel shapes from --model).",
    ),
    "demo": Command(
        _demo, (DemoOptions,), "adapt a small NNX model with SHiRA on synthetic data"
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `shira-jax` parser: one subparser per `COMMANDS` entry, flags from its dataclasses."""
    parser = _Parser(
        prog="shira-jax",
        description="SHiRA sparse adapters for JAX / Flax NNX: fine-tune, generate, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for cls in command.options:
            add_flags(subparser, cls)
        subparser.set_defaults(command_spec=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shira-jax ARGV`; errors are one line on stderr (exit code 2, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    command: Command = args.command_spec
    try:
        return command.handler(*(from_namespace(cls, args) for cls in command.options))
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
