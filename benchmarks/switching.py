"""Benchmark 3: switching adapters in merged mode (A merged -> B merged).

Contenders, interleaved, each call one switch (directions alternate A->B, B->A):

* shira-jax `ShiraDense.switch` / `sj.switch_adapter`: restore A's saved entries and merge B in
  one compiled call with the kernels donated (updated in place);
* LoRA switch in JAX at the same r: `W + [A_b, -A_a] @ [B_b; B_a]` (unfuse A and fuse B in one
  r=2*32 matmul, donated) -- LoRA's best case; and LoRA fusion alone, `W + A @ B` (the paper's
  Fig. 7 baseline);
* the raw scatter bound: one donated call that only writes precomputed entries at A's and at
  B's indices (the least any switch must write);
* PEFT-torch merge/unmerge (`unmerge_adapter()` then `merge_adapter([B])`) for SHiRA and LoRA,
  in a child process (`torch_worker`).

Shapes: square d x d kernels for d in 1024..8192 (fp32 and bf16), one Llama-7B-shaped decoder
layer (q/k/v/o 4096^2, gate/up 4096x11008, down 11008x4096) in bf16 and fp32, and a whole
SmolLM2-135M-shaped model (210 linear layers).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
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
    torch_llama,
    torch_threads,
)
from benchmarks.torch_worker import TorchWorker
from shira_jax import ops

R = 32
LLAMA7B_LAYER = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}


class Layers(nnx.Module):
    """A bag of named `nnx.Linear` layers (kernel [in, out], no bias)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: Any, seed: int = 0) -> None:
        for i, (name, (n_in, n_out)) in enumerate(shapes.items()):
            linear = nnx.Linear(n_in, n_out, use_bias=False, param_dtype=dtype,
                                kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
            kernel = jax.random.normal(jax.random.key(seed + i), (n_in, n_out), jnp.float32)
            linear.kernel.set_value((0.02 * kernel).astype(dtype))
            setattr(self, name, linear)


# ----------------------------------------------------------------------------- JAX contenders


def _lora_factors(shapes: Sequence[tuple[int, int]], seed: int, dtype: Any) -> list[Any]:
    out = []
    for i, (n_in, n_out) in enumerate(shapes):
        ka, kb = jax.random.split(jax.random.key(1000 * seed + i))
        a = (0.01 * jax.random.normal(ka, (n_in, R))).astype(dtype)
        b = (0.01 * jax.random.normal(kb, (R, n_out))).astype(dtype)
        out.append((a, b))
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _lora_switch(kernels: list[jax.Array], old: list[Any], new: list[Any]) -> list[jax.Array]:
    """Unfuse `old` and fuse `new` in one pass: W + [A_new, -A_old] @ [B_new; B_old]."""
    out = []
    for w, (a0, b0), (a1, b1) in zip(kernels, old, new):
        a = jnp.concatenate([a1, -a0], axis=1)
        b = jnp.concatenate([b1, b0], axis=0)
        delta = jnp.dot(a, b, preferred_element_type=jnp.float32)
        out.append((w.astype(jnp.float32) + delta).astype(w.dtype))
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _lora_fuse(kernels: list[jax.Array], factors: list[Any]) -> list[jax.Array]:
    """The paper's LoRA fusion: W + A @ B."""
    return [
        (w.astype(jnp.float32) + jnp.dot(a, b, preferred_element_type=jnp.float32)).astype(w.dtype)
        for w, (a, b) in zip(kernels, factors)
    ]


@functools.partial(jax.jit, donate_argnums=0)
def _raw_writes(kernels: list[jax.Array], writes: list[Any]) -> list[jax.Array]:
    """Only write precomputed entries (A's originals, B's merged values): the bound."""
    out = []
    for w, (ia, sa, ib, nb) in zip(kernels, writes):
        out.append(ops.write_entries(ops.write_entries(w, ia, sa, flat=True), ib, nb, flat=True))
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _native_writes(kernels: list[jax.Array], writes: list[Any]) -> list[jax.Array]:
    """The same writes with XLA's own scatter (no uint16 view)."""
    out = []
    for w, (ia, sa, ib, nb) in zip(kernels, writes):
        w = w.at[ia[0], ia[1]].set(sa, unique_indices=True)
        out.append(w.at[ib[0], ib[1]].set(nb, unique_indices=True))
    return out


@functools.partial(jax.jit, donate_argnums=0)
def _full_pass(kernels: list[jax.Array], zero: jax.Array) -> list[jax.Array]:
    """One read + write of every kernel element (adds a traced -0.0: values unchanged)."""
    return [w + zero.astype(w.dtype) for w in kernels]


class Holder:
    """Kernels held only here, replaced by each donated call's output."""

    def __init__(self, kernels: list[jax.Array]) -> None:
        self.kernels = kernels

    def run(self, fn: Callable[..., list[jax.Array]], *args: Any) -> list[jax.Array]:
        kernels, self.kernels = self.kernels, None
        self.kernels = fn(kernels, *args)
        return self.kernels


def jax_contenders(
    model: nnx.Module, shapes: dict[str, tuple[int, int]], dtype: Any, *, extra: bool
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """SHiRA switch on `model` (adapters a, b; a merged) and the JAX baselines beside it."""
    paths = [p for p, _ in sj.shira_layers(model)]
    layers = [layer for _, layer in sj.shira_layers(model)]
    sizes = [(layer.in_features, layer.out_features) for layer in layers]
    state = {"merged": "a"}

    def shira() -> Any:
        old = state["merged"]
        new = "b" if old == "a" else "a"
        sj.switch_adapter(model, old, new)
        state["merged"] = new
        # hand the new kernels to `paired`, which waits for them (JAX dispatch is async);
        # the references are dropped before the next switch, so donation still applies
        return [layer.base_layer.kernel.get_value() for layer in layers]

    # precomputed writes for the bound: A's original entries and B's merged entries
    writes = []
    for layer in layers:
        base = np.asarray(ops.restore_entries(
            layer.base_layer.kernel[...], layer.shira_indices["a"][...],
            layer.merge_backup["a"][...]))
        ia, ib = layer.shira_indices["a"][...], layer.shira_indices["b"][...]
        sa = jnp.asarray(base[np.asarray(ia[0]), np.asarray(ia[1])])
        old_b = base[np.asarray(ib[0]), np.asarray(ib[1])].astype(np.float32)
        nb = jnp.asarray((old_b + np.asarray(layer.shira_weight["b"][...])).astype(base.dtype))
        writes.append((ia, sa, ib, nb))
        del base
    bound = Holder([jnp.array(layer.base_layer.kernel[...]) for layer in layers])
    lora = Holder([jnp.array(layer.base_layer.kernel[...]) for layer in layers])
    fa, fb = _lora_factors(sizes, 1, dtype), _lora_factors(sizes, 2, dtype)
    lora_state = {"merged": "a"}

    def lora_switch() -> Any:
        old, new = (fa, fb) if lora_state["merged"] == "a" else (fb, fa)
        lora_state["merged"] = "b" if lora_state["merged"] == "a" else "a"
        return lora.run(_lora_switch, old, new)

    fns: dict[str, Callable[[], Any]] = {
        "SHiRA switch": shira,
        "raw scatter bound": lambda: bound.run(_raw_writes, writes),
        "LoRA switch": lora_switch,
    }
    if extra:
        fuse = Holder([jnp.array(layer.base_layer.kernel[...]) for layer in layers])
        fns["LoRA fuse"] = lambda: fuse.run(_lora_fuse, fa)
        if jnp.dtype(dtype).itemsize == 2:
            native = Holder([jnp.array(layer.base_layer.kernel[...]) for layer in layers])
            fns["native bf16 scatter bound"] = lambda: native.run(_native_writes, writes)
            full = Holder([jnp.array(layer.base_layer.kernel[...]) for layer in layers])
            zero = jnp.float32(-0.0)
            fns["one full pass"] = lambda: full.run(_full_pass, zero)
    info = {"paths": paths, "nnz": sum(int(w[0].shape[1]) for w in writes)}
    return fns, info


def _cast(a: jax.Array, dtype: Any) -> jax.Array:
    return a.astype(dtype)


def with_two_adapters(model: nnx.Module, targets: Sequence[str], r: int = R) -> nnx.Module:
    """Adapters "a" (merged) and "b" on `targets`, with small values like trained ones."""
    for i, name in enumerate(["a", "b"]):
        cfg = sj.ShiraConfig(r=r, target_modules=list(targets), random_seed=i, init_weights=False)
        sj.apply_shira(model, cfg, name, key=jax.random.key(10 + i))
    for _, layer in sj.shira_layers(model):
        for name in ("a", "b"):
            layer.shira_weight[name][...] = 0.01 * layer.shira_weight[name][...]
    sj.merge(model, ["a"])
    return model


def shira_model(shapes: dict[str, tuple[int, int]], dtype: Any) -> nnx.Module:
    return with_two_adapters(Layers(shapes, dtype), list(shapes))


def donated_in_place(model: nnx.Module) -> bool:
    """Did a switch reuse the kernels' buffers (donation) rather than copy them?"""
    layer = sj.shira_layers(model)[0][1]
    before = layer.base_layer.kernel.get_value().unsafe_buffer_pointer()
    merged = layer.merged_adapters[-1]
    other = "b" if merged == "a" else "a"
    sj.switch_adapter(model, merged, other)
    after = layer.base_layer.kernel.get_value().unsafe_buffer_pointer()
    sj.switch_adapter(model, other, merged)
    return before == after


# ----------------------------------------------------------------------------- torch side


def peft_switchers(
    kind: str, shapes: Any, dtype: str, hf_layers: int = 0, r: int = R
) -> dict[str, Any]:
    """PEFT SHiRA and LoRA models with adapters a (merged) and b; each call switches once.

    `kind="layers"`: one module holding the named Linear layers; `kind="smollm2"`: transformers'
    LlamaForCausalLM with SmolLM2-135M shapes (all linear layers of the decoder targeted).
    """
    import peft
    import torch

    torch_threads()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def base() -> Any:
        if kind == "smollm2":
            return torch_llama(SMOLLM2 if r == R else TINY_LLAMA, hf_layers).to(tdtype).eval()
        torch.manual_seed(0)
        module = torch.nn.Module()
        for name, (n_in, n_out) in shapes.items():
            lin = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out, bias=False,
                                           dtype=tdtype)
            with torch.no_grad():
                lin.weight.normal_(0.0, 0.02)
            setattr(module, name, lin)
        return module

    targets = list(shapes)

    def build(make_cfg: Callable[[int], Any]) -> Callable[[], None]:
        # adapter names "A"/"B": PEFT warns about names contained in its "lora_" prefix
        model = peft.get_peft_model(base(), make_cfg(0), adapter_name="A")
        model.add_adapter("B", make_cfg(1))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "shira_weight" in name or "lora_" in name:
                    p.normal_(0.0, 0.01)
        model.base_model.merge_adapter(["A"])
        state = {"merged": "A"}

        @torch.no_grad()
        def switch() -> None:
            new = "B" if state["merged"] == "A" else "A"
            model.base_model.unmerge_adapter()
            model.base_model.merge_adapter([new])
            state["merged"] = new

        return switch

    return {
        "PEFT SHiRA switch": build(
            lambda s: peft.ShiraConfig(r=r, target_modules=targets, random_seed=s)
        ),
        "PEFT LoRA switch": build(
            lambda s: peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets)
        ),
    }


# ----------------------------------------------------------------------------- cases


def _case(
    label: str,
    shapes: dict[str, tuple[int, int]],
    dtype: Any,
    *,
    reps: int,
    warmup: int,
    peft: dict[str, Any] | None,
    extra: bool,
    model: nnx.Module | None = None,
    speedup_goal: bool = False,
) -> tuple[list[Figure], str]:
    t0 = time.perf_counter()
    model = shira_model(shapes, dtype) if model is None else model
    fns, info = jax_contenders(model, shapes, dtype, extra=extra)
    in_place = donated_in_place(model)
    worker = None
    if peft is not None:
        worker = TorchWorker("benchmarks.switching:peft_switchers", peft)
        fns.update({name: worker.fn(name) for name in worker.names})
    setup_s = time.perf_counter() - t0
    try:
        times = paired(fns, reps=reps, warmup=warmup)
    finally:
        if worker is not None:
            worker.close()
    dt = jnp.dtype(dtype).name
    tag = f"{label} {dt}"
    figs = [
        ratio_figure(f"switch {tag}: LoRA switch / SHiRA switch", times, "LoRA switch",
                     "SHiRA switch", goal=">= 15" if speedup_goal else None,
                     note="speed-up; LoRA's unfuse + fuse in one donated pass"),
        ratio_figure(f"switch {tag}: SHiRA switch / raw scatter bound", times, "SHiRA switch",
                     "raw scatter bound", goal="<= 1.5"),
    ]
    figs.append(ratio_figure(f"switch {tag}: LoRA switch / raw scatter bound", times,
                             "LoRA switch", "raw scatter bound",
                             note="the most any switch could gain over LoRA here"))
    if "LoRA fuse" in times:
        figs.append(ratio_figure(f"switch {tag}: LoRA fuse W+AB / SHiRA switch", times,
                                 "LoRA fuse", "SHiRA switch", note="the paper's Fig. 7 baseline"))
    if "native bf16 scatter bound" in times:
        figs.append(ratio_figure(f"switch {tag}: native bf16 scatter / uint16-view scatter",
                                 times, "native bf16 scatter bound", "raw scatter bound",
                                 note="what the uint16 view saves"))
        figs.append(ratio_figure(f"switch {tag}: SHiRA switch / one full pass over the kernels",
                                 times, "SHiRA switch", "one full pass",
                                 note="XLA CPU cannot write 16-bit floats in place"))
    if peft is not None:
        figs += [
            ratio_figure(f"switch {tag}: PEFT-torch SHiRA / SHiRA switch", times,
                         "PEFT SHiRA switch", "SHiRA switch", note="speed-up"),
            ratio_figure(f"switch {tag}: PEFT-torch LoRA / SHiRA switch", times,
                         "PEFT LoRA switch", "SHiRA switch", note="speed-up"),
        ]
    note = (
        f"{tag}: {len(info['paths'])} layer(s), {info['nnz']:,} entries per adapter, kernels "
        f"updated in place (donated): {'yes' if in_place else 'NO'}; medians (ms): "
        + ", ".join(f"{k} {1e3 * float(np.median(v)):.2f}" for k, v in times.items())
        + f"; setup {setup_s:.0f} s."
    )
    return figs, note


def run(quick: bool = False) -> Section:
    section = Section(
        "3. Switching adapters in merged mode (A -> B), r=32",
        "python -m benchmarks.run --only switching" + (" --quick" if quick else ""),
    )
    t0 = time.perf_counter()
    notes: list[str] = []
    dtypes = [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]
    if quick:  # every code path once: square fp32 with PEFT, bf16 extras, a whole model
        plan = [("square", 256, "float32", True), ("square", 256, "bfloat16", False),
                ("model", 1, "float32", True)]
        reps = dict(reps=1, warmup=1)
    else:
        plan = [("square", d, name, d == 4096) for d in (1024, 4096, 8192) for name, _ in dtypes]
        plan += [("layer", 0, "float32", False), ("layer", 0, "bfloat16", True),
                 ("model", 30, "float32", True), ("model", 30, "bfloat16", False)]
        reps = dict(reps=7, warmup=1)
    for kind, size, name, with_peft in plan:
        dtype = dict(dtypes)[name]
        if kind == "square":
            shapes = {"proj": (size, size)}
            peft = dict(kind="layers", shapes=shapes, dtype=name) if with_peft else None
            figs, note = _case(f"square {size}x{size}", shapes, dtype, peft=peft, extra=True,
                               speedup_goal=size == 4096, **reps)
        elif kind == "layer":
            peft = dict(kind="layers", shapes=LLAMA7B_LAYER, dtype=name) if with_peft else None
            figs, note = _case("Llama-7B-shaped layer", LLAMA7B_LAYER, dtype, peft=peft,
                               extra=False, reps=reps["reps"] if quick else 5, warmup=1)
        else:  # whole model: SmolLM2-135M shapes, every linear layer of the decoder
            config, r = (TINY_LLAMA, 4) if quick else (SMOLLM2, R)
            model = jax_llama(config, size)
            if dtype != jnp.float32:
                graphdef, state = nnx.split(model)
                model = nnx.merge(graphdef, jax.tree.map(functools.partial(_cast, dtype=dtype),
                                                          state))
            model = with_two_adapters(model, ALL_LINEAR, r)
            shapes = {p: (m.in_features, m.out_features) for p, m in sj.shira_layers(model)}
            peft = (dict(kind="smollm2", shapes=list(ALL_LINEAR), dtype=name, hf_layers=size,
                         r=r) if with_peft else None)
            figs, note = _case(f"whole SmolLM2-135M shape ({size} layers, all linear)", shapes,
                               dtype, model=model, peft=peft, extra=False, speedup_goal=True,
                               reps=reps["reps"] if quick else 5, warmup=1)
            del model
        section.figures += figs
        notes.append(note)
    section.text = "\n".join(f"- {n}" for n in notes)
    section.seconds = time.perf_counter() - t0
    return section


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv).markdown())
