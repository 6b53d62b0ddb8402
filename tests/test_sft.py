"""jsonl instruction / chat data (`shira_jax.app.sft`), the masked loss, packing, gradient
accumulation and `--eval-generate`, on the tiny Llama of conftest.

Tolerances (fp32, eps = 2**-23 ~ 1.2e-7): a per-example loss is a sum of <= 40 token losses
of ~5 nats, each the end of a chain of ~2 layers x ~10 reductions over <= 64 terms; the
packed and padded rows compute the same products, only the zero-weight (masked) terms and the
row offsets differ, so they agree to a few ulp per reduction: 1e-5 relative to the sum
(~100 eps) bounds it with margin; observed ~1e-7.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_text, make_tiny_model_dir, tiny_jax_llama
from flax import nnx

import shira_jax as sj
from shira_jax.app import data as data_lib
from shira_jax.app import finetune, sft, source, steps

SEQ_LEN = 63  # rows of 64 tokens

# The model runs compiled, as in training: run eagerly, every op of the forward is compiled
# again for each new input shape (seconds per example length on CPU). One program per shape.
forward = nnx.jit(lambda model, ids: model(ids))
masked_loss = nnx.jit(steps.masked_loss)
token_losses = nnx.jit(steps.token_losses)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    model_dir = make_tiny_model_dir(root / "model", text=make_text(300, seed=2))
    rng = np.random.default_rng(0)
    names = ["ROMEO", "JULIET", "HAMLET", "OPHELIA"]
    lines = []
    for i in range(160):
        name = names[rng.integers(len(names))]
        if i % 2:
            lines.append({"prompt": f"{name}: the gentle night. Who speaks?", "completion": name})
        else:
            question = f"{name}: the sweet lord. Who speaks?"
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": name},
                    ]
                }
            )
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"model": model_dir, "data": train, "root": root}


def random_examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, trained flags) with lengths 5..40 and a prompt of 2..4 untrained tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, prompt = int(rng.integers(5, 41)), int(rng.integers(2, 5))
        ids = rng.integers(1, 128, length).tolist()
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return out


# ----------------------------------------------------------------------------- the loss


def test_masked_loss_equals_hand_computed_reference():
    model = tiny_jax_llama(0)
    examples = random_examples(4, seed=1)
    rows = sft.pad_rows(examples, SEQ_LEN + 1, pad_id=0)
    got = float(masked_loss(model, rows))
    total = count = 0.0
    for ids, flags in examples:  # each example alone, no padding: log-softmax by hand
        logits = np.asarray(forward(model, jnp.asarray([ids[:-1]]))[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(1, len(ids)):
            if flags[t]:
                total -= logp[t - 1, ids[t]]
                count += 1
    assert count == sum(sum(f[1:]) for _, f in examples)
    assert got == pytest.approx(total / count, rel=1e-5)


def per_example_sums(model, rows) -> list[tuple[int, float]]:
    """(trained tokens, summed loss) of each example (segment) of every row, sorted."""
    losses, weights = (np.asarray(x) for x in token_losses(model, rows))
    out = []
    for r, seg in enumerate(rows["segment_ids"]):
        for s in set(seg.tolist()) - {0}:
            where = seg == s
            out.append((int(weights[r][where].sum()), float(losses[r][where].sum())))
    return sorted(out)


def test_packing_gives_the_per_example_losses_of_padding():
    model = tiny_jax_llama(0)
    examples = random_examples(12, seed=2)
    packed = sft.pack_rows(examples, SEQ_LEN + 1, pad_id=0)
    padded = sft.pad_rows(examples, SEQ_LEN + 1, pad_id=0)
    assert len(packed["tokens"]) < len(padded["tokens"]) == 12
    a, b = per_example_sums(model, packed), per_example_sums(model, padded)
    assert [n for n, _ in a] == [n for n, _ in b]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5)
    # without the segment ids, packed examples would see each other: the losses change
    leaky = dict(packed, segment_ids=np.ones_like(packed["segment_ids"]))
    assert not np.allclose([x for _, x in per_example_sums(model, leaky)][:3], 0)
    assert (
        np.abs(
            np.asarray(token_losses(model, leaky)[0])
            - np.asarray(token_losses(model, packed)[0])
        ).max()
        > 1e-3
    )


def test_grad_accumulation_equals_the_large_batch():
    examples = random_examples(16, seed=3)
    rows = sft.pad_rows(examples, SEQ_LEN + 1, pad_id=0)  # micro-batches differ in counts
    deltas, losses = [], []
    for accum in (1, 4):
        model = tiny_jax_llama(0)
        sj.apply_shira(model, sj.ShiraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        before = nnx.state(model, sj.ShiraParam)
        before = [np.asarray(x).copy() for x in jax.tree.leaves(before)]
        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=sj.ShiraParam)
        losses.append(float(steps.make_accum_step(accum)(model, optimizer, rows)))
        after = jax.tree.leaves(nnx.state(model, sj.ShiraParam))
        deltas.append(np.concatenate([np.ravel(np.asarray(x) - b) for x, b in zip(after, before)]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    # the update is the gradient (SGD, lr 1): summed in 4 parts instead of one, fp32
    scale = np.abs(deltas[0]).max()
    assert scale > 0 and np.abs(deltas[0] - deltas[1]).max() <= 1e-5 * scale


# ----------------------------------------------------------------------------- templates


def test_chat_template_masks_only_assistant_turns(tmp_path):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)
    render = sft.load_chat_template(tmp_path)
    ex = sft.parse_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "x.jsonl:1",
    )
    assert sft.render_segments(ex, render) == [
        ("<|im_start|>user\nhi<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("yo<|im_end|>\n", True),
    ]
    assert sft.prompt_and_answer(ex, render) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "yo",
    )
    assert sft.load_chat_template(tmp_path / "nowhere") is None


# ----------------------------------------------------------------------------- bad data


BAD = [
    ({"prompt": "a"}, "missing key 'completion'"),
    ({"prompt": "a", "completion": 3}, "field 'completion' must be a string"),
    ({"prompt": "a", "completion": "  "}, "field 'completion' is empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages[0].role'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "field 'messages' has no assistant"),
    ({"text": "x"}, "missing key 'messages' or 'prompt'/'completion'"),
    ("not json", "not valid JSON"),
    ({"prompt": "ROMEO " * 80, "completion": "x"}, "'prompt + completion' is"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(source, "load_model", refuse)


@pytest.mark.parametrize("record,message", BAD, ids=[m.split("'")[0][:20] for _, m in BAD])
def test_bad_data_is_one_line_naming_file_line_and_field(
    tiny, tmp_path, no_model_load, record, message
):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    bad = record if isinstance(record, str) else json.dumps(record)
    path.write_text(f"{good}\n\n{good}\n{bad}\n")
    cfg = finetune.FinetuneConfig(
        model=str(tiny["model"]),
        data=str(path),
        r=8,
        seq_len=SEQ_LEN,
        out=str(tmp_path / "out"),
        dtype="float32",
    )
    with pytest.raises(finetune.FinetuneError) as err:
        finetune.run(cfg, log=lambda _: None, progress=False)
    text = str(err.value)
    assert "\n" not in text and f"{path}:4: " in text and message in text, text


@pytest.mark.parametrize(
    "policy,count", [("skip", "1 train skipped"), ("truncate", "1 train truncated")]
)
def test_too_long_skip_or_truncate_says_how_many(tiny, tmp_path, monkeypatch, policy, count):
    path = tmp_path / "long.jsonl"
    long = {"prompt": "x", "completion": "ROMEO " * 80}
    records = [{"prompt": "a", "completion": "b"}] * 3 + [long]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    class Loaded(Exception):
        pass

    def stop(*_a, **_k):
        raise Loaded

    monkeypatch.setattr(source, "load_model", stop)
    cfg = finetune.FinetuneConfig(
        model=str(tiny["model"]),
        data=str(path),
        r=8,
        seq_len=SEQ_LEN,
        out=str(tmp_path / "out"),
        too_long=policy,
    )
    logs: list[str] = []
    with pytest.raises(Loaded):  # the data was read and checked first
        finetune.run(cfg, log=logs.append, progress=False)
    assert any(count in line for line in logs), logs


def test_jsonl_only_flags_need_jsonl_data(tiny, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("hello\n")
    cfg = finetune.FinetuneConfig(data=str(text), eval_generate=True)
    with pytest.raises(finetune.FinetuneError, match="--eval-generate needs .jsonl"):
        finetune.run(cfg, log=lambda _: None, progress=False)


# ----------------------------------------------------------------------------- end to end


def test_finetune_on_jsonl_end_to_end(tiny, tmp_path):
    cfg = finetune.FinetuneConfig(
        model=str(tiny["model"]),
        data=str(tiny["data"]),
        r=8,
        steps=10,
        batch_size=2,
        grad_accum=2,
        seq_len=SEQ_LEN,
        lr=2e-2,
        warmup=2,
        dtype="float32",
        out=str(tmp_path / "out"),
        eval_batches=2,
        eval_generate=True,
        export_peft=False,
    )
    result = finetune.run(cfg, log=lambda _: None, progress=False)
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["data"]["rows"] == "packed" and m["data"]["template"] == "plain"
    assert m["data"]["train_rows"] < m["data"]["examples"]  # several examples per row
    assert m["tokens_per_step"] == 2 * 2 * SEQ_LEN
    assert [e[0] for e in m["eval_accuracy"]] == [0, 10]
    assert 0.0 <= m["eval_accuracy_after"] <= 1.0
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["eval_accuracy_before"] == m["eval_accuracy_before"]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the eval examples held out of training are the ones answered
    tok = data_lib.load_tokenizer(tiny["model"])
    held = sft.prepare(tiny["data"], tok, None, seq_len=SEQ_LEN, max_eval=4)
    assert len(held.eval_pairs) == held.n_eval_examples == 4
