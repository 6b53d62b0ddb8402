"""Instruction and chat data for `shira-jax finetune --data FILE.jsonl`: records, templates,
loss masks, and rows packed with segment ids.

A `.jsonl` file (or a folder of them) holds one example per line, in one of two shapes:

    {"prompt": "...", "completion": "..."}          plain text: prompt + completion + eos
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}

Messages are rendered with the model's chat template (`chat_template.jinja` or
`tokenizer_config.json`'s `chat_template`, rendered with jinja2 in a sandbox as transformers
does) when the model has one, else with `PLAIN_TEMPLATE`. The loss counts only completion /
assistant tokens (their end-of-turn token included) unless `train_on_prompt`.

Examples become rows of `seq_len + 1` tokens: several per row (`pack_rows`, best-fit by
length), each with its own segment id and positions restarting at 0, so attention never
crosses an example boundary; or one per row, padded (`pad_rows`). A row batch is a dict:

    tokens       [N, seq_len + 1] int32   inputs are tokens[:, :-1], targets tokens[:, 1:]
    weights      [N, seq_len]     float32 1 where the target is a trained token
    segment_ids  [N, seq_len]     int32   1, 2, ... per example in the row; 0 = padding
    positions    [N, seq_len]     int32   RoPE positions, 0 at each example's start

Bad data fails with one line naming the file, the line and the field (`DataError`).

Example:
    >>> from shira_jax.app import sft
    >>> ex = sft.parse_record({"prompt": "2+2=", "completion": "4"}, "a.jsonl:1")
    >>> sft.render_segments(ex, None)
    [('2+2=', False), ('4', True)]
    >>> rows = sft.pack_rows([([5, 6, 7], [0, 0, 1]), ([8, 9], [0, 1])], width=6, pad_id=0)
    >>> rows["tokens"].tolist(), rows["segment_ids"].tolist(), rows["positions"].tolist()
    ([[5, 6, 7, 8, 9, 0]], [[1, 1, 1, 2, 2]], [[0, 1, 2, 0, 1]])
    >>> rows["weights"].tolist()  # targets 7 and 9 train; 8 starts the next example: none
    [[0.0, 1.0, 0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
TOO_LONG = ("error", "truncate", "skip")
ROW_LAYOUTS = ("packed", "padded")
# Without a model chat template, messages render as "System: ...\n", "User: ...\n" and
# "Assistant: " + content + eos (the eos token id, then "\n" before a next turn).
PLAIN_TEMPLATE = "{Role}: {content}\n"
Template = Callable[[list[dict[str, str]], bool], str]
EOS = -1  # a placeholder piece in `render_segments`: the tokenizer's end-of-text id


class DataError(ValueError):
    """Bad jsonl data: one line naming the file, the line number and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One record: `prompt` + `completion`, or `messages` ((role, content) pairs)."""

    where: str  # "file:line"
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


# ----------------------------------------------------------------------------- files


def is_jsonl(source: str | Path) -> bool:
    """True when `--data` names a `.jsonl` file or a folder that holds `.jsonl` files."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix == ".jsonl"
    return path.is_dir() and any(p.is_file() for p in path.rglob("*.jsonl"))


def jsonl_files(source: str | Path) -> list[Path]:
    """The `.jsonl` files `source` names (one file, or a folder's, sorted)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"data path {str(source)!r}: no .jsonl file there")
    return files


def _check_text(record: dict, key: str, where: str, *, empty_ok: bool = False) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _parse_messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field {field!r} must be an object with role and content")
        role = _check_text(message, "role", f"{where}: {field}")
        if role not in ROLES:
            raise DataError(f"{where}: field '{field}.role' is {role!r}; use one of {ROLES}")
        content = _check_text(message, "content", f"{where}: {field}", empty_ok=role != "assistant")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise DataError(f"{where}: field 'messages' has no assistant message to train on")
    return tuple(out)


def parse_record(record: Any, where: str) -> Example:
    """One decoded jsonl line as an `Example`; `DataError` names `where` and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Example(where, messages=_parse_messages(record["messages"], where))
    if "prompt" not in record and "completion" not in record:
        raise DataError(
            f"{where}: missing key 'messages' or 'prompt'/'completion' "
            f"(keys: {', '.join(map(repr, record)) or 'none'})"
        )
    prompt = _check_text(record, "prompt", where, empty_ok=True)
    return Example(where, prompt=prompt, completion=_check_text(record, "completion", where))


def read_examples(source: str | Path) -> list[Example]:
    """Every example of `source` (`.jsonl` file or folder), checked; no tokenizer needed."""
    examples = []
    for path in jsonl_files(source):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read: {err}") from err
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            examples.append(parse_record(record, where))
    if not examples:
        raise DataError(f"data {str(source)!r} holds no examples")
    return examples


# ----------------------------------------------------------------------------- templates


def load_chat_template(model_path: str | Path) -> Template | None:
    """The model's chat template as `render(messages, add_generation_prompt) -> str`.

    Read from `chat_template.jinja` or `tokenizer_config.json` next to the model; None when
    there is none (or jinja2 is not installed): `PLAIN_TEMPLATE` is used then.
    """
    folder = Path(model_path)
    folder = folder.parent if folder.is_file() else folder  # a model file: look beside it
    source = None
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        source = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(source, str) or not source.strip():
        return None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(source)
    return lambda messages, add_generation_prompt: compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def _template_segments(messages: Sequence[tuple[str, str]], template: Template) -> list:
    """Each message's share of the rendered conversation (the difference of growing prefixes);
    an assistant turn's header is prompt, its content and end-of-turn trained."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        upto = [{"role": r, "content": c} for r, c in messages[: i + 1]]
        full = template(upto, False)
        parts = [(full, False)]
        if role == "assistant":
            parts = [(template(upto[:-1], True), False), (full, True)]
        for text, trained in parts:
            if not text.startswith(done):
                raise DataError(
                    "the model's chat template does not render a conversation as growing "
                    "prefixes; use prompt/completion records"
                )
            segments.append((text[len(done) :], trained))
            done = text
    return [(t, trained) for t, trained in segments if t]


def render_segments(example: Example, template: Template | None) -> list[tuple[Any, bool]]:
    """The example as (text, trained) pieces; an int piece is a token id (the eos)."""
    if example.messages is None:
        return [(example.prompt, False), (example.completion, True)]
    if template is not None:
        return _template_segments(example.messages, template)
    segments: list[tuple[Any, bool]] = []
    for role, content in example.messages:
        if role == "assistant":
            segments += [("Assistant: ", False), (content, True), (EOS, True), ("\n", False)]
        else:
            segments.append((PLAIN_TEMPLATE.format(Role=role.capitalize(), content=content), False))
    return segments[:-1]


def prompt_and_answer(example: Example, template: Template | None) -> tuple[str, str] | None:
    """(prompt text to generate from, reference answer) for `--eval-generate`: the last
    assistant message and everything before it; None when the last message is not one."""
    if example.messages is None:
        return example.prompt, example.completion
    *before, (role, answer) = example.messages
    if role != "assistant":
        return None
    if template is not None:
        return template([{"role": r, "content": c} for r, c in before], True), answer
    head = "".join(PLAIN_TEMPLATE.format(Role=r.capitalize(), content=c) for r, c in before)
    return head + "Assistant: ", answer


# ----------------------------------------------------------------------------- tokens


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    template: Template | None,
    *,
    train_on_prompt: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """(token ids, trained flags) per example; prompt/completion records end with the eos
    (trained), so the model learns to stop."""
    pieces = []
    for ex in examples:
        segs = render_segments(ex, template)
        if ex.messages is None and tokenizer.eos_id is not None:
            segs.append((EOS, True))
        pieces.append(segs)
    texts = [text for segs in pieces for text, _ in segs if text != EOS]
    encoded = iter(tokenizer.encode_batch(texts))
    out = []
    for segs in pieces:
        ids: list[int] = []
        flags: list[int] = []
        for text, trained in segs:
            piece = [tokenizer.eos_id] if text == EOS else next(encoded)
            ids += piece
            flags += [int(trained or train_on_prompt)] * len(piece)
        out.append((ids, flags))
    return out


def fit_length(
    encoded: list[tuple[list[int], list[int]]],
    examples: Sequence[Example],
    width: int,
    policy: str,
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """Examples of at most `width` tokens; longer ones raise ("error"), are cut ("truncate")
    or dropped ("skip"). Examples left with no trained token are dropped too. Returns the
    kept examples and the counts {"truncated", "skipped"}."""
    kept, counts = [], {"truncated": 0, "skipped": 0}
    for (ids, flags), ex in zip(encoded, examples):
        if len(ids) > width:
            field = "messages" if ex.messages is not None else "prompt + completion"
            if policy == "error":
                raise DataError(
                    f"{ex.where}: field {field!r} is {len(ids)} tokens after templating, "
                    f"over --seq-len {width - 1} + 1; pass --too-long truncate or skip"
                )
            if policy == "skip":
                counts["skipped"] += 1
                continue
            ids, flags = ids[:width], flags[:width]
            counts["truncated"] += 1
        if sum(flags[1:]) == 0:
            counts["skipped"] += 1
            continue
        kept.append((ids, flags))
    return kept, counts


def _rows(groups: list[list[tuple[list[int], list[int]]]], width: int, pad_id: int) -> dict:
    n = len(groups)
    tokens = np.full((n, width), pad_id, np.int32)
    trained = np.zeros((n, width), np.float32)
    seg = np.zeros((n, width), np.int32)
    pos = np.zeros((n, width), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for s, (ids, flags) in enumerate(group, 1):
            end = at + len(ids)
            tokens[r, at:end], trained[r, at:end] = ids, flags
            seg[r, at:end], pos[r, at:end] = s, np.arange(len(ids))
            at = end
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": tokens,
        "weights": (trained[:, 1:] * same).astype(np.float32),
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
    }


def pack_rows(examples: Sequence[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict:
    """Examples (each at most `width` tokens) packed best-fit, longest first, into rows of
    `width` tokens; returns the row batch dict (see the module docstring)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    groups: list[list] = []
    free: list[tuple[int, int]] = []  # (room left, row) sorted
    for i in order:
        size = len(examples[i][0])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            groups.append([])
            room, row = width, len(groups) - 1
        else:
            room, row = free.pop(at)
        groups[row].append(examples[i])
        if room - size > 1:  # a 1-token remainder holds no (input, target) pair
            bisect.insort(free, (room - size, row))
    return _rows(groups, width, pad_id)


def pad_rows(examples: Sequence[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict:
    """One example per row, padded to `width` tokens (same dict as `pack_rows`)."""
    return _rows([[ex] for ex in examples], width, pad_id)


# ----------------------------------------------------------------------------- job input


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Train and eval rows of a jsonl run, the eval (prompt, answer) pairs, and counts."""

    train: dict
    eval: dict
    eval_pairs: list[tuple[str, str]]
    n_examples: int
    n_eval_examples: int
    n_tokens: int
    counts: dict[str, int]
    template: str  # "model" (the model's chat template) or "plain"

    @property
    def fill(self) -> float:
        """The fraction of input slots of the train rows that hold a real token."""
        return float((self.train["segment_ids"] > 0).mean())


def _split(examples: list[Example], fraction: float, limit: int) -> tuple[list, list]:
    """An evenly spread held-out slice of `examples` (at least 1, at most `limit`)."""
    if len(examples) < 2:
        raise DataError(f"{examples[0].where}: one example; pass --eval-data or add more")
    n = min(limit, max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(np.linspace(0, len(examples) - 1, n).round().astype(int).tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in held]


def prepare(
    source: str | Path,
    tokenizer: Any,
    template: Template | None,
    *,
    seq_len: int,
    eval_source: str | Path | None = None,
    eval_fraction: float = 0.05,
    max_eval: int = 64,
    rows: str = "packed",
    too_long: str = "error",
    train_on_prompt: bool = False,
) -> SFTData:
    """Read, check, template, tokenize and lay out `--data` (and `--eval-data`) as rows."""
    train = read_examples(source)
    if eval_source is not None:
        held = read_examples(eval_source)
    else:
        train, held = _split(train, eval_fraction, max_eval)
    layout = pack_rows if rows == "packed" else pad_rows
    width, pad = seq_len + 1, tokenizer.eos_id if tokenizer.eos_id is not None else 0
    out, counts = [], {}
    for name, examples in (("train", train), ("eval", held)):
        encoded = encode_examples(examples, tokenizer, template, train_on_prompt=train_on_prompt)
        kept, fitted = fit_length(encoded, examples, width, too_long)
        if not kept:
            raise DataError(f"no {name} example fits --seq-len {seq_len} (all skipped)")
        counts.update({f"{name}_{k}": v for k, v in fitted.items()})
        out.append((layout(kept, width, pad), kept))
    (train_rows, kept), (eval_rows, _) = out
    pairs = [p for p in (prompt_and_answer(e, template) for e in held) if p is not None]
    return SFTData(
        train=train_rows,
        eval=eval_rows,
        eval_pairs=pairs,
        n_examples=len(kept),
        n_eval_examples=len(held),
        n_tokens=sum(len(ids) for ids, _ in kept),
        counts=counts,
        template="model" if template is not None else "plain",
    )
