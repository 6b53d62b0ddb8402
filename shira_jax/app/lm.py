"""One calling convention for the causal LMs the app trains: shira-jax's Llama and Tunix's models.

shira-jax's Llama is called `model(tokens, positions=..., segment_ids=...) -> logits`; a Tunix
model (`bridge.tunix`: Qwen3, Qwen2, Llama3, Gemma3) is called `model(tokens, positions,
cache, attention_mask) -> (logits, cache)` with an explicit `[B, T, T]` attention mask.
`forward` hides the difference: for a Tunix model it builds the causal mask (restricted to
each example of a packed row when `segment_ids` are given) and the positions.

Example (shira-jax's Llama; tests/test_tunix.py runs the Tunix side):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from shira_jax.app import lm
    >>> from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=1, num_attention_heads=4)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> lm.forward(model, jnp.array([[1, 2, 3]])).shape, lm.vocab_size(model)
    ((1, 3, 64), 64)
    >>> lm.attention_mask(jnp.array([[1, 1, 2]])).astype(int).tolist()
    [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_tunix(model: Any) -> bool:
    """True for a model of Tunix's (`tunix.models.*`), called with an explicit mask."""
    return type(model).__module__.startswith("tunix.models.")


def vocab_size(model: Any) -> int:
    """The number of logits per token (Tunix's Gemma3 calls it `num_embed`)."""
    config = model.config
    return int(getattr(config, "vocab_size", None) or config.num_embed)


def attention_mask(segment_ids: jax.Array, *, causal: bool = True) -> jax.Array:
    """`[B, T, T]` bool: query t sees key s when s <= t and both are in the same segment."""
    seg = jnp.asarray(segment_ids)
    mask = seg[:, :, None] == seg[:, None, :]
    if causal:
        t = seg.shape[1]
        mask = mask & jnp.tril(jnp.ones((t, t), bool))[None]
    return mask


def forward(
    model: Any,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits `[B, T, V]` of `tokens` `[B, T]` for either calling convention.

    `positions` / `segment_ids` (packed rows: positions restart per example, attention stays
    inside it) are optional; without them every row is one causal sequence from position 0.
    """
    tokens = jnp.asarray(tokens)
    if not is_tunix(model):
        if positions is None and segment_ids is None:
            return model(tokens)
        return model(tokens, positions=positions, segment_ids=segment_ids)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    logits, _ = model(tokens, jnp.asarray(positions), None, attention_mask(seg))
    return logits


def decode(
    model: Any,
    ids: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_token_id: int | None = None,
) -> jax.Array:
    """Greedy (or sampled) continuation of `ids` `[1, T]` without a KV cache: one forward per
    new token over a fixed-length buffer (compiled once). For Tunix models in
    `shira-jax generate`; shira-jax's Llama has a KV-cache `generate`."""
    from flax import nnx

    ids = jnp.asarray(ids, jnp.int32)
    n = ids.shape[1]
    buf = jnp.zeros((1, n + max_new_tokens), jnp.int32).at[:, :n].set(ids)
    step = nnx.jit(lambda m, b: forward(m, b))
    rng = jax.random.key(0) if rng is None else rng
    for i in range(n, n + max_new_tokens):
        logits = step(model, buf)[0, i - 1].astype(jnp.float32)
        if temperature > 0:
            if top_k:
                cutoff = jnp.sort(logits)[-top_k]
                logits = jnp.where(logits < cutoff, -jnp.inf, logits)
            rng, key = jax.random.split(rng)
            token = jax.random.categorical(key, logits / temperature)
        else:
            token = jnp.argmax(logits)
        buf = buf.at[0, i].set(token.astype(jnp.int32))
        if eos_token_id is not None and int(token) == eos_token_id:
            return buf[:, : i + 1]
    return buf


def commit_to_device(*nodes: Any) -> None:
    """Put every uncommitted array of `nodes` (models, optimizers) on the default device.

    Tunix's loader commits the weights to a device, while new adapter values and optimizer
    state are uncommitted; jit compiles a step once for that mix and again when the updated
    state comes back committed. Committing everything first saves the second compilation.
    """
    from flax import nnx

    device = jax.devices()[0]
    for node in nodes:
        for _, variable in nnx.to_flat_state(nnx.state(node)):
            value = variable.get_value()
            if isinstance(value, jax.Array) and not getattr(value, "committed", True):
                variable.set_value(jax.device_put(value, device))
