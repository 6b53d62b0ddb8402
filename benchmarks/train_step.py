"""Benchmarks 1 and 2: a train step on SmolLM2-135M shapes, timed and its compiled memory.

Contenders, all on the same CPU with the same threads, interleaved:

* JAX frozen base: forward + backward to the inputs only (the gradient of the first layer's
  input norm weight, so the backward pass runs through every layer but no weight gradient of
  a projection is formed);
* shira-jax SHiRA (r=32) and the same with `recompute_in_backward=False` (plain autodiff,
  the "naive" step: copy kernel, scatter, one matmul, keep the patched kernel);
* `nnx.LoRA` at the same r and targets (wrapping the same `nnx.Linear` layers);
* PEFT-torch SHiRA and PEFT-torch LoRA on transformers' `LlamaForCausalLM`, and a torch
  frozen step (backward to the input embeddings) for reference.

JAX and torch steps use AdamW on the adapter parameters; JAX steps are `jax.jit`-compiled over
the split NNX state (donated), so Python graph traversal is not timed. Compiled temp memory is
`jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import shira_jax as sj
from benchmarks.common import (
    ALL_LINEAR,
    QV,
    SMOLLM2,
    TINY_LLAMA,
    Figure,
    LinearStack,
    Section,
    jax_llama,
    paired,
    ratio_figure,
    torch_llama,
    torch_threads,
)
from benchmarks.torch_worker import TorchWorker

R = 32


# ----------------------------------------------------------------------------- JAX side


def loss_fn(model: nnx.Module, ids: jax.Array) -> jax.Array:
    """Next-token cross-entropy over a [B, T] batch (T-1 predictions), in float32."""
    logits = model(ids)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _first_norm(path: tuple[Any, ...], _: Any) -> bool:
    return tuple(path[:4]) == ("model", "layers", 0, "input_layernorm")


class JaxStep:
    """A compiled step over the split NNX state; calling it runs one step (state donated)."""

    def __init__(self, model: nnx.Module, ids: jax.Array, wrt: Any | None) -> None:
        self.ids = ids
        if wrt is None:  # frozen: backward to the inputs only, no update
            graphdef, state = nnx.split(model)
            diff = nnx.DiffState(0, nnx.All(nnx.Param, _first_norm))

            def step(state: Any, ids: jax.Array) -> Any:
                model = nnx.merge(graphdef, state)
                loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, ids)
                return loss, grads

        else:
            opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt)
            graphdef, state = nnx.split((model, opt))

            def step(state: Any, ids: jax.Array) -> Any:
                model, opt = nnx.merge(graphdef, state)
                loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(
                    model, ids
                )
                opt.update(model, grads)
                return nnx.state((model, opt)), loss

        self.state = state
        self.frozen = wrt is None
        self._jit = jax.jit(step, donate_argnums=() if self.frozen else 0)
        compiled = self._jit.lower(state, ids).compile()
        self.temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float((cost or {}).get("flops", 0.0))

    def __call__(self) -> Any:
        if self.frozen:
            return self._jit(self.state, self.ids)
        self.state, out = self._jit(self.state, self.ids)
        return out


def own_copy(model: nnx.Module) -> nnx.Module:
    """A clone with its own arrays (steps donate their state, so clones must not share)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def with_lora(model: nnx.Module, targets: Sequence[str], r: int) -> nnx.Module:
    """Wrap every targeted `nnx.Linear` in `nnx.LoRA(base_module=...)` (in place)."""
    from shira_jax.model import named_modules, set_submodule

    for i, (path, module) in enumerate(list(named_modules(model))):
        if isinstance(module, nnx.Linear) and path.rsplit(".", 1)[-1] in targets:
            lora = nnx.LoRA(
                module.in_features, r, module.out_features, base_module=module, rngs=nnx.Rngs(i)
            )
            set_submodule(model, path, lora)
    return model


def with_shira(model: nnx.Module, targets: Sequence[str], r: int, *, naive: bool = False):
    sj.apply_shira(model, sj.ShiraConfig(r=r, target_modules=list(targets), random_seed=0))
    if naive:
        for _, layer in sj.shira_layers(model):
            layer.recompute_in_backward = False
    return model


# ----------------------------------------------------------------------------- torch side


def torch_steps(
    config: dict[str, Any], layers: int, targets: Sequence[str], ids: Any, r: int = R
) -> dict[str, Callable[[], float]]:
    """Frozen, PEFT SHiRA and PEFT LoRA train steps on transformers' Llama (same shapes).

    Runs inside `TorchWorker`'s child process (see `benchmarks.torch_worker`).
    """
    import peft
    import torch

    torch_threads()

    def base() -> Any:
        return torch_llama(config, layers).train()

    tids = torch.as_tensor(np.asarray(ids, np.int64))

    frozen = base()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def frozen_step() -> float:
        emb = frozen.model.embed_tokens(tids).detach().requires_grad_()
        loss = frozen(inputs_embeds=emb, labels=tids).loss
        loss.backward()
        return float(loss.detach())

    def trained(cfg: Any) -> Callable[[], float]:
        model = peft.get_peft_model(base(), cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> float:
            loss = model(input_ids=tids, labels=tids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step

    return {
        "torch frozen": frozen_step,
        "PEFT SHiRA": trained(peft.ShiraConfig(r=r, target_modules=list(targets), random_seed=0)),
        "PEFT LoRA": trained(
            peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(targets))
        ),
    }


# ----------------------------------------------------------------------------- benchmark


def _case(
    label: str,
    config: dict[str, Any],
    layers: int,
    targets: Sequence[str],
    batch: tuple[int, int],
    *,
    reps: int,
    warmup: int,
    naive: bool,
    torch_side: bool,
    r: int = R,
    time_naive: bool = True,
) -> tuple[list[Figure], list[str]]:
    ids = jax.random.randint(jax.random.key(1), batch, 0, config["vocab_size"], dtype=jnp.int32)
    t0 = time.perf_counter()
    base = jax_llama(config, layers)
    steps: dict[str, Any] = {"jax frozen": JaxStep(base, ids, None)}
    steps["jax SHiRA"] = JaxStep(with_shira(own_copy(base), targets, r), ids, sj.ShiraParam)
    steps["jax LoRA"] = JaxStep(with_lora(own_copy(base), targets, r), ids, nnx.LoRAParam)
    if naive:
        steps["jax SHiRA naive"] = JaxStep(
            with_shira(own_copy(base), targets, r, naive=True), ids, sj.ShiraParam
        )
    del base
    timed = {"jax frozen", "jax SHiRA", "jax LoRA"} | ({"jax SHiRA naive"} if time_naive else set())
    fns: dict[str, Callable[[], Any]] = {k: v for k, v in steps.items() if k in timed}
    worker = None
    if torch_side:
        worker = TorchWorker(
            "benchmarks.train_step:torch_steps",
            dict(config=config, layers=layers, targets=tuple(targets),
                 ids=np.asarray(ids).tolist(), r=r),
        )
        fns.update({name: worker.fn(name) for name in worker.names})
    setup_s = time.perf_counter() - t0
    try:
        times = paired(fns, reps=reps, warmup=warmup)
    finally:
        if worker is not None:
            worker.close()

    tag = f"{label}, {'q+v' if tuple(targets) == QV else 'all-linear'}"
    figs = [
        ratio_figure(f"train step {tag}: SHiRA / frozen", times, "jax SHiRA", "jax frozen",
                     goal="<= 1.3"),
        ratio_figure(f"train step {tag}: SHiRA / nnx.LoRA", times, "jax SHiRA", "jax LoRA",
                     goal="<= 1.1"),
    ]
    if torch_side:
        figs += [
            ratio_figure(f"train step {tag}: SHiRA / PEFT-torch SHiRA", times, "jax SHiRA",
                         "PEFT SHiRA", goal="<= 1.0"),
            ratio_figure(f"train step {tag}: SHiRA / PEFT-torch LoRA", times, "jax SHiRA",
                         "PEFT LoRA"),
            ratio_figure(f"train step {tag}: JAX frozen / torch frozen", times, "jax frozen",
                         "torch frozen", note="XLA vs oneDNN on the base model alone"),
            ratio_figure(f"train step {tag}: PEFT SHiRA / torch frozen", times, "PEFT SHiRA",
                         "torch frozen"),
        ]
    figs.append(ratio_figure(f"train step {tag}: nnx.LoRA / frozen", times, "jax LoRA",
                             "jax frozen"))
    if naive and time_naive:
        figs.append(ratio_figure(f"train step {tag}: naive SHiRA / SHiRA", times,
                                 "jax SHiRA naive", "jax SHiRA",
                                 note="plain autodiff, patched kernel kept for backward"))
    mib = 2.0**20
    shira, lora, frozen = steps["jax SHiRA"], steps["jax LoRA"], steps["jax frozen"]
    figs.append(Figure(f"compiled temp memory {tag}: SHiRA / LoRA",
                       shira.temp_bytes / lora.temp_bytes, shira.temp_bytes / mib,
                       lora.temp_bytes / mib, "MiB", "<= 1.0"))
    if naive:
        n = steps["jax SHiRA naive"]
        figs.append(Figure(f"compiled temp memory {tag}: naive SHiRA / LoRA",
                           n.temp_bytes / lora.temp_bytes, n.temp_bytes / mib,
                           lora.temp_bytes / mib, "MiB"))
    figs.append(Figure(f"compiled temp memory {tag}: SHiRA / frozen",
                       shira.temp_bytes / frozen.temp_bytes, shira.temp_bytes / mib,
                       frozen.temp_bytes / mib, "MiB"))
    notes = [
        f"{tag}: batch {batch[0]} x {batch[1]} tokens; XLA FLOPs per step: frozen "
        f"{frozen.flops / 1e9:.1f} G, SHiRA {shira.flops / 1e9:.1f} G "
        f"({shira.flops / max(frozen.flops, 1):.3f}x), LoRA {lora.flops / 1e9:.1f} G "
        f"({lora.flops / max(frozen.flops, 1):.3f}x); medians (ms): "
        + ", ".join(f"{k} {1e3 * float(np.median(v)):.0f}" for k, v in times.items())
        + f"; setup + compile {setup_s:.0f} s."
    ]
    return figs, notes


def mlp_memory() -> Figure:
    """The issue's MLP stack (4 x 1024^2 Linear, 256 tokens): compiled temp memory only."""

    x = jnp.ones((256, 1024))

    def temp(model: nnx.Module, wrt: Any) -> int:
        graphdef, state = nnx.split(model)

        def f(state: Any) -> Any:
            m = nnx.merge(graphdef, state)
            return nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(m)

        return int(jax.jit(f).lower(state).compile().memory_analysis().temp_size_in_bytes)

    targets = [f"layers.{i}" for i in range(4)]
    shira = LinearStack(1024)
    sj.apply_shira(shira, sj.ShiraConfig(r=R, target_modules=targets, random_seed=0))
    lora = LinearStack(1024)
    for i in range(4):
        lin = lora.layers[i]
        lora.layers[i] = nnx.LoRA(1024, R, 1024, base_module=lin, rngs=nnx.Rngs(i))
    s, lo = temp(shira, sj.ShiraParam), temp(lora, nnx.LoRAParam)
    return Figure("compiled temp memory, MLP stack 4 x 1024^2, 256 tokens: SHiRA / LoRA",
                  s / lo, s / 2**20, lo / 2**20, "MiB",
                  note="small activations: SHiRA's per-layer transients (patched copy, dense "
                  "x^T g) are not hidden")


def run(quick: bool = False) -> Section:
    section = Section(
        "1-2. Train step and compiled memory (SmolLM2-135M shapes, r=32)",
        "python -m benchmarks.run --only train_step" + (" --quick" if quick else ""),
    )
    t0 = time.perf_counter()
    notes: list[str] = []
    if quick:
        cases = [("tiny 1-layer", TINY_LLAMA, 1, QV, (1, 16), dict(reps=1, warmup=0, naive=True,
                                                           torch_side=True, r=4))]
    else:
        cases = [
            ("4-layer slice", SMOLLM2, 4, QV, (2, 256), dict(reps=5, warmup=1, naive=True,
                                                            torch_side=True)),
            ("4-layer slice", SMOLLM2, 4, ALL_LINEAR, (2, 256), dict(reps=5, warmup=1,
                                                                    naive=True, torch_side=True)),
            ("full 30 layers", SMOLLM2, 30, QV, (1, 256), dict(reps=3, warmup=1, naive=False,
                                                              torch_side=True)),
            ("full 30 layers", SMOLLM2, 30, ALL_LINEAR, (1, 256), dict(reps=3, warmup=1,
                                                                      naive=False,
                                                                      torch_side=True)),
        ]
    for label, config, layers, targets, batch, kw in cases:
        figs, case_notes = _case(label, config, layers, targets, batch, **kw)
        section.figures += figs
        notes += case_notes
    if not quick:
        section.figures.append(mlp_memory())
    section.text = "\n".join(f"- {n}" for n in notes)
    section.seconds = time.perf_counter() - t0
    return section


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv).markdown())
