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
