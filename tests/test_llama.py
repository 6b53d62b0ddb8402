"""The Flax NNX Llama against transformers' torch LlamaForCausalLM (real transformers, fp32).

Tolerance: logits must agree to 1e-5 of the largest |logit| (fp32 has a 1.2e-7 epsilon; the two
frameworks sum matmuls and softmaxes in different orders, which over a 2-layer model gives
~5e-7 relative here, so 1e-5 leaves a 20x margin while still catching any real layout bug,
which shows up at 1e-2 or worse).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, rel_err, tiny_hf_llama, torch_logits
from flax import nnx

import bridge
import shira_jax as sj
from shira_jax.models import KVCache, LlamaConfig, RopeScaling, generate
from shira_jax.models.llama import rope_cos_sin

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5  # relative to max |logit|, see the module docstring
VOCAB = TINY_LLAMA["vocab_size"]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "gqa_untied": {},
    "gqa_tied": {"tie_word_embeddings": True},
    "bias": {"attention_bias": True, "mlp_bias": True},
    "llama3_rope": {"rope_scaling": LLAMA3},
    "mha_linear_rope": {
        "num_key_value_heads": 4,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """case name -> (torch model, JAX model loaded through bridge.from_pretrained, its dir)."""
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        hf = tiny_hf_llama(seed=i, **kw)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = (hf, bridge.from_pretrained(path), path)
    return out


@nnx.jit
def fwd(model, ids, mask, positions):
    return model(ids, attention_mask=mask, positions=positions)


@nnx.jit
def fwd_cached(model, ids, mask, positions, cache):
    return model(ids, attention_mask=mask, positions=positions, cache=cache)


LENGTH = 24  # one sequence length for most tests, so compiled programs are shared


def left_pad_batch(seed: int = 0, length: int = LENGTH):
    """ids, mask (rows 0 and 2 left-padded), mask-derived positions; all int64 [3, length]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(3, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions


def unpadded(ids):
    return np.ones_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()


# --------------------------------------------------------------------------- structure


def test_module_paths_and_linear_layers_mirror_hf(pairs, tmp_path):
    from safetensors import safe_open

    hf, model, _ = pairs["bias"]
    out = bridge.save_pretrained(model, tmp_path)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    assert keys == set(hf.state_dict())
    layer = model.model.layers[1]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(layer.self_attn, proj)) is nnx.Linear
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(layer.mlp, proj)) is nnx.Linear
    assert isinstance(model.model.layers, nnx.List)
    paths = {".".join(map(str, p)) for p, _ in nnx.iter_modules(model)}
    assert "model.layers.0.self_attn.q_proj" in paths
    assert model.model.layers[0].self_attn.q_proj.kernel.shape == (64, 64)  # [in, out]
    assert model.model.layers[0].self_attn.k_proj.kernel.shape == (64, 32)  # GQA: 2 kv heads


def test_tied_model_has_no_lm_head(pairs):
    assert pairs["gqa_tied"][1].lm_head is None
    assert isinstance(pairs["gqa_untied"][1].lm_head, nnx.Linear)


# --------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pairs, case):
    hf, model, _ = pairs[case]
    ids, mask, positions = left_pad_batch(seed=1)
    valid = mask.astype(bool)
    # no padding
    ref = torch_logits(hf, ids)
    got = fwd(model, ids, *unpadded(ids))
    assert got.shape == ref.shape and got.dtype == jnp.float32
    assert rel_err(got, ref) < RTOL
    # left padding, positions from the mask (what generation uses)
    ref = torch_logits(hf, ids, mask, positions)
    got = fwd(model, ids, mask, positions)
    assert rel_err(got, ref, valid) < RTOL
    # left padding, transformers' default positions (arange(T), padding ignored)
    ref = torch_logits(hf, ids, mask)
    assert rel_err(fwd(model, ids, mask, unpadded(ids)[1]), ref, valid) < RTOL


def test_default_positions_and_left_padding(pairs):
    hf, model, _ = pairs["gqa_untied"]
    ids, mask, positions = left_pad_batch(seed=1)
    # positions=None means arange(T) plus cached tokens, as in transformers' forward
    default = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert rel_err(default, torch_logits(hf, ids, mask), mask.astype(bool)) < RTOL
    # with mask-derived positions, left padding changes nothing for a row's real tokens
    alone = model(jnp.asarray(ids[:1, 7:]))
    assert rel_err(fwd(model, ids, mask, positions)[0, 7:], alone[0]) < RTOL


def test_rope_tables_match_transformers(pairs):
    """cos / sin tables equal transformers' rotary embedding; at position 1 they are cos / sin of
    the inverse frequencies themselves, so those agree to the same rtol."""
    positions = np.arange(1, 33)[None]
    tables = {}
    for case in ("gqa_untied", "llama3_rope", "mha_linear_rope"):
        hf, model, _ = pairs[case]
        ours = rope_cos_sin(jnp.asarray(positions), model.config, jnp.float32)
        probe = torch.zeros(1, positions.shape[1], model.config.head_dim)
        with torch.no_grad():
            theirs = hf.model.rotary_emb(probe, torch.as_tensor(positions))
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-6, atol=1e-7)
        tables[case] = np.asarray(ours[1])
    assert not np.allclose(tables["llama3_rope"], tables["gqa_untied"])


def test_bf16_compute_and_params(pairs):
    _, model, path = pairs["gqa_untied"]
    ids = left_pad_batch(seed=1)[0]
    ref = fwd(model, ids, *unpadded(ids))
    bf16 = bridge.from_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    out = fwd(bf16, ids, *unpadded(ids))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 5e-2  # bf16 keeps 8 mantissa bits
    mixed = bridge.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.model.norm.weight.dtype == jnp.float32
    assert fwd(mixed, ids, *unpadded(ids)).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- config


def test_config_round_trip_through_transformers(tmp_path):
    cfg = LlamaConfig(**{**TINY_LLAMA, "rope_theta": 5e5, "rope_scaling": LLAMA3,
                         "eos_token_id": [2, 3]})
    assert isinstance(cfg.rope_scaling, RopeScaling) and cfg.eos_token_id == (2, 3)
    assert hash(cfg) == hash(LlamaConfig.from_dict(cfg.to_dict()))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.rope_parameters["rope_type"] == "llama3"
    assert hf_cfg.rope_parameters["rope_theta"] == 5e5
    assert hf_cfg.num_key_value_heads == 2 and hf_cfg.head_dim == 16
    assert LlamaConfig.from_dict(hf_cfg.to_dict()) == cfg
    # transformers 4 style keys
    old = {
        "model_type": "llama",
        "rope_theta": 7.0,
        "rope_scaling": {"type": "linear", "factor": 3},
    }
    parsed = LlamaConfig.from_dict(old)
    assert parsed.rope_theta == 7.0 and parsed.rope_scaling.factor == 3.0


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unknown_rope_scaling_refused(rope_type):
    with pytest.raises(ValueError, match="llama3"):
        LlamaConfig.from_dict({"rope_scaling": {"rope_type": rope_type, "factor": 2.0}})


def test_bad_configs_refused():
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LlamaConfig.from_dict({"model_type": "llama", "architectures": ["LlamaForTokenClass"]})
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig(hidden_act="swiglu_magic")


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_chunks_equal_full_forward(pairs, padded):
    _, model, _ = pairs["gqa_untied"]
    ids, mask, positions = left_pad_batch(seed=3)
    if not padded:
        mask, positions = unpadded(ids)
    full = fwd(model, ids, mask, positions)
    cache = model.init_cache(batch_size=3, max_len=LENGTH)
    assert isinstance(cache, KVCache) and cache.max_len == LENGTH
    outs = []
    for lo, hi in [(0, 11), (11, 12), (12, 13), (13, LENGTH)]:
        sl = slice(lo, hi)
        logits, cache = fwd_cached(model, ids[:, sl], mask[:, sl], positions[:, sl], cache)
        outs.append(logits)
    assert int(cache.index) == LENGTH
    assert rel_err(jnp.concatenate(outs, axis=1), full, mask.astype(bool)) < RTOL


def test_generate_equals_no_cache_recomputation(pairs):
    _, model, _ = pairs["gqa_untied"]
    t = 11
    n = LENGTH - t
    ids, mask, positions = (a[:, :t] for a in left_pad_batch(seed=4))
    out = np.asarray(generate(model, ids, n, attention_mask=mask))
    assert out.shape == (3, LENGTH) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :t], ids)
    # Teacher-forced forward on the generated text without a cache: each greedy token is the
    # argmax at the position before it.
    full_mask = np.concatenate([mask, np.ones((3, n), mask.dtype)], axis=1)
    full_pos = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
    logits = np.asarray(fwd(model, out, full_mask, full_pos))
    np.testing.assert_array_equal(logits[:, t - 1 : -1].argmax(-1), out[:, t:])
    # Step-by-step cached logits equal the recomputed ones.
    cache = model.init_cache(3, LENGTH)
    step, cache = fwd_cached(model, ids, mask, positions, cache)
    got = [step[:, -1]]
    for i in range(t, LENGTH - 1):
        sl = slice(i, i + 1)
        step, cache = fwd_cached(model, out[:, sl], full_mask[:, sl], full_pos[:, sl], cache)
        got.append(step[:, -1])
    assert rel_err(jnp.stack(got, 1), logits[:, t - 1 : -1]) < RTOL


def test_generate_matches_transformers_greedy(pairs):
    hf, model, _ = pairs["llama3_rope"]
    ids, mask, _ = (a[:, :9] for a in left_pad_batch(seed=5))
    n = 10
    with torch.no_grad():
        ref = hf.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = np.asarray(generate(model, ids, n, attention_mask=mask))
    np.testing.assert_array_equal(got, ref)


def test_generate_eos_and_sampling(pairs):
    _, model, _ = pairs["gqa_untied"]
    prompt = np.array([[5, 6, 7, 8]])
    greedy = np.asarray(generate(model, prompt, 6))
    assert generate(model, prompt[0], 3).shape == (7,)  # 1-D prompt, shorter run
    # top_k=1 sampling is greedy; eos stops the row and pads the rest
    eos = int(greedy[0, 6])  # the third new token
    stopped = generate(
        model,
        prompt,
        6,
        temperature=0.7,
        top_k=1,
        rng=jax.random.key(3),
        eos_token_id=eos,
        pad_token_id=0,
    )
    stopped = np.asarray(stopped)
    np.testing.assert_array_equal(stopped[0, :7], greedy[0, :7])
    assert (stopped[0, 7:] == 0).all()
    # sampling is reproducible for a key and varies across keys
    draws = [
        np.asarray(generate(model, prompt, 6, 1.5, rng=jax.random.key(k))) for k in (1, 1, 2, 3)
    ]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert len({tuple(d[0]) for d in draws}) > 1
    with pytest.raises(ValueError, match="LEFT"):
        generate(model, prompt, 2, attention_mask=np.array([[1, 1, 1, 0]]))


def test_generate_with_shira_wrapped_model(pairs):
    """SHiRA layers swap their kernel during the forward pass; that must work in the loop."""
    _, model, path = pairs["gqa_tied"]
    model = bridge.from_pretrained(path)  # a private copy to wrap
    cfg = sj.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    sj.apply_shira(model, cfg, key=jax.random.key(0))
    ids, mask, positions = (a[:, :11] for a in left_pad_batch(seed=6))
    out = np.asarray(generate(model, ids, 5, attention_mask=mask))
    full_mask = np.concatenate([mask, np.ones((3, 5), mask.dtype)], axis=1)
    full_pos = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
    logits = np.asarray(fwd(model, out, full_mask, full_pos))
    np.testing.assert_array_equal(logits[:, 10:-1].argmax(-1), out[:, 11:])

