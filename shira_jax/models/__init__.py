"""Flax NNX model architectures whose module paths mirror Hugging Face transformers.

Loading and saving Hugging Face checkpoints lives in :mod:`bridge` (``bridge.from_pretrained``,
``bridge.save_pretrained``); this package is JAX only.
"""

from shira_jax.models.llama import (
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
    RopeScaling,
    generate,
)

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "RopeScaling", "generate"]
