"""Quantized bases (QSHiRA): SHiRA on qwix-quantized kernels next to qwix QLoRA.

- Bytes: the targeted weights (int8 / nf4) + the adapter, against the same weights in bf16.
- Train step of a 4-layer SmolLM2 slice with every linear layer quantized and adapted, against
  SHiRA on the float base: QSHiRA's default route (the quantized matmul plus one matmul with the
  dense delta, rebuilt in the backward pass), QSHiRA forced onto the sparse product
  (`delta_mode="sparse"`), and qwix QLoRA at the same rank. Contenders run interleaved in one
  process (`common.paired`); every figure is a ratio of medians from the same run.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shira_jax as sj
from benchmarks.common import (
    ALL_LINEAR,
    SMOLLM2,
    TINY_LLAMA,
    Figure,
    Section,
    jax_llama,
    paired,
    ratio_figure,
)
from benchmarks.sparse_modes import R, targets_tag, with_mode
from benchmarks.train_step import JaxStep, own_copy


def _bytes(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = jnp.dtype(leaf.dtype)
        bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
        total += int(np.prod(leaf.shape)) * bits // 8
    return total


def quantized(
    config, layers, targets, batch, reps, r=R, qtypes=("int8", "nf4")
) -> tuple[list[Figure], list[str]]:
    import qwix

    ids = jax.random.randint(jax.random.key(3), batch, 0, config["vocab_size"], dtype=jnp.int32)
    base = jax_llama(config, layers)
    pattern = ".*(" + "|".join(targets) + ")"
    n_weights = sum(
        int(np.prod(m.kernel.shape)) for p, m in sj.model.named_modules(base)
        if isinstance(m, nnx.Linear) and p.rsplit(".", 1)[-1] in targets
    )
    steps = {"float SHiRA": JaxStep(with_mode(own_copy(base), targets, r, "patched"), ids,
                                    sj.ShiraParam)}
    figs, notes = [], []
    for qtype in qtypes:
        extra = {"tile_size": 64} if qtype == "nf4" else {}
        rule = qwix.QuantizationRule(module_path=pattern, weight_qtype=qtype, **extra)

        def quantize(rule=rule):
            return qwix.quantize_model(own_copy(base), qwix.PtqProvider([rule]), ids)

        qmodel = with_mode(quantize(), targets, r, "patched")  # the default route
        steps[f"{qtype} QSHiRA"] = JaxStep(qmodel, ids, sj.ShiraParam)
        if qtype == qtypes[0]:
            forced = with_mode(quantize(), targets, r, "sparse")
            steps[f"{qtype} QSHiRA sparse"] = JaxStep(forced, ids, sj.ShiraParam)
        lora_rule = qwix.LoraRule(module_path=pattern, rank=r, alpha=float(r),
                                  weight_qtype=qtype, **extra)
        qlora = qwix.apply_lora_to_model(own_copy(base), qwix.LoraProvider([lora_rule]), ids)
        steps[f"{qtype} qwix QLoRA"] = JaxStep(qlora, ids, nnx.LoRAParam)
        quant_state = [m.base_layer.kernel.array for _, m in sj.shira_layers(qmodel)]
        adapter = nnx.state(qmodel, nnx.Any(sj.ShiraParam, sj.ShiraIndices))
        lora = nnx.state(qlora, nnx.LoRAParam)
        w, a, lo = _bytes(quant_state), _bytes(adapter), _bytes(lora)
        bf16 = 2 * n_weights
        tag = targets_tag(targets)
        figs.append(Figure(f"{qtype} base + SHiRA adapter bytes / bf16 base ({tag})",
                           (w + a) / bf16, (w + a) / 2**20, bf16 / 2**20, "MiB",
                           note=f"adapter {a / 2**20:.2f} MiB (fp32 values + int32 indices)"))
        figs.append(Figure(f"{qtype} base + qwix QLoRA bytes / bf16 base ({tag})",
                           (w + lo) / bf16, (w + lo) / 2**20, bf16 / 2**20, "MiB",
                           note=f"adapter {lo / 2**20:.2f} MiB (fp32 A, B)"))
    times = paired(steps, reps=reps, warmup=1)
    for qtype in qtypes:
        figs.append(ratio_figure(f"train step {qtype} QSHiRA / float-base SHiRA", times,
                                 f"{qtype} QSHiRA", "float SHiRA",
                                 note="quantized matmul + dense-delta matmul"))
        if qtype == qtypes[0]:
            figs.append(ratio_figure(f"train step {qtype} QSHiRA sparse product / float-base "
                                     "SHiRA", times, f"{qtype} QSHiRA sparse", "float SHiRA",
                                     note='delta_mode="sparse"'))
        figs.append(ratio_figure(f"train step {qtype} qwix QLoRA / float-base SHiRA", times,
                                 f"{qtype} qwix QLoRA", "float SHiRA"))
        figs.append(ratio_figure(f"train step {qtype} QSHiRA / qwix QLoRA", times,
                                 f"{qtype} QSHiRA", f"{qtype} qwix QLoRA"))
    notes.append(f"{layers} layers, {targets_tag(targets)}, batch {batch[0]} x {batch[1]}; "
                 "the float "
                 "base is fp32 (XLA CPU emulates bf16 matmuls, so a bf16 base would not be a "
                 "fair time baseline here); bytes count the targeted weights only.")
    return figs, notes


def run(quick: bool = False) -> Section:
    section = Section(
        "7. Quantized bases: QSHiRA vs qwix QLoRA (r=32)",
        "python -m benchmarks.run --only quantized" + (" --quick" if quick else ""),
    )
    t0 = time.perf_counter()
    if quick:
        cfg, layers, batch, reps, r, qtypes = TINY_LLAMA, 1, (2, 16), 1, 4, ("int8",)
    else:
        cfg, layers, batch, reps, r, qtypes = SMOLLM2, 4, (2, 256), 5, R, ("int8", "nf4")
    figs, notes = quantized(cfg, layers, ALL_LINEAR, batch, reps, r, qtypes)
    section.figures = figs
    section.text = "\n".join(f"- {n}" for n in notes)
    section.seconds = time.perf_counter() - t0
    return section
