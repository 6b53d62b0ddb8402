"""`shira-jax finetune --model DIR` on a Tunix model family (tiny random Qwen3 + BPE tokenizer).

The job loads Tunix's Qwen3 through `bridge.from_pretrained`, wraps its Einsum attention and
MLP projections, trains, and exports a PEFT folder that real PEFT loads on the same HF model
with Tunix's logits (float32 on both sides: `LOGIT_TOL` as in tests/test_tunix.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import (
    TOKENIZER_VOCAB,
    make_text,
    make_tiny_model_dir,
    rel_err,
    strict_from_pretrained,
    torch_logits,
)
from test_tunix import LOGIT_TOL, SHAPE, load_hf, tunix_logits

import shira_jax as sj
from bridge import tunix


@pytest.fixture(scope="module", autouse=True)
def _restore_flax_flag():
    """Importing Tunix's models sets flax's `flax_always_shard_variable` to False for the
    whole process; put it back for the test files that share this worker."""
    import flax

    before = flax.config.flax_always_shard_variable
    yield
    flax.config.update("flax_always_shard_variable", before)


@pytest.mark.slow
def test_finetune_cli_job_on_a_tunix_qwen3(tmp_path):
    """`shira-jax finetune --model DIR` on a Tunix family: trains, and its PEFT export loads in
    real PEFT with Tunix's logits."""
    from shira_jax.app import finetune

    text = make_text(200, seed=1)
    (tmp_path / "corpus.txt").write_text(text)
    tok_dir = make_tiny_model_dir(tmp_path / "tok", text=text)
    model_dir = tmp_path / "qwen3"
    import transformers

    config = transformers.Qwen3Config(**{**SHAPE, "rope_theta": 1e6, "vocab_size": TOKENIZER_VOCAB})
    transformers.Qwen3ForCausalLM(config).save_pretrained(str(model_dir))
    shutil.copy(tok_dir / "tokenizer.json", model_dir / "tokenizer.json")
    cfg = finetune.FinetuneConfig(
        model=str(model_dir), data=str(tmp_path / "corpus.txt"), r=4, steps=6, batch_size=2,
        seq_len=16, lr=5e-2, warmup=1, dtype="float32", out=str(tmp_path / "out"),
        eval_batches=1, targets=("q_proj", "v_proj", "down_proj"),
    )
    result = finetune.run(cfg, log=lambda _: None, progress=False)
    m = result.metrics
    assert m["steps_done"] == 6 and m["eval_loss_after"] < m["eval_loss_before"]
    model = result.model
    assert tunix.is_tunix_model(model) and len(sj.shira_layers(model)) == 6
    ids = np.array([[5, 9, 17, 33, 65, 129]])
    pm = strict_from_pretrained(load_hf(model_dir), tmp_path / "out" / "peft")
    assert rel_err(tunix_logits(model, ids), torch_logits(pm, ids)) <= LOGIT_TOL
    # `shira-jax generate` decodes a Tunix model without a KV cache: greedy = argmax chain
    from shira_jax.app import generate, lm, source

    tokenizer = source.load_model_tokenizer(model_dir)
    prompt = tokenizer.encode("ROMEO:")
    ids = list(prompt)
    for _ in range(4):
        ids.append(int(np.argmax(tunix_logits(model, np.array([ids]))[0, -1])))
    new = ids[len(prompt):]
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    want = tokenizer.decode(new)
    assert generate.generate_text(model, tokenizer, "ROMEO:", max_new_tokens=4) == want
    assert lm.vocab_size(model) == TOKENIZER_VOCAB
