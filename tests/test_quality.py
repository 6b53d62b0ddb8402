"""`make quality`'s study script runs end to end (tiny model, few steps) and its report says
what its results say: every table number comes from `results.json`, every plot exists."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import quality


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [quality.schedule(i, 100, 1e-2) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-3)  # 10 warmup steps: 1/10 of the peak first
    assert max(lrs) == pytest.approx(1e-2)
    assert lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.slow
def test_quick_study_writes_a_report_that_matches_its_results(tmp_path):
    payload = quality.main(["--quick", "--size", "tiny", "--out", str(tmp_path)])
    text = (tmp_path / "QUALITY.md").read_text()
    saved = json.loads((tmp_path / "figures" / "results.json").read_text())
    runs = saved["runs"]
    assert saved["best_lr"] == payload["best_lr"]

    # every plot the report shows exists and is a real PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 4
    for rel in images:
        data = (tmp_path / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # each method got its own sweep of >= 3 rates, and its best rate is the sweep's argmin
    for method in quality.METHODS:
        sweep = {
            r["lr"]: r["eval_a"] for r in runs if r["stage"] == "sweep" and r["method"] == method
        }
        assert len(sweep) >= 3
        assert saved["best_lr"][method] == min(sweep, key=sweep.get)
        main = [r for r in runs if r["stage"] == "main" and r["method"] == method]
        assert len(main) == 1 and main[0]["lr"] == saved["best_lr"][method]
        assert f"{main[0]['eval_a']:.4f}" in text

    # equal size: every method trains the same number of values, per target set
    for stage in ("main", "all"):
        sizes = {r["params"] for r in runs if r["stage"] == stage}
        assert len(sizes) == 1, (stage, sizes)
    # training helped: every main run ends below the base model's held-out loss
    assert all(r["eval_a"] < saved["base"]["a"] for r in runs if r["stage"] == "main")

    # LoRA and the best SHiRA mask have several seeds, and the report gives their spread
    best_shira = next(m for m in saved["ranked"] if m != "LoRA")
    for method in ("LoRA", best_shira):
        stats = quality.seed_stats(runs, method)
        assert stats["n"] == saved["protocol"]["seeds"]
        assert f"{stats['mean']:.4f} ± {stats['std']:.4f}" in text

    # fusion: the SHiRA pair, a non-overlapping pair (no shared entry), the LoRA pair
    fusion = {f["label"]: f for f in saved["fusion"]}
    assert len(fusion) == 3 and "LoRA pair" in fusion
    disjoint = next(f for k, f in fusion.items() if k.endswith("non-overlapping"))
    assert disjoint["overlap"] == 0.0
    for f in fusion.values():
        assert f"{f['fused'][0]:.4f}" in text and f"{f['awor']:.3f}" in text
        assert f["drop_a"] == pytest.approx(f["fused"][0] - f["a_alone"][0])
    assert "## Verdict" in text and saved["command"] in text

    # the page is rendered from results.json alone: rendering it again gives the same text
    (tmp_path / "QUALITY.md").unlink()
    quality.main(["--report", str(tmp_path / "figures" / "results.json"), "--out", str(tmp_path)])
    assert (tmp_path / "QUALITY.md").read_text() == text


def _payload(lora: list[float], shira: list[float]) -> dict:
    """A synthetic results payload: LoRA and SHiRA-random on seeds 0.., one fusion pair each."""
    runs = [dict(stage="main" if seed == 0 else "seeds", method=m, targets="q+v", seed=seed,
                 eval_a=loss) for m, losses in (("LoRA", lora), ("random", shira))
            for seed, loss in enumerate(losses)]
    pair = dict(drop_a=0.01, drop_b=0.03, kept_a=0.9, kept_b=0.5)
    return dict(runs=runs, protocol=dict(steps=300, seeds=len(lora)), ranked=["random", "LoRA"],
                fusion=[dict(label="SHiRA-random pair", **pair), dict(label="LoRA pair", **pair)])


def test_verdict_names_a_winner_only_when_every_seed_agrees_beyond_the_spread():
    clear = quality.verdict(_payload([4.10, 4.12, 4.11], [4.00, 4.03, 4.01]))
    assert "SHiRA is ahead on every seed, by 0.0967 nats" in clear
    mixed = quality.verdict(_payload([4.10, 4.00, 4.11], [4.00, 4.03, 4.05]))
    assert "within its seed-to-seed spread: no winner" in mixed
    few = quality.verdict(_payload([4.10, 4.12], [4.00, 4.03]))
    assert "with 2 paired seed(s) the gap's spread is not known well enough" in few
    gap = quality.paired_gap(_payload([4.1, 4.2, 4.3], [4.0, 4.0, 4.4])["runs"], "random", "LoRA")
    assert gap["n"] == 3 and gap["mean"] == pytest.approx(-0.0667, abs=1e-4)
    assert not gap["all_same_sign"]


def test_truncated_keeps_the_first_layers_and_still_runs():
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from shira_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=2)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    first = np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...])
    assert quality.truncated(model, 0) is model and len(model.model.layers) == 3
    quality.truncated(model, 5)  # more than it has: unchanged
    assert len(model.model.layers) == 3
    quality.truncated(model, 2)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    np.testing.assert_array_equal(model.model.layers[0].self_attn.q_proj.kernel[...], first)
    assert model(jnp.array([[1, 2, 3]])).shape == (1, 3, 32)


def test_quick_studies_four_layers_at_full_size_and_every_layer_at_tiny_size():
    assert quality.parse(["--quick"])[0].layers == 4
    assert quality.parse(["--quick", "--size", "tiny"])[0].layers == 0
    assert quality.parse([])[0].layers == 0
