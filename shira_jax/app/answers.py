"""`--eval-generate`: greedy answers to held-out prompts and their exact-match accuracy.

Prompts are left-padded to one length and answered in batches of one size (the last batch
filled by repeating prompts), so the KV-cache decoder compiles once per run. An answer
matches when it equals the reference after `normalize` (case, surrounding whitespace and
punctuation, inner runs of whitespace).

Example:
    >>> from shira_jax.app.answers import exact_match, normalize
    >>> normalize("  Romeo and Juliet. ")
    'romeo and juliet'
    >>> exact_match(["Hamlet", "macbeth!"], ["Hamlet", "Macbeth"])
    1.0
    >>> exact_match(["The play is Hamlet"], ["Hamlet"])
    0.0
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, quotes or punctuation."""
    return _SPACES.sub(" ", text).strip().strip(string.punctuation + " ").lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after `normalize`."""
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / len(references)


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy continuation of each prompt, cut at the end-of-text token."""
    from shira_jax.models.llama import generate

    encoded = tokenizer.encode_batch(list(prompts))
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, row in enumerate(encoded):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    batch_size = min(batch_size, len(encoded))
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        pick = np.arange(start, start + batch_size) % len(encoded)
        out = generate(
            model,
            jnp.asarray(ids[pick]),
            max_new_tokens,
            eos_token_id=tokenizer.eos_id,
            attention_mask=jnp.asarray(mask[pick]),
        )
        for row in np.asarray(out[:, width:])[: len(encoded) - start]:
            new = [int(t) for t in row]
            if tokenizer.eos_id is not None and tokenizer.eos_id in new:
                new = new[: new.index(tokenizer.eos_id)]
            answers.append(tokenizer.decode(new))
    return answers


def accuracy(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16
) -> float:
    """Exact-match accuracy of greedy answers on (prompt, reference) pairs; the answer may
    run a few tokens past the longest reference."""
    longest = max(len(ids) for ids in tokenizer.encode_batch([ref for _, ref in pairs]))
    predictions = greedy_answers(
        model,
        tokenizer,
        [prompt for prompt, _ in pairs],
        max_new_tokens=longest + 4,
        batch_size=batch_size,
    )
    return exact_match(predictions, [ref for _, ref in pairs])
