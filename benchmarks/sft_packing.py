"""Packing vs padding for jsonl training (`shira-jax finetune --rows packed|padded`).

The demo task's examples (`shira_jax.app.demo_sft`, SmolLM2's chat template) are laid out
both ways; one epoch needs `rows / batch` steps of the same shape either way, so the
speed-up is measured as (steps per epoch) x (measured seconds per train step), on SmolLM2-135M
with a SHiRA adapter (q_proj, v_proj, r=32, bf16). Padded is also measured with rows only as
long as the longest example (`--seq-len` set to it), the best padding can do.

    python -m benchmarks.sft_packing [--steps 4] [--seq-len 192] [--batch 4]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

import shira_jax as sj
from shira_jax.app import data as data_lib
from shira_jax.app import demo_sft, sft, source, steps


def seconds_per_step(model, rows: dict, batch: int, n: int) -> float:
    """Median wall seconds of `n` train steps after one compiling step."""
    optimizer = nnx.Optimizer(model, steps.make_optimizer(1e-3, 100, 0), wrt=sj.ShiraParam)
    step = steps.make_accum_step(1)
    batches = data_lib.Batches(rows, batch, seed=0)
    jax.block_until_ready(step(model, optimizer, batches.batch(0)))
    times = []
    for i in range(1, n + 1):
        start = time.perf_counter()
        jax.block_until_ready(step(model, optimizer, batches.batch(i)))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    path = source.resolve_model("smollm2-135m")
    tokenizer = source.load_model_tokenizer(path)
    template = sft.load_chat_template(path)
    train, _ = demo_sft.play_examples(per_play_train=150, per_play_eval=0, seed=0)
    examples = [sft.parse_record(r, f"demo:{i}") for i, r in enumerate(train)]
    encoded = sft.encode_examples(examples, tokenizer, template)
    longest = max(len(ids) for ids, _ in encoded)
    layouts = {
        f"packed, rows of {args.seq_len}": sft.pack_rows(encoded, args.seq_len + 1, 2),
        f"padded, rows of {args.seq_len}": sft.pad_rows(encoded, args.seq_len + 1, 2),
        f"padded, rows of {longest - 1} (longest)": sft.pad_rows(encoded, longest, 2),
    }
    model = source.load_model(path, "bfloat16")
    sj.apply_shira(model, sj.ShiraConfig(r=32, target_modules=["q_proj", "v_proj"]))
    print(
        f"{len(encoded)} examples, {sum(len(i) for i, _ in encoded):,} tokens, "
        f"longest {longest}; batch {args.batch}, {jax.default_backend()}"
    )
    epochs = {}
    for name, rows in layouts.items():
        n_rows = len(rows["tokens"])
        per_step = seconds_per_step(model, rows, args.batch, args.steps)
        epochs[name] = per_step * n_rows / args.batch
        fill = float((rows["segment_ids"] > 0).mean())
        print(
            f"{name:32s} {n_rows:4d} rows ({100 * fill:3.0f}% filled)  "
            f"{per_step:6.2f} s/step  epoch {epochs[name]:7.1f} s"
        )
    packed = next(iter(epochs.values()))
    for name, seconds in list(epochs.items())[1:]:
        print(f"packing speed-up over {name}: {seconds / packed:.2f}x")


if __name__ == "__main__":
    main()
