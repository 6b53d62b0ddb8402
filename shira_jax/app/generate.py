"""Text generation for `shira-jax generate`: the KV-cache decoder, and which folder holds
the adapter (an orbax checkpoint, a PEFT folder, or a `shira-jax finetune --out` folder).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from shira_jax.app.generate import adapter_source
    >>> run = Path(tempfile.mkdtemp())
    >>> (run / "peft").mkdir()
    >>> _ = (run / "peft" / "adapter_config.json").write_text("{}")
    >>> kind, folder = adapter_source(str(run))
    >>> kind, folder.name
    ('peft', 'peft')
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shira_jax.app import data as data_lib
from shira_jax.app import lm
from shira_jax.app.options import FinetuneError

ORBAX_MARKER = "shira_adapter.json"
PEFT_MARKER = "adapter_config.json"


def generate_text(
    model: nnx.Module,
    tokenizer: data_lib.Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt` with the model's KV-cache `generate` (greedy at temperature 0)."""
    from shira_jax.models.llama import generate

    ids = tokenizer.encode(prompt)
    if not ids:
        raise FinetuneError("the prompt is empty after tokenization")
    if lm.is_tunix(model):  # Tunix's models have their own cache layout: decode without one
        generate = lm.decode
    out = generate(
        model,
        jnp.asarray([ids], jnp.int32),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
        eos_token_id=tokenizer.eos_id,
    )
    new = [int(i) for i in np.asarray(out[0, len(ids) :])]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def named_adapters(specs: tuple[str, ...]) -> dict[str, tuple[str, Path]]:
    """`--adapter [NAME=]FOLDER` values -> {name: (kind, folder)} (name "default" if none).

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "adapter_config.json").write_text("{}")
    >>> list(named_adapters((f"poems={run}",)))
    ['poems']
    """
    out: dict[str, tuple[str, Path]] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or "/" in name or not name:
            name, folder = "default", spec
        if name in out or name == "base":
            raise ValueError(f"--adapter {spec}: the name {name!r} is taken; give NAME=FOLDER")
        out[name] = adapter_source(folder)
    return out


def tagged_prompts(words: tuple[str, ...]) -> list[tuple[str | None, str]]:
    """Prompts given as "@NAME text" arguments -> [(adapter name or None for "base", text)];
    [] when no argument is tagged. '\\n' becomes a newline.

    >>> tagged_prompts(("@poems ROMEO:", "@base JULIET:"))
    [('poems', 'ROMEO:'), (None, 'JULIET:')]
    """
    if not any(w.startswith("@") for w in words):
        return []
    out = []
    for word in words:
        name, _, text = word.partition(" ")
        if not name.startswith("@") or len(name) < 2 or not text:
            raise ValueError(f'tag every prompt with its adapter: "@NAME text", got {word!r}')
        out.append((None if name == "@base" else name[1:], text.replace("\\n", "\n")))
    return out


def load_adapters(model: nnx.Module, adapters: dict[str, tuple[str, Path]], *, merge: bool):
    """Load every adapter under its name (orbax or PEFT); `merge` folds in the first one."""
    import shira_jax as sj

    for name, (kind, folder) in adapters.items():
        if kind == "orbax":
            sj.load_adapter(model, folder.absolute(), adapter_name=name)
        else:
            import bridge

            bridge.load_peft_adapter(model, folder.absolute(), adapter_name=name)
    if merge and adapters:
        sj.merge(model)


def generate_mixed(
    model: nnx.Module,
    tokenizer: data_lib.Tokenizer,
    prompts: list[tuple[str | None, str]],
    *,
    max_new_tokens: int = 60,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Continue every prompt with its own adapter (None: the base model) in one left-padded
    batch (`sj.mixed_adapters`); returns the new text of each prompt."""
    import shira_jax as sj
    from shira_jax.models.llama import generate

    if lm.is_tunix(model):
        raise FinetuneError("one adapter per prompt needs shira-jax's Llama (KV-cache decoding)")
    rows = [tokenizer.encode(text) for _, text in prompts]
    if not all(rows):
        raise FinetuneError("a prompt is empty after tokenization")
    width = max(len(r) for r in rows)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    index = sj.adapter_index(model, [name for name, _ in prompts])
    with sj.mixed_adapters(model, index):
        out = generate(
            model, jnp.asarray(ids), max_new_tokens, temperature=temperature, top_k=top_k,
            rng=jax.random.key(seed), eos_token_id=tokenizer.eos_id, attention_mask=mask,
        )
    texts = []
    for row in np.asarray(out[:, width:]):
        new = [int(i) for i in row]
        if tokenizer.eos_id is not None and tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(new))
    return texts


def adapter_source(path_text: str) -> tuple[str, Path]:
    """("orbax" | "peft", folder) for --adapter: an adapter folder or a finetune --out folder."""
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {path_text}: no such folder")
    for kind, sub in (("orbax", "."), ("peft", "."), ("orbax", "orbax"), ("peft", "peft")):
        folder = path / sub
        if (folder / (ORBAX_MARKER if kind == "orbax" else PEFT_MARKER)).is_file():
            return kind, folder
    raise FileNotFoundError(
        f"--adapter {path_text}: not a shira-jax adapter ({ORBAX_MARKER}), a PEFT adapter "
        f"({PEFT_MARKER}) or a `shira-jax finetune --out` folder"
    )


def adapter_base_model(kind: str, folder: Path) -> str | None:
    """`base_model_name_or_path` recorded with an adapter, if it is a local model folder."""
    try:
        if kind == "orbax":
            config = json.loads((folder / ORBAX_MARKER).read_text()).get("config") or {}
        else:
            config = json.loads((folder / PEFT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    return base if base and (Path(base) / "config.json").is_file() else None
