"""PyTorch / Hugging Face side of shira-jax: checkpoints in and out of Flax NNX models.

``import bridge`` stays light: torch and transformers are imported inside the functions that
need them.
"""

from bridge.convert import orbax_to_peft, peft_to_orbax
from bridge.gguf import EMBEDDED_MODELS, smollm2_dir
from bridge.peft import load_peft_adapter, save_peft_adapter
from bridge.weights import from_pretrained, load_tokenizer, save_pretrained

__all__ = [
    "EMBEDDED_MODELS",
    "from_pretrained",
    "load_peft_adapter",
    "load_tokenizer",
    "orbax_to_peft",
    "peft_to_orbax",
    "save_peft_adapter",
    "save_pretrained",
    "smollm2_dir",
]
